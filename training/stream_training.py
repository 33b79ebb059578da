"""Training a keyword spotter for streams, the way the server runs it.

Each step reads a batch of long recordings composed on the fly (training/data/streams.py):
keywords said as commands and inside running speech, continuous prose, near misses, noise and
babble. Targets are per frame, `_unknown_` on speech and `_silence_` elsewhere; a keyword is
learnt on every frame from its end to 300 ms after it (weighted cross-entropy), or with
loss="max_pool" on the one frame of its window (from 250 ms before its end to 200 ms after it)
where the model gives it most, the window's other frames left free. Every batch row is a lane
whose recurrent state carries over from one recording to the next, as a stream's state does on
the server: a lane is reset only now and then, like a new stream. Gradients are cut every
`chunk_frames` frames (truncated backpropagation through time). Beside the streams, each step
also trains on joined one-second clips with the clip objective, so that the batch graph keeps
classifying clips.

Training runs in rounds. After each round but the last, the model listens to held-out prose of
the training speakers (the "mining" bank); every stretch where it fires becomes a hard
negative that later rounds hear often. After each round the model is judged on validation
speakers (recall at <= 2 false alarms per hour of continuous speech); the best round is kept.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from serving.audio import LogMel
from serving.audio import pcm16_to_float as to_float
from serving.streaming import DetectorConfig
from training.augment import Augmenter
from training.data.streams import (
    MAX_POOL_AFTER_END_S,
    MAX_POOL_BEFORE_END_S,
    SAMPLE_RATE_HZ,
    Bank,
    Mix,
    compose,
    evaluation_recordings,
    frame_targets,
    keyword_windows,
    sentence_keyword_frames,
)
from training.keywords import clip_frames, clip_logits
from training.loop import core_left_free, made_ahead

log = logging.getLogger(__name__)


STREAM_LOSSES = ("cross_entropy", "max_pool")


@dataclass(frozen=True)
class ContinuousSpeechTraining:
    # Start from the clip recipe's weights (training/keywords.py), then fine-tune on streams.
    pretrain_on_clips: bool = True
    # 24 x 100 x 24 lanes x 24 s: 384 h of recordings (keywords/7; keywords/6 had 12 x 100). With
    # 6 x 50 the keywords/6 recipe reached validation recall 0.602 at <= 2 false alarms/h, with
    # 12 x 100 0.691; keywords/7's recipe peaked at round 16 of 24 (0.707; README).
    rounds: int = 24
    batches_per_round: int = 100
    lanes: int = 24  # recordings per batch, each on its own carried state
    recording_seconds: float = 24.0
    chunk_frames: int = 200  # truncated backpropagation: 4 s at a 20 ms hop
    reset_probability: float = 0.1  # a lane starts from a fresh state (a new stream) this often
    clip_batch: int = 24  # joined-clip sequences per optimizer step (the clip objective)
    clips_per_sequence: int = 3
    # The clip objective's weight beside the stream loss. Its frame max rewards a keyword's
    # earliest confident frame; at 1.0 (keywords/2) the peaks came early and short, at 0.3
    # (keywords/3) test recall at <= 2 false alarms/h rose from 0.32 to 0.39 (README).
    clip_weight: float = 0.3
    # "max_pool": each keyword is learnt on the one frame of its window (training/data/streams.py
    # keyword_windows) where the model gives it most, the window's other frames left free;
    # "cross_entropy": on every frame from its end to 300 ms after. Background frames are
    # learnt as _unknown_ (speech) or _silence_ either way.
    # Max-pooling (keyword_weight 20, learning rate 3e-4, 6 rounds of 40 batches) was tried against
    # this recipe on the same clip stage and lost on test streams at every false-alarm rate (README).
    loss: str = "cross_entropy"
    window_before_end_s: float = MAX_POOL_BEFORE_END_S  # the max-pooling window around a keyword's end
    window_after_end_s: float = MAX_POOL_AFTER_END_S
    # cross_entropy: a keyword's frames start this long after its end (the model must hear
    # whether speech goes on before it fires; 0: at its end)
    target_delay_s: float = 0.0
    # cross_entropy: the frames ending in the last this-many seconds of a keyword (not before its
    # start) are left free instead of learnt as _unknown_. A detection there is a hit (the matcher
    # counts from the keyword's start), and a keyword said inside a sentence has no pause after
    # it to tell the model it has ended. 0: every frame of a keyword is _unknown_, as before.
    # 0.25 since keywords/6: validation recall at <= 5 false alarms/h after 6 rounds 0.650 against
    # 0.599 at 0 (README).
    free_keyword_s: float = 0.25
    keyword_weight: float = 4.0  # loss weight of a keyword's frames (they are rare)
    # cross_entropy: the loss weight of the frames of a keyword said inside a sentence, which the
    # model finds far harder than a command (None: keyword_weight)
    sentence_keyword_weight: float | None = None
    learning_rate: float = 1e-3  # fine-tuning the clip-trained weights
    final_learning_rate_fraction: float = 0.05
    mining_threshold: float = 0.4
    mining_seconds_before: float = 2.0  # audio kept before a false alarm as a hard negative
    hard_negative_share: float = 0.15
    # The share of training recordings with a Festival voice among their speakers (Mix.festival_voice):
    # 0.45 since keywords/7 (ten Festival voices with the accented ones; keywords/6: 0.3 of two).
    festival_voice: float = 0.45
    # An exponential moving average of the weights, updated after every optimizer step with this
    # decay (0: none). Each round's validation judges the averaged weights, and the round kept is
    # chosen among them; the live weights go on training (and mining) unaveraged. keywords/7's
    # recall at <= 2 false alarms/h swung between 0.59 and 0.71 from one round to the next.
    weight_average: float = 0.0
    weight_average_warm_up: int = 10  # WeightAverage's warm_up (0: none)
    # The share of training recordings played faster or slower (Mix.speed_probability, by a
    # factor in Mix.speed): new vocal tracts for the held-out engine's sake. Run K (README: 0.5,
    # with weight_average 0.999) gave the held-out engine 0.098 against keywords/7's 0.077 and
    # validation 0.693 against 0.701: within one run's noise, so both stay off.
    speed_perturbation: float = 0.0
    seed: int = 13

    def __post_init__(self) -> None:
        if self.loss not in STREAM_LOSSES:
            raise ValueError(f"loss must be one of {STREAM_LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.weight_average < 1.0:
            raise ValueError(f"weight_average must be in [0, 1), got {self.weight_average}")
        if not 0.0 <= self.speed_perturbation <= 1.0:
            raise ValueError(f"speed_perturbation must be in [0, 1], got {self.speed_perturbation}")


QUICK_CONTINUOUS_TRAINING = ContinuousSpeechTraining(rounds=2, batches_per_round=4, lanes=4, recording_seconds=10.0,
                                                     clip_batch=8)


def frame_logits(model, features: torch.Tensor, state, head: str = "frame"):
    """Per-frame logits [B, T, C] from `state` (None: zeros), and the state after the last frame:
    the detector's (head="frame") or those the clip objective pools (head="clip")."""
    encoded = model.encode(features)
    outputs, state = model.rnn(encoded, state)
    return model.scores(model.dropout(outputs), head), state


