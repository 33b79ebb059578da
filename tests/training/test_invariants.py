"""Properties of the exported graphs, checked with hypothesis on ONNX Runtime:

1. batch invariance: each row of a padded batch of random lengths equals that sequence alone;
2. chunking invariance: any split of a sequence fed through step.onnx gives model.onnx's
   output on the whole sequence (and the same per-step scores as one chunk), within 1e-4;
3. the audio frontend gives the same features chunk by chunk as in one shot (tests/serving).

Each configuration is exported once, by the product's own export functions, in a fresh
process (the dynamo exporter carries state between exports in one process).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4
VOCAB, FEATURES = 60, 5

CONFIGS = {
    "lstm-1-last-text": {"cell": "lstm", "num_layers": 1, "pooling": "last", "vocab_size": VOCAB},
    "gru-2-max-text": {"cell": "gru", "num_layers": 2, "pooling": "max", "vocab_size": VOCAB},
    "lstm-2-mean-audio": {"cell": "lstm", "num_layers": 2, "pooling": "mean", "feature_dim": FEATURES},
    "gru-1-frame_max-audio": {"cell": "gru", "num_layers": 1, "pooling": "frame_max", "feature_dim": FEATURES},
    "lstm-2-frame_max-frame_head-audio": {"cell": "lstm", "num_layers": 2, "pooling": "frame_max", "frame_head": True,
                                          "feature_dim": FEATURES},
    "lstm-2-bi-max-text": {"cell": "lstm", "num_layers": 2, "pooling": "max", "bidirectional": True,
                           "vocab_size": VOCAB},
    "gru-1-bi-mean-audio": {"cell": "gru", "num_layers": 1, "pooling": "mean", "bidirectional": True,
                            "feature_dim": FEATURES},
}

EXPORT = """
import json, sys, torch
from pathlib import Path
from training.export import export_onnx, check_graph, export_step
from training.models.classifier import ClassifierConfig, RNNClassifier
folder, config = Path(sys.argv[1]), json.loads(sys.argv[2])
torch.manual_seed(0)
model = RNNClassifier(ClassifierConfig(num_classes=4, hidden_size=12, embedding_dim=8, dropout=0.0, **config)).eval()
if model.config.feature_dim:
    model.feature_mean.uniform_(-1, 1)
    model.feature_std.uniform_(0.5, 2)
if model.frame_head is not None:  # a frame head unlike the clip head, as training leaves it
    torch.nn.init.normal_(model.frame_head.weight)
    import numpy
    sequence = torch.from_numpy(numpy.random.default_rng(7).standard_normal((1, 30, 5)).astype("float32"))
    with torch.no_grad():
        frames = {h: model(sequence, torch.tensor([30]), frames=True, head=h)[0].numpy().tolist()
                  for h in ("frame", "clip")}
    (folder / "frames.json").write_text(json.dumps(frames))
export_onnx(model, folder / "model.onnx")
check_graph(folder / "model.onnx", model.config)
states = []
if not model.config.bidirectional:
    states = [s.__dict__ for s in export_step(model, folder / "step.onnx", exporter="torchscript")]
