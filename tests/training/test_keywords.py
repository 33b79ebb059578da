"""Keyword spotting: augmentation, joined-clip framing, frame-max pooling, and the whole path
from generated speech through training and export to a repository the server loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch

from serving.audio import FrontendConfig, LogMel, mel_filterbank
from training.augment import AugmentConfig, Augmenter, change_speed, reverberate
from training.keywords import _clip_stage, clip_frames, clip_logits
from training.models.classifier import ClassifierConfig, RNNClassifier

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rnnserve(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "training", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_speed_change_keeps_length_and_factor_one_keeps_the_clip():
    rng = np.random.default_rng(0)
    clip = np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440).astype(np.float32)
    assert np.allclose(change_speed(clip, 1.0, rng)[:15000], clip[:15000], atol=1e-6)
    for factor in (0.8, 1.2):
        changed = change_speed(clip, factor, rng)
        assert changed.shape == clip.shape and changed.dtype == np.float32
        # A faster clip carries the tone at a higher pitch: zero crossings per second of sound.
        sound = changed[changed != 0]
        crossings = np.count_nonzero(np.diff(np.signbit(sound)))
        assert crossings / 2 / (len(sound) / 16000) == pytest.approx(440 * factor, rel=0.02)


def test_reverberation_keeps_loudness_and_smears_in_time():
    rng = np.random.default_rng(0)
    clip = np.zeros(16000, np.float32)
    clip[1000:1400] = rng.standard_normal(400).astype(np.float32)
    wet = reverberate(clip, rt60_s=0.4, sample_rate_hz=16000, rng=rng)
    assert np.sqrt(np.mean(wet**2)) == pytest.approx(np.sqrt(np.mean(clip**2)), rel=1e-3)
    assert np.abs(wet[3000:5000]).mean() > 100 * np.abs(clip[3000:5000]).mean() + 1e-4


def test_unwarped_filterbank_is_the_servers_and_augmented_features_vary_by_seed():
    frontend = LogMel()
    assert np.array_equal(mel_filterbank(FrontendConfig(), 1.0), frontend.filterbank)
    assert not np.allclose(mel_filterbank(FrontendConfig(), 1.1), frontend.filterbank)
    augmenter = Augmenter(AugmentConfig(), frontend)
    waves = np.random.default_rng(1).uniform(-0.5, 0.5, (3, 16000)).astype(np.float32)
    first = augmenter.features(waves, np.random.default_rng(5))
    assert first.shape == (3, 98, 40)
    assert np.array_equal(first, augmenter.features(waves, np.random.default_rng(5)))
    assert not np.array_equal(first, augmenter.features(waves, np.random.default_rng(6)))


def test_frames_of_a_clip_inside_joined_clips_equal_the_clip_alone():
    frontend = LogMel()
    clips = np.random.default_rng(2).uniform(-1, 1, (3, 16000)).astype(np.float32)
    joined = frontend(clips.reshape(-1))
    for i, (first, last) in enumerate(clip_frames(frontend.config, 16000, 3)):
        assert last - first + 1 == 98
        np.testing.assert_allclose(joined[first : last + 1], frontend(clips[i]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_frame_max_pooling_is_the_max_of_per_frame_scores_and_ignores_padding(cell):
    torch.manual_seed(0)
    model = RNNClassifier(ClassifierConfig(num_classes=4, feature_dim=6, cell=cell, hidden_size=8,
                                           pooling="frame_max", dropout=0.0)).eval()
    features = torch.randn(3, 20, 6)
    lengths = torch.tensor([20, 11, 1])
    with torch.no_grad():
        pooled = model(features, lengths)
        frames = model(features, lengths, frames=True)
        for row, length in enumerate(lengths.tolist()):
            torch.testing.assert_close(pooled[row], frames[row, :length].amax(0))
            alone = model(features[row : row + 1, :length], lengths[row : row + 1])
            torch.testing.assert_close(pooled[row : row + 1], alone)
        torch.testing.assert_close(clip_logits(frames, [(0, 9), (10, 19)], "frame_max")[:, 1],
                                   frames[:, 10:20].amax(1))


def test_a_frame_head_is_the_per_frame_head_starts_from_the_clip_head_and_needs_frame_max(tmp_path):
    with pytest.raises(ValueError, match="frame_head needs pooling='frame_max'"):
        ClassifierConfig(num_classes=3, feature_dim=4, pooling="last", frame_head=True)
    config = {"num_classes": 3, "feature_dim": 4, "hidden_size": 6, "pooling": "frame_max", "dropout": 0.0}
    torch.manual_seed(0)
    plain = RNNClassifier(ClassifierConfig(**config)).eval()
    torch.manual_seed(0)
    headed = RNNClassifier(ClassifierConfig(**config, frame_head=True)).eval()
    # The frame head costs no random draw: the shared weights start equal, so a clip stage trains alike.
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(headed.state_dict()[name], value)
    features, lengths = torch.randn(2, 9, 4), torch.tensor([9, 5])
    with torch.no_grad():
        headed.frame_head.weight.add_(1.0)
        frames, clip = headed(features, lengths, frames=True), headed(features, lengths, frames=True, head="clip")
        assert (frames - clip).abs().max() > 1e-3
        torch.testing.assert_close(headed(features, lengths)[1], clip[1, :5].amax(0))  # frame_max pools the clip head
        headed.begin_frame_head()
        torch.testing.assert_close(headed(features, lengths, frames=True), clip)
    # A clip stage written by a model without a frame head is read by one with it, and back.
    path = tmp_path / "clip-stage.pt"
    _clip_stage(path, lambda: [{"epoch": 1}], plain, {"made_by": 1})
    torch.manual_seed(1)
    other = RNNClassifier(ClassifierConfig(**config, frame_head=True))
    assert _clip_stage(path, lambda: pytest.fail("trained again"), other, {"made_by": 1}) == [{"epoch": 1}]
    torch.testing.assert_close(other.rnn.weight_hh_l0, plain.rnn.weight_hh_l0)


def test_quick_keywords_run_trains_on_continuous_speech_evaluates_and_exports(tmp_path):
    cache = os.environ.get("RNNSERVE_CACHE") or str(tmp_path / "cache")
    env = {"RNNSERVE_CACHE": cache}
    trained = _rnnserve("train", "keywords", "--quick", "--runs-dir", str(tmp_path / "runs"), env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "test_seen: accuracy" in trained.stdout and "test_stream: accuracy" in trained.stdout
    (run_dir,) = (tmp_path / "runs" / "keywords").iterdir()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["model_config"]["pooling"] == "frame_max" and not run["model_config"]["bidirectional"]
    assert set(run["evaluations"]) == {"test_seen", "test_stream"}
    assert run["data"]["split"]["test"] > 0 and run["data"]["split"]["test_seen"] > 0
    # Two stages: epochs of the clip recipe (the learning curves), then rounds of stream training
    # from those weights, each judged on validation streams, hard negatives mined between.
    assert run["history"] and all("epoch" in row for row in run["history"])
    assert (run_dir / "learning_curves.png").read_bytes().startswith(b"\x89PNG")
    continuous = run["continuous_speech_training"]
    rounds = [row for row in continuous["rounds"] if "round" in row]
    assert [row["round"] for row in rounds] == [1, 2]
    assert all({"recall", "false_alarms_per_hour", "detector"} <= set(row["validation"]) for row in rounds)
    assert continuous["rounds"][-1]["chosen_round"] in (1, 2)
    assert continuous["seen"]["speech_without_keyword_hours"] > 0 and continuous["seen"]["keywords"] > 0
    assert set(continuous["banks"]) == {"train", "mining", "validation"}
    assert (run_dir / "confusion_matrix.png").read_bytes().startswith(b"\x89PNG")
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert set(state) >= {"feature_mean", "feature_std"}

    exported = _rnnserve("export", str(run_dir), "--name", "keywords", "--models", str(tmp_path / "models"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    from serving.repository import load_repository

    entry = load_repository(tmp_path / "models")["keywords"]
    assert entry.ready, entry.failures
    version = entry.versions["1"]
    assert version.task == "keyword_spotting" and version.card.preprocessing.kind == "log_mel"
    assert set(version.card.evaluations) == {"test_seen", "test_stream"}
    # Streaming graph with the LSTM state and the running frame-max, checked at export.
    assert version.streaming
    assert [s.name for s in version.card.streaming.state] == ["state_h", "state_c", "state_max"]
    assert version.card.streaming.parity_max_abs_diff <= 1e-4
    # int8 measured on the whole test split, shipped or not.
    assert version.card.int8.examples == run["data"]["split"]["test"]
    assert "DynamicQuantizeLSTM" in version.card.int8.quantized_ops
    assert (version.path / "model.int8.onnx").exists() == version.card.int8.shipped
    # The served graph on the server's own features reproduces the exported model's outputs.
    clips = np.load(run_dir / "test_clips.npy")[:8]
    features = version.frontend(clips.astype(np.float32) / 32768.0)
    (logits,) = version.session.run({"features": features, "lengths": np.full(len(clips), features.shape[1])},
                                    ["logits"])
    model = RNNClassifier(ClassifierConfig(**run["model_config"]))
    model.load_state_dict(state)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(features), torch.full((len(clips),), features.shape[1])).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)

    # The continuous-speech evaluation writes the operating point the server then uses.
    evaluated = _rnnserve("evaluate-stream", str(version.path), "--quick", "--write-card", env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "held_out_engine: recall" in evaluated.stdout
    card = json.loads((version.path / "model.json").read_text())
    assert card["detection"]["default_budget_per_hour"] == 2.0 and card["detection"]["plot"] == "det.png"
    assert (version.path / "det.png").read_bytes().startswith(b"\x89PNG")
    reloaded = load_repository(tmp_path / "models")["keywords"].versions["1"]
    assert reloaded.card.detector_defaults() == card["detection"]["operating_points"][0]["detector"]


def _write_wav(path, samples):
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes(np.asarray(samples, dtype="<i2").tobytes())


def test_training_on_a_speech_commands_folder(tmp_path):
    """`rnnserve train --data FOLDER` on a Speech Commands tree of synthesised words."""
    from training.data.speech import Speaker, synthesize

    root = tmp_path / "speech_commands"
    rng = np.random.default_rng(0)
    speakers = [Speaker("en-US", variant) for variant in ("Alex", "m1", "f1", "m3")]
    for word in ("yes", "no", "dog"):
        for index, speaker in enumerate(speakers):
            samples = synthesize(word, speaker)[:16000]
            _write_wav(root / word / f"s{index}_nohash_0.wav", np.round(samples * 20000))
    _write_wav(root / "_background_noise_" / "pink.wav", rng.integers(-3000, 3000, 16000 * 20))
    (root / "validation_list.txt").write_text("yes/s2_nohash_0.wav\nno/s2_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("yes/s3_nohash_0.wav\nno/s3_nohash_0.wav\ndog/s3_nohash_0.wav\n")
    trained = _rnnserve("train", "--data", str(root), "--name", "commands", "--quick",
                        "--runs-dir", str(tmp_path / "runs"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "commands").iterdir()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["data"]["split"]["test"] == 3 + 50 and run["data"]["split"]["validation"] == 2 + 50
    assert "Speech Commands" in run["data"]["source"]