IGNORED = -100  # a frame the stream loss leaves free


def max_pool_targets(recording, frames: int, hop_samples: int, window_samples: int, labels: list[str],
                     before_end_s: float = MAX_POOL_BEFORE_END_S,
                     after_end_s: float = MAX_POOL_AFTER_END_S) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The max-pooling loss's frame targets [frames] of one recording, and its keyword windows:
    background as frame_targets gives it, IGNORED on each keyword's window and on the frames up to
    300 ms after its end (firing late there is not penalised); `pick_maxima` then gives each
    window the one frame the keyword is learnt on."""
    targets = frame_targets(recording, frames, hop_samples, window_samples, labels)
    targets[~np.char.startswith(np.asarray(labels)[targets], "_")] = IGNORED
    windows = keyword_windows(recording, frames, hop_samples, window_samples, labels, before_end_s, after_end_s)
    for _, first, last in windows:
        targets[first : last + 1] = IGNORED
    return targets, windows


def free_keyword_frames(targets: np.ndarray, recording, hop_samples: int, window_samples: int,
                        labels: list[str], seconds: float) -> np.ndarray:
    """`targets` [frames] (frame_targets) with the background frames that end in the last
    `seconds` of each keyword, and after its start, left free (IGNORED)."""
    if seconds <= 0:
        return targets
    ends = (np.arange(len(targets)) * hop_samples + window_samples) / SAMPLE_RATE_HZ
    background = np.isin(targets, [index for index, label in enumerate(labels) if label.startswith("_")])
    freed = targets.copy()
    for _, start, end in recording.keywords:
        freed[(ends > max(start, end - seconds)) & (ends < end) & background] = IGNORED
    return freed


def pick_maxima(logits: torch.Tensor, targets: torch.Tensor, windows: list[list[tuple[int, int, int]]],
                offset: int) -> torch.Tensor:
    """Targets of one chunk (frames offset .. offset + T of each lane; logits [B, T, C]) with each
    keyword window's frame of highest log-probability for its keyword set to that keyword (a
    window cut by the chunk's edge: its frame in this chunk)."""
    targets = targets.clone()
    log_probabilities = torch.log_softmax(logits.detach(), -1)
    frames = logits.shape[1]
    for lane, lane_windows in enumerate(windows):
        for label, first, last in lane_windows:
            first, last = max(first - offset, 0), min(last - offset, frames - 1)
            if first <= last:
                targets[lane, first + int(log_probabilities[lane, first : last + 1, label].argmax())] = label
    return targets


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                           class_weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over frames (logits [B, T, C], targets [B, T]), each frame weighted by
    `weights` [B, T] and the weighted mean taken, as cross_entropy(weight=...) does per class.
    A frame the max-pooling loss picks (its target set after the weights were made) takes its
    class weight; IGNORED frames count for nothing."""
    flat = targets.reshape(-1)
    kept = flat != IGNORED
    frame_weights = torch.where(weights.reshape(-1) > 0, weights.reshape(-1),
                                class_weights[torch.where(kept, flat, 0)]) * kept
    losses = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.where(kept, flat, 0),
                                         reduction="none")
    return (losses * frame_weights).sum() / frame_weights.sum().clamp_min(1e-12)


class WeightAverage:
    """An exponential moving average of a model's floating-point parameters and buffers.

    warm_up: the decay of the n-th update is min(decay, (1 + n) / (warm_up + n)), so the first
    updates forget the starting weights quickly (a fresh head on pretrained weights would otherwise
    weigh on the average for thousands of steps: 0.999 ** 600 is 0.55); 0 uses `decay` throughout."""

    def __init__(self, model: nn.Module, decay: float, warm_up: int = 10):
        self.decay, self.warm_up, self.updates = decay, warm_up, 0
        # The model's own tensors (state_dict aliases them; training and load_state_dict change
        # them in place), so that an update needs no state_dict of its own.
        self.live = {name: value for name, value in model.state_dict().items() if value.is_floating_point()}
        self.values = {name: value.detach().clone() for name, value in self.live.items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards `model`'s weights (the model it was made for)."""
        self.updates += 1
        # (1 + n) / n > 1 when warm_up is 0: `decay` throughout.
        decay = min(self.decay, (1 + self.updates) / (self.warm_up + self.updates))
        torch._foreach_lerp_(list(self.values.values()), [self.live[name] for name in self.values], 1.0 - decay)

    def state_dict(self, model: nn.Module) -> dict:
        """The model's state with the averaged values in place of its own."""
        return {name: self.values.get(name, value) for name, value in model.state_dict().items()}

    @contextmanager
    def swapped_into(self, model: nn.Module):
        """The model holds the averaged weights inside the block, its own again after."""
        live = copy.deepcopy(model.state_dict())
        model.load_state_dict(self.state_dict(model))
        try:
            yield model
        finally:
            model.load_state_dict(live)


