"""Training keyword spotters: a unidirectional LSTM/GRU over log-mel frames that reports a
label after every frame, so that it can listen to an endless stream.

Features come from serving.audio, the numpy frontend the server runs. The default pooling,
"frame_max", scores every frame and takes each class's largest score over a clip, so the
model learns to fire right after a keyword, wherever it falls. Training sequences are several
clips joined end to end (random clips, augmented), with each clip's target pooled over that
clip's own frames: a model trained this way carries its state across clip boundaries the way a
stream does, instead of only ever starting from silence.

Evaluation: single test clips of unseen speakers (the card's metrics), held-out clips of
training speakers ("test_seen", to measure the drop from seen to unseen voices), and the test
clips streamed end to end ("test_stream"). Baseline: logistic regression on per-band mean,
standard deviation and maximum of the log-mel features, on the same split.

A run directory holds checkpoint.pt, run.json, test_clips.npy and test_labels.npy (the test
split, which export uses for its parity checks and to measure int8) and PNG plots.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from serving.audio import FrontendConfig, LogMel
from serving.audio import pcm16_to_float as to_float
from serving.card import EvaluationMetrics
from training import distributed
from training.augment import AugmentConfig, Augmenter
from training.config import TrainConfig
from training.data.dataset import AudioClips
from training.loop import fit, git_revision, predict, write_run
from training.metrics import evaluation_metrics
from training.models.classifier import ClassifierConfig, RNNClassifier

log = logging.getLogger(__name__)

AUDIO_BASELINE_METHOD = "per-band mean, std and max of log-mel features + logistic regression"
# 40 log-mel bands every 20 ms over 30 ms windows: half the recurrent steps of a 10 ms hop,
# which halves training and serving cost, with the time resolution keywords need.
KEYWORD_FRONTEND = FrontendConfig(window_samples=480, hop_samples=320)


@dataclass(frozen=True)
class StreamTraining:
    # Clips joined into one training sequence (1 trains on single clips from a fresh state).
    clips_per_sequence: int = 3
    # Test clips joined into one stream for the "test_stream" evaluation.
    clips_per_test_stream: int = 10


def clip_frames(frontend: FrontendConfig, clip_samples: int, clips: int) -> list[tuple[int, int]]:
    """(first, last) frame of each of `clips` clips joined end to end: the frames that start in
    the clip and, for the last one, end in it too."""
    ranges = []
    for i in range(clips):
        first = -(-i * clip_samples // frontend.hop_samples)
        last = ((i + 1) * clip_samples - frontend.window_samples) // frontend.hop_samples
        ranges.append((first, last))
    return ranges


def clip_logits(frame_logits: torch.Tensor, ranges: list[tuple[int, int]], pooling: str) -> torch.Tensor:
    """Per-frame logits [B, T, C] of joined clips -> one row per clip [B, K, C], pooled as the
    model pools a single clip ("last": the clip's last frame; "frame_max": the max over its frames)."""
    if pooling == "last":
        return torch.stack([frame_logits[:, last] for _, last in ranges], dim=1)
    return torch.stack([frame_logits[:, first : last + 1].amax(dim=1) for first, last in ranges], dim=1)


def clip_features(frontend: LogMel, clips: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Log-mel features [N, T, F] of int16 clips [N, S], computed `chunk` clips at a time."""
    if len(clips) == 0:
        return frontend(to_float(clips))
    return np.concatenate([frontend(to_float(clips[i : i + chunk])) for i in range(0, len(clips), chunk)])


def _summary(features: np.ndarray) -> np.ndarray:
    return np.concatenate([features.mean(1), features.std(1), features.max(1)], axis=1)


def audio_baseline(
    train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray,
    label_names: list[str], seed: int,
) -> EvaluationMetrics:
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000, random_state=seed))
    pipeline.fit(_summary(train_features), train_labels)
    return evaluation_metrics("test", test_labels, pipeline.predict(_summary(test_features)), label_names)


def train_keyword_spotter(
    task: str,
    description: str,
    data: AudioClips,
    model_overrides: dict,
    config: TrainConfig,
    runs_dir: Path,
    command: str,
    progress: bool = True,
    augment: AugmentConfig = AugmentConfig(),
    streaming: StreamTraining = StreamTraining(),
    frontend_config: FrontendConfig = KEYWORD_FRONTEND,
    continuous=None,
    clip_checkpoint: Path | None = None,
) -> Path | None:
    """Train, evaluate (unseen voices, seen voices, streamed), compare with the baseline and
    write a run directory; under torchrun only rank 0 writes it (the others return None).

    continuous: (banks, ContinuousSpeechTraining) from training/data/streams.py and
    training/stream_training.py: train on long recordings of continuous speech with frame-level
    targets, carried state and hard-negative mining (the bundled task); None trains on the clips
    alone (users' Speech Commands folders).

    clip_checkpoint: with continuous training, where the clip stage's weights are kept: read (and
    the clip stage skipped) when the file was written by the same data, model and settings,
    written after the clip stage otherwise. Stream-training variants can so start from one clip
    stage; a resumed run continues exactly as the whole run would (the random state is kept)."""
    started = time.perf_counter()
    context = distributed.setup()
    try:
        return _train(task, description, data, model_overrides, config, runs_dir, command,
                      progress and context.is_main, context, started, augment, streaming, frontend_config,
                      continuous, clip_checkpoint)
    finally:
        distributed.teardown(context)


def _train(task, description, data: AudioClips, model_overrides, config: TrainConfig, runs_dir, command,
           progress, context, started, augment: AugmentConfig, streaming: StreamTraining,
           frontend_config: FrontendConfig, continuous=None, clip_checkpoint: Path | None = None):
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    parts = np.asarray(data.parts)
    labels = np.asarray(data.labels, dtype=np.int64)
    index = {part: np.flatnonzero(parts == part) for part in ("train", "validation", "test", "test_seen")}
    if config.max_train_examples and len(index["train"]) > config.max_train_examples:
        index["train"] = np.sort(rng.choice(index["train"], config.max_train_examples, replace=False))
    for part in ("train", "validation", "test"):
        if len(index[part]) == 0:
            raise ValueError(f"the data has no {part} clips")
    if context.is_main:
        log.info("train %d, validation %d, test %d (unseen speakers), test_seen %d clips",
                 *(len(index[p]) for p in ("train", "validation", "test", "test_seen")))

    frontend = LogMel(frontend_config)
    clip_samples = data.clips.shape[1]
    frames_per_clip = frontend.config.frames_for(clip_samples)
    features = {part: clip_features(frontend, data.clips[index[part]]) for part in ("validation", "test", "test_seen")}
    train_features = clip_features(frontend, data.clips[index["train"]])
    mean, std = train_features.mean(axis=(0, 1)), train_features.std(axis=(0, 1)) + 1e-5

    model_config = ClassifierConfig(num_classes=len(data.label_names), feature_dim=frontend.config.mel_bands,
                                    **model_overrides)
    model = RNNClassifier(model_config).to(context.device)
    model.feature_mean.copy_(torch.from_numpy(mean))
    model.feature_std.copy_(torch.from_numpy(std))
    augmenter = Augmenter(augment, frontend)
    augmenter.fill = mean.astype(np.float32)
    # Streams need per-frame outputs: a unidirectional model that reads the last step or pools
    # per-frame scores.
    per_frame = not model_config.bidirectional and model_config.pooling in ("last", "frame_max")
    joined = streaming.clips_per_sequence if per_frame else 1
    ranges = clip_frames(frontend.config, clip_samples, joined)

    def train_batches(epoch_rng):
        order = epoch_rng.permutation(index["train"])
        sequences = order[: len(order) // joined * joined].reshape(-1, joined)
        return [sequences[i : i + config.batch_size] for i in range(0, len(sequences), config.batch_size)]

    def prepare_batch(sequences, batch_rng):
        """Augmented clips, joined, as log-mel features, and their labels (made ahead by fit)."""
        waves = np.stack([
            np.concatenate([augmenter.waveform(to_float(data.clips[i]), batch_rng) for i in sequence])
            for sequence in sequences
        ])
        return torch.from_numpy(augmenter.features(waves, batch_rng)), torch.from_numpy(labels[sequences])

    def batch_loss(trained_model, prepared, batch_rng):
        inputs, batch_labels = (tensor.to(context.device) for tensor in prepared)
        lengths = torch.full((len(inputs),), inputs.shape[1], dtype=torch.int64, device=context.device)
        if not per_frame:
            return nn.functional.cross_entropy(trained_model(inputs, lengths), batch_labels[:, 0])
        logits = clip_logits(trained_model(inputs, lengths, frames=True, head="clip"), ranges, model_config.pooling)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch_labels.reshape(-1))

    def scores(part):
        def score(scored_model, rows):
            inputs = torch.from_numpy(features[part][rows]).to(context.device)
            lengths = torch.full((len(rows),), frames_per_clip, dtype=torch.int64, device=context.device)
            return scored_model(inputs, lengths), torch.from_numpy(labels[index[part][rows]])
        return score

    def eval_batches(part):
        return np.array_split(np.arange(len(index[part])), max(1, len(index[part]) // 256))

    if continuous is not None:
        from training.stream_training import StreamTrainer

        banks, settings = continuous
        # Two stages: the clip recipe first (it learns the words), then continuous speech from
        # those weights (it learns to stay quiet while people talk, and where a keyword ends).
        history = []
        if settings.pretrain_on_clips:
            def clip_stage():
                return fit(
                    model, config, context, task, data.label_names,
                    train_batches=train_batches, batch_loss=batch_loss,
                    validation_batches=eval_batches("validation"), validation_scores=scores("validation"),
                    validation_labels=labels[index["validation"]], rng=rng, progress=progress,
                    prepare_batch=prepare_batch,
                )
            # The frame head plays no part in the clip stage: a stage written without one serves.
            clip_config = {k: v for k, v in model_config.to_dict().items() if k != "frame_head"}
            history = _clip_stage(clip_checkpoint, clip_stage, model, {
                "data_digest": data.digest(), "model_config": clip_config, "train_config": asdict(config),
                "augment_config": asdict(augment), "frontend": asdict(frontend.config), "joined": joined,
            }) if context.world_size == 1 else clip_stage()
        trainer = StreamTrainer(model, banks, data.clips[index["train"]], labels[index["train"]], data.label_names,
                                frontend, augmenter, settings, progress)
        rounds = trainer.train()
        continuous_summary = {"settings": asdict(settings), "rounds": rounds, "seen": trainer.seen,
                              "hard_negatives": len(trainer.hard_negatives),
                              "banks": {split: {kind: round(bank.seconds(kind) / 3600, 3)
                                                for kind in ("keyword", "sentence", "near_miss", "prose")}
                                        | {"voices": len(set(bank.voices))} for split, bank in banks.items()}}
    else:
        history = fit(
            model, config, context, task, data.label_names,
            train_batches=train_batches, batch_loss=batch_loss,
            validation_batches=eval_batches("validation"), validation_scores=scores("validation"),
            validation_labels=labels[index["validation"]], rng=rng, progress=progress, prepare_batch=prepare_batch,
        )
        continuous_summary = None
    evaluations = {}
    for part in ("test", "test_seen"):
        if len(index[part]):
            _, predicted = predict(model, eval_batches(part), scores(part), len(index[part]), context)
            evaluations[part] = evaluation_metrics(part, labels[index[part]], predicted, data.label_names)
    if not context.is_main:
        return None
    if per_frame:
        evaluations["test_stream"] = _stream_evaluation(
            model, frontend, data, index["test"], streaming.clips_per_test_stream, config.seed
        )
    baseline = audio_baseline(train_features, labels[index["train"]], features["test"], labels[index["test"]],
                              data.label_names, config.seed)

    run_dir = runs_dir / task / datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    run_dir.mkdir(parents=True)
    np.save(run_dir / "test_clips.npy", data.clips[index["test"]])
    np.save(run_dir / "test_labels.npy", labels[index["test"]])
    test = evaluations.pop("test")
    run = {
        "task": task,
        "modality": "audio",
        "description": description,
        "labels": data.label_names,
        "model_config": model_config.to_dict(),
        "train_config": asdict(config),
        "augment_config": asdict(augment),
        "stream_training": asdict(streaming) | {"clips_per_sequence": joined},
        "frontend": asdict(frontend.config),
        "clip_samples": clip_samples,
        "metrics": test.model_dump(),
        "evaluations": {name: metrics.model_dump() for name, metrics in evaluations.items()},
        "baseline": baseline.model_dump(),
        "baseline_method": AUDIO_BASELINE_METHOD,
        "data": {
            "source": data.source,
            "digest": data.digest(),
            "examples": len(data),
            "split": {
                "method": "by speaker (voice+variant) where known, else as the data defines",
                **{part: int(len(rows)) for part, rows in index.items()},
            },
        },
        "training_command": command,
        "training_seconds": round(time.perf_counter() - started, 1),
        "world_size": context.world_size,
        "git_revision": git_revision(),
        "history": history,
    }
    if continuous_summary is not None:
        run["continuous_speech_training"] = continuous_summary
    write_run(run_dir, model, run, data.label_names)
    return run_dir


def _clip_stage(path: Path | None, train, model, made_by: dict) -> list:
    """The clip stage's history, its weights in `model`: read from `path` when it holds the weights
    of the same `made_by`, else trained (and written to `path`, if given)."""
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("made_by") == made_by:
            state = {k: v for k, v in saved["state"].items() if not k.startswith("frame_head.")}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or any(not k.startswith("frame_head.") for k in missing):
                raise RuntimeError(f"{path}: weights do not fit the model ({missing + unexpected})")
            torch.set_rng_state(saved["torch_rng"])
            log.info("clip stage read from %s", path)
            return saved["history"]
        log.warning("%s holds another clip stage (other data, model or settings): training it again", path)
    history = train()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"made_by": made_by, "state": model.state_dict(), "torch_rng": torch.get_rng_state(),
                    "history": history}, path)
        log.info("clip stage written to %s", path)
    return history


def _stream_evaluation(model, frontend: LogMel, data: AudioClips, test_index: np.ndarray, per_stream: int,
                       seed: int) -> EvaluationMetrics:
    """Test clips joined in a seeded random order into streams of `per_stream` clips, each
    stream run once from a fresh state; the prediction at each clip's last frame is scored."""
    order = np.random.default_rng(seed).permutation(test_index)
    order = order[: len(order) // per_stream * per_stream].reshape(-1, per_stream)
    ranges = clip_frames(frontend.config, data.clips.shape[1], per_stream)
    predicted = []
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(order), 32):
            streams = order[start : start + 32]
            inputs = torch.from_numpy(frontend(to_float(data.clips[streams].reshape(len(streams), -1)))).to(device)
            lengths = torch.full((len(streams),), inputs.shape[1], dtype=torch.int64, device=device)
            logits = clip_logits(model(inputs, lengths, frames=True, head="clip"), ranges, model.config.pooling)
            predicted.append(logits.argmax(-1).cpu().numpy().reshape(-1))
    truth = np.asarray(data.labels)[order.reshape(-1)]
    return evaluation_metrics("test_stream", truth, np.concatenate(predicted), data.label_names)