(folder / "states.json").write_text(json.dumps(states))
"""


FRAMES: dict[str, Path] = {}  # configuration -> per-step torch logits of both heads (frame-head models)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    result = subprocess.run([sys.executable, "-c", EXPORT, str(folder), json.dumps(CONFIGS[request.param])],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    batch = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    step = None
    if (folder / "step.onnx").exists():
        step = onnxruntime.InferenceSession(str(folder / "step.onnx"), providers=["CPUExecutionProvider"])
    FRAMES[json.dumps(CONFIGS[request.param], sort_keys=True)] = folder / "frames.json"
    return CONFIGS[request.param], batch, step, json.loads((folder / "states.json").read_text())


def _sequence(config: dict, length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if "vocab_size" in config:
        return rng.integers(1, VOCAB, length).astype(np.int64)
    return rng.standard_normal((length, FEATURES)).astype(np.float32)


def _pad(sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(s) for s in sequences)
    padded = np.zeros((len(sequences), width, *sequences[0].shape[1:]), sequences[0].dtype)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = sequence
    return padded, np.array([len(s) for s in sequences], np.int64)


def _logits(session, inputs, lengths) -> np.ndarray:
    name = session.get_inputs()[0].name
    return session.run(["logits"], {name: inputs, "lengths": lengths})[0]


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_padded_batch_rows_equal_each_sequence_alone(exported, lengths, seed):
    config, batch, _, _ = exported
    sequences = [_sequence(config, n, seed + i) for i, n in enumerate(lengths)]
    together = _logits(batch, *_pad(sequences))
    for row, sequence in enumerate(sequences):
        alone = _logits(batch, *_pad([sequence]))
        np.testing.assert_allclose(together[row], alone[0], atol=TOLERANCE, rtol=0)


def _stream(step, states, sequence: np.ndarray, cuts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    name = step.get_inputs()[0].name
    state = {s["name"]: np.full((1, *s["shape"]), s["initial"], np.float32) for s in states}
    frames, logits = [], None
    for start, end in zip(cuts[:-1], cuts[1:], strict=True):
        outputs = step.run(None, {name: sequence[None, start:end], "lengths": np.array([end - start]), **state})
        logits = outputs[0]
        frames.append(outputs[1][0])
        state = {s["name"]: value for s, value in zip(states, outputs[2:], strict=True)}
    return logits[0], np.concatenate(frames)


@SETTINGS
@given(length=st.integers(1, 60), data=st.data(), seed=st.integers(0, 2**16))
def test_any_chunking_through_step_onnx_equals_the_whole_sequence(exported, length, data, seed):
    config, batch, step, states = exported
    if step is None:
        pytest.skip("bidirectional models do not stream")
    sequence = _sequence(config, length, seed)
    inner = data.draw(st.lists(st.integers(1, length - 1), unique=True, max_size=8) if length > 1 else st.just([]))
    cuts = [0, *sorted(inner), length]
    whole = _logits(batch, *_pad([sequence]))[0]
    streamed, frames = _stream(step, states, sequence, cuts)
    np.testing.assert_allclose(streamed, whole, atol=TOLERANCE, rtol=0)
    _, one_chunk_frames = _stream(step, states, sequence, [0, length])
    np.testing.assert_allclose(frames, one_chunk_frames, atol=TOLERANCE, rtol=0)


def test_state_matters_a_stream_restarted_every_chunk_differs(exported):
    """The check above could not pass by accident: dropping the state changes the result."""
    config, batch, step, states = exported
    if step is None:
        pytest.skip("bidirectional models do not stream")
    sequence = _sequence(config, 30, 1)
    whole = _logits(batch, *_pad([sequence]))[0]
    name = step.get_inputs()[0].name
    fresh = {s["name"]: np.full((1, *s["shape"]), s["initial"], np.float32) for s in states}
    restarted = step.run(None, {name: sequence[None, 28:], "lengths": np.array([2]), **fresh})[0][0]
    assert np.abs(restarted - whole).max() > 1e-3


def test_streams_of_different_chunk_lengths_share_one_call(exported):
    """Rows shorter than the chunk keep their own state: two streams in one call, padded."""
    config, batch, step, states = exported
    if step is None:
        pytest.skip("bidirectional models do not stream")
    a, b = _sequence(config, 25, 2), _sequence(config, 9, 3)
    name = step.get_inputs()[0].name
    state = {s["name"]: np.full((2, *s["shape"]), s["initial"], np.float32) for s in states}
    first = step.run(None, {name: _pad([a[:10], b[:3]])[0], "lengths": np.array([10, 3]), **state})
    state = {s["name"]: value for s, value in zip(states, first[2:], strict=True)}
    second = step.run(None, {name: _pad([a[10:], b[3:]])[0], "lengths": np.array([15, 6]), **state})
    np.testing.assert_allclose(second[0][0], _logits(batch, *_pad([a]))[0], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(second[0][1], _logits(batch, *_pad([b]))[0], atol=TOLERANCE, rtol=0)


def test_a_frame_head_gives_the_per_step_scores_and_the_clip_head_the_pooled_logits(exported):
    """step.onnx's frame_logits come from the frame head (what the detector reads), its logits
    and model.onnx's from the clip head's frame maximum; the two heads differ here."""
    config, batch, step, states = exported
    if not config.get("frame_head"):
        pytest.skip("this configuration has one head: its frame and clip scores are the same by construction")
    saved = json.loads(FRAMES[json.dumps(config, sort_keys=True)].read_text())
    frames = {head: np.array(values, np.float32) for head, values in saved.items()}
    sequence = np.random.default_rng(7).standard_normal((30, FEATURES)).astype(np.float32)
    streamed, step_frames = _stream(step, states, sequence, [0, 11, 30])
    np.testing.assert_allclose(step_frames, frames["frame"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(streamed, frames["clip"].max(0), atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(_logits(batch, *_pad([sequence]))[0], frames["clip"].max(0), atol=TOLERANCE, rtol=0)
    assert np.abs(frames["frame"] - frames["clip"]).max() > 1e-2