def _reset_lanes(state, lanes: torch.Tensor):
    """The carried state with the lanes marked True set back to zeros (new streams there)."""
    if state is None:
        return None
    keep = (~lanes).view(1, -1, 1)
    if isinstance(state, tuple):
        return tuple((s * keep).detach() for s in state)
    return (state * keep).detach()


def posteriors_of(model, frontend: LogMel, recordings, batch: int = 32, chunk_frames: int = 500) -> list[np.ndarray]:
    """Frame posteriors of whole recordings, each from a fresh state (the torch model; the same
    as streaming it in chunks, which the chunking-invariance tests hold)."""
    model.eval()
    order = sorted(range(len(recordings)), key=lambda i: len(recordings[i].samples))
    results: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            longest = max(len(recordings[i].samples) for i in rows)
            waves = np.zeros((batch, longest), np.float32)  # a fixed batch size: see _stream_batch
            for slot, i in enumerate(rows):
                waves[slot, : len(recordings[i].samples)] = recordings[i].samples
            features = torch.from_numpy(frontend(waves))
            # Fixed-length chunks with the state carried (padding only at the end, which a
            # unidirectional model never looks back on).
            chunks = -(-features.shape[1] // chunk_frames)
            features = nn.functional.pad(features, (0, 0, 0, chunks * chunk_frames - features.shape[1]))
            state, pieces = None, []
            for first in range(0, features.shape[1], chunk_frames):
                logits, state = frame_logits(model, features[:, first : first + chunk_frames], state)
                pieces.append(logits)
            probabilities = torch.softmax(torch.cat(pieces, dim=1), -1).numpy()
            for slot, i in enumerate(rows):
                results[i] = probabilities[slot, : frontend.config.frames_for(len(recordings[i].samples))]
    return [results[i] for i in range(len(recordings))]


class StreamTrainer:
    def __init__(self, model, banks: dict[str, Bank], clips: np.ndarray, clip_labels: np.ndarray,
                 labels: list[str], frontend: LogMel, augmenter: Augmenter, settings: ContinuousSpeechTraining,
                 progress: bool = False):
        self.model, self.banks, self.labels = model, banks, labels
        self.clips, self.clip_labels = clips, clip_labels
        self.frontend, self.augmenter, self.settings = frontend, augmenter, settings
        self.progress = progress
        self.rng = np.random.default_rng(settings.seed)
        self.hard_negatives: list[np.ndarray] = []
        weights = torch.ones(len(labels))
        for index, label in enumerate(labels):
            if not label.startswith("_"):
                weights[index] = settings.keyword_weight
        self.weights = weights
        config = frontend.config
        self.hop_ms = config.hop_samples / config.sample_rate_hz * 1000
        self.window_ms = config.window_samples / config.sample_rate_hz * 1000
        self.seen = {"recording_hours": 0.0, "speech_without_keyword_hours": 0.0, "keywords": 0}
        validation = evaluation_recordings(banks["validation"], settings.seed)
        self.validation = (validation["negative"], validation["keywords"])
        self.clip_ranges = clip_frames(config, clips.shape[1], settings.clips_per_sequence)

    def _stream_batch(self):
        settings, config = self.settings, self.frontend.config
        recordings = [compose(self.banks["train"], settings.recording_seconds, self.rng,
                              replace(Mix(), hard_negative=settings.hard_negative_share,
                                      festival_voice=settings.festival_voice,
                                      speed_probability=settings.speed_perturbation),
                              hard_negatives=self.hard_negatives or None)
                      for _ in range(settings.lanes)]
        # Every batch has the same shape (a whole number of chunks): PyTorch's CPU LSTM builds its
        # kernels again for every new sequence length, which costs more than the step itself.
        frames = int(settings.recording_seconds * 1000 / self.hop_ms) // settings.chunk_frames * settings.chunk_frames
        length = (frames - 1) * config.hop_samples + config.window_samples
        waves = np.stack([np.pad(r.samples[:length], (0, max(0, length - len(r.samples)))) for r in recordings])
        features = self.augmenter.features(waves, self.rng)
        frames = features.shape[1]
        if settings.loss == "max_pool":
            built = [max_pool_targets(r, frames, config.hop_samples, config.window_samples, self.labels,
                                      settings.window_before_end_s, settings.window_after_end_s)
                     for r in recordings]
            targets, windows = np.stack([t for t, _ in built]), [w for _, w in built]
        else:
            targets = np.stack([free_keyword_frames(
                frame_targets(r, frames, config.hop_samples, config.window_samples, self.labels,
                              settings.target_delay_s),
                r, config.hop_samples, config.window_samples, self.labels, settings.free_keyword_s)
                for r in recordings])
            windows = None
        # Per-frame loss weights: the class weight, 0 on a frame the loss leaves free.
        weights = self.weights[torch.from_numpy(np.where(targets == IGNORED, 0, targets))]
        weights[torch.from_numpy(targets == IGNORED)] = 0.0
        if settings.sentence_keyword_weight is not None and settings.loss != "max_pool":
            in_sentence = np.stack([sentence_keyword_frames(r, frames, config.hop_samples, config.window_samples,
                                                            settings.target_delay_s) for r in recordings])
            weights[torch.from_numpy(in_sentence)] = settings.sentence_keyword_weight
        for recording in recordings:
            seconds = length / 16000
            self.seen["recording_hours"] += seconds / 3600
            keyword_seconds = sum(min(end, seconds) - start for _, start, end in recording.keywords if start < seconds)
            speech_seconds = sum(min(end, seconds) - start for start, end in recording.speech if start < seconds)
            self.seen["speech_without_keyword_hours"] += max(0.0, speech_seconds - keyword_seconds) / 3600
            self.seen["keywords"] += sum(1 for _, start, end in recording.keywords if end <= seconds)
        return torch.from_numpy(features), torch.from_numpy(targets), windows, weights

    def _clip_batch(self):
        settings = self.settings
        picked = self.rng.choice(len(self.clips), size=(settings.clip_batch, settings.clips_per_sequence))
        waves = np.stack([np.concatenate([self.augmenter.waveform(to_float(self.clips[i]), self.rng) for i in row])
                          for row in picked])
        return torch.from_numpy(self.augmenter.features(waves, self.rng)), torch.from_numpy(self.clip_labels[picked])

    def _batch(self):
        """One optimizer batch's data: a stream batch, which lanes start afresh, and a clip batch
        for each of its chunks."""
        settings = self.settings
        features, targets, windows, weights = self._stream_batch()
        resets = torch.from_numpy(self.rng.random(len(features)) < settings.reset_probability)
        chunks = -(-features.shape[1] // settings.chunk_frames)
        return features, targets, windows, weights, resets, [self._clip_batch() for _ in range(chunks)]

    def _prepared(self, count: int):
        """`count` batches (_batch), made in order on a background thread (training.loop.made_ahead)
        while the model trains on the ones before: composing, augmenting and the log-mel front end
        take as long as the model's steps. That thread alone draws from self.rng while the round
        runs, so a run is as reproducible as in one thread."""
        return made_ahead(lambda _: self._batch(), count, name="stream-batches")

    def train(self) -> list[dict]:
        settings, model = self.settings, self.model
        model.begin_frame_head()
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01)
        chunks = -(-int(settings.recording_seconds * 1000 / self.hop_ms) // settings.chunk_frames)
        total = settings.rounds * settings.batches_per_round * chunks
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(
            settings.final_learning_rate_fraction, 0.5 * (1 + np.cos(np.pi * min(step, total) / total))))
        history, best = [], None
        state = None
        from tqdm.auto import tqdm

        return self._rounds(model, optimizer, scheduler, history, best, state, tqdm)

    def _rounds(self, model, optimizer, scheduler, history, best, state, tqdm) -> list[dict]:
        settings = self.settings
        averaged = (WeightAverage(model, settings.weight_average, settings.weight_average_warm_up)
                    if settings.weight_average else None)

        for round_number in range(1, settings.rounds + 1):
            model.train()
            losses = []
            bar = tqdm(range(settings.batches_per_round), desc=f"keywords round {round_number}/{settings.rounds}",
                       disable=not self.progress, leave=False, unit="batch")
            # The batches are made on a thread of their own (_prepared): leave it a core while
            # they are; mining and judging, after, have both.
            with core_left_free():
                state = self._train_round(model, optimizer, scheduler, averaged, state, bar,
                                          self._prepared(settings.batches_per_round), losses)
            mined = self.mine() if round_number < settings.rounds else 0
            if averaged is None:
                validation = self.judge()
            else:
                with averaged.swapped_into(model):
                    validation = self.judge()
            stream_loss, clip_loss = np.mean(losses, axis=0)
            row = {"round": round_number, "stream_loss": round(float(stream_loss), 4),
                   "clip_loss": round(float(clip_loss), 4), "hard_negatives_added": mined,
                   **{k: round(v, 3) if isinstance(v, float) else v for k, v in self.seen.items()},
                   "validation": validation}
            history.append(row)
            log.info("round %d: stream loss %.3f, clip loss %.3f, %d hard negatives added; validation recall %.3f at "
                     "%.2f false alarms/h (%s; by delivery %s); %.3f at <= 5/h, %.3f at <= 20/h", round_number,
                     row["stream_loss"], row["clip_loss"], mined, validation["recall"],
                     validation["false_alarms_per_hour"], validation["detector"], validation["recall_by_delivery"],
                     validation["recall_at_5_per_hour"], validation["recall_at_20_per_hour"])
            fits = validation["false_alarms_per_hour"] <= 2.0
            key = (fits, validation["recall"], -validation["false_alarms_per_hour"])
            if best is None or key > best[0]:
                kept = model.state_dict() if averaged is None else averaged.state_dict(model)
                best = (key, copy.deepcopy(kept), round_number)
        model.load_state_dict(best[1])
        history.append({"chosen_round": best[2]})
        return history

    def _train_round(self, model, optimizer, scheduler, averaged, state, bar, batches, losses: list):
        """One round's batches; each step's (stream loss, clip loss) appended to losses. Returns the
        carried state."""
        settings = self.settings
        for _, batch in zip(bar, batches, strict=True):
            features, targets, windows, frame_weights, resets, clip_batches = batch
            state = _reset_lanes(state, resets)
            # Truncated backpropagation through time: one optimizer step per chunk, the state
            # carried into the next chunk without its gradient. Each step also takes a batch
            # of joined clips with the clip objective.
            for start, (clip_features, clip_targets) in zip(range(0, features.shape[1], settings.chunk_frames),
                                                            clip_batches, strict=True):
                piece = features[:, start : start + settings.chunk_frames]
                logits, state = frame_logits(model, piece, state)
                state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
                chunk_targets = targets[:, start : start + settings.chunk_frames]
                if windows is not None:
                    chunk_targets = pick_maxima(logits, chunk_targets, windows, start)
                stream_loss = weighted_cross_entropy(
                    logits, chunk_targets, frame_weights[:, start : start + settings.chunk_frames], self.weights)
                pooled = clip_logits(frame_logits(model, clip_features, None, "clip")[0], self.clip_ranges,
                                     "frame_max")
                clip_loss = nn.functional.cross_entropy(pooled.reshape(-1, pooled.shape[-1]),
                                                        clip_targets.reshape(-1))
                optimizer.zero_grad(set_to_none=True)
                (stream_loss + settings.clip_weight * clip_loss).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                if averaged is not None:
                    averaged.update(model)
                losses.append((stream_loss.item(), clip_loss.item()))
            recent = np.mean(losses[-20:], axis=0)
            bar.set_postfix(stream=f"{recent[0]:.3f}", clips=f"{recent[1]:.3f}")
        return state

    def mine(self) -> int:
        """Run over held-out prose of the training speakers; keep each stretch it fires on."""
        from training.stream_eval import detect_all

        settings = self.settings
        recordings = evaluation_recordings(self.banks["mining"], int(self.rng.integers(2**31)))["negative"]
        posteriors = posteriors_of(self.model, self.frontend, recordings)
        added = 0
        config = DetectorConfig(threshold=settings.mining_threshold, smoothing_ms=40, decision_ms=100)
        detections = detect_all(posteriors, self.labels, self.hop_ms, self.window_ms, config)
        for recording, events in zip(recordings, detections, strict=True):
            for event in events:
                end = min(len(recording.samples), int((event.reported_ms / 1000 + 0.3) * 16000))
                start = max(0, end - int((settings.mining_seconds_before + 0.3) * 16000))
                self.hard_negatives.append(recording.samples[start:end].copy())
                added += 1
        return added

    def judge(self) -> dict:
        from training.stream_eval import choose, grid, judged_grid

        negative, keywords = self.validation
        negative_posteriors = posteriors_of(self.model, self.frontend, negative)
        keyword_posteriors = posteriors_of(self.model, self.frontend, keywords)
        candidates = grid()  # the grid evaluate-stream chooses the operating point from
        results = judged_grid(negative, keywords, negative_posteriors, keyword_posteriors, self.labels,
                              self.hop_ms, self.window_ms, candidates)
        chosen, result = choose(results)
        # Recall at looser budgets too: the trend between rounds, less at the mercy of a few alarms.
        looser = {f"recall_at_{budget:g}_per_hour": choose(results, budget)[1]["recall"] for budget in (5.0, 20.0)}
        return {"recall": result["recall"], "false_alarms_per_hour": result["false_alarms_per_hour"],
                "recall_by_delivery": result.get("recall_by_delivery", {}),
                "detector": {"threshold": chosen.threshold, "smoothing_ms": chosen.smoothing_ms}, **looser}
