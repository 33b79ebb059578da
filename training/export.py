"""Export a training run to a model repository version: ONNX graph, tokenizer (text) and card.

The version folder is assembled under a temporary name and renamed into place,
so a reader never sees half a version and an existing version is never touched.
Export fails when ONNX Runtime and PyTorch disagree on the held-out examples.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
import warnings
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from serving.audio import FrontendConfig, LogMel, pcm16_to_float
from serving.card import (
    AudioPreprocessing,
    ExportInfo,
    Limits,
    ModelCard,
    StateSpec,
    StreamingSpec,
    TensorSpec,
    TextPreprocessing,
)
from serving.text import TextEncoder
from training.keywords import clip_features
from training.models.classifier import ClassifierConfig, RNNClassifier
from training.quantize import quantize_and_measure
from training.step import StateTensor, StepModel

log = logging.getLogger(__name__)

OPSET = 18
PARITY_TOLERANCE = 1e-4
PARITY_EXAMPLES = 1024


def input_specs(config: ClassifierConfig) -> list[TensorSpec]:
    """Token ids for text models, log-mel frames for audio ones; lengths for both."""
    first = (TensorSpec(name="input_ids", dtype="int64", shape=["batch", "time"]) if config.vocab_size
             else TensorSpec(name="features", dtype="float32", shape=["batch", "time", config.feature_dim]))
    return [first, TensorSpec(name="lengths", dtype="int64", shape=["batch"])]


class ExportError(Exception):
    """The exported graph is not what the trained model computes, or cannot be written."""


class FixedAxesError(ExportError):
    """The exporter fixed an axis that must stay dynamic."""


def load_run(run_dir: Path) -> tuple[dict, RNNClassifier]:
    run = json.loads((run_dir / "run.json").read_text())
    model = RNNClassifier(ClassifierConfig(**run["model_config"]))
    checkpoint = run_dir / "checkpoint.pt"
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects would run their code.
        state = torch.load(checkpoint, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message suggests weights_only=False; only its diagnosis is worth repeating.
        lines = [line.split("WeightsUnpickler error:", 1)[1] for line in str(error).splitlines()
                 if "WeightsUnpickler error:" in line]
        reason = lines[0].split(". Please", 1)[0].strip() if lines else error.__class__.__name__
        raise ExportError(
            f"{checkpoint}: refused, it holds more than tensors and weights (loaded with weights_only=True): "
            f"{reason}"
        ) from None
    model.load_state_dict(state)
    return run, model.eval()


def export_onnx(model: RNNClassifier, path: Path, exporter: str = "dynamo") -> int:
    """Write the batch graph with dynamic batch and time axes; returns the opset used."""
    # The exporters warn about tracing details that the parity check below settles for real.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _export_onnx(model, path, exporter)


def _export_onnx(model: RNNClassifier, path: Path, exporter: str) -> int:
    model.exporting = True
    try:
        opset = _trace(model, path, exporter)
    finally:
        model.exporting = False
    if model.config.bidirectional:
        wire_sequence_lengths(path)
    return opset


def wire_sequence_lengths(path: Path) -> None:
    """Feed Cast(lengths, int32) to every recurrent node's sequence_lens input, so the
    backward direction starts at each sequence's last real step (as packing does in PyTorch)."""
    model = onnx.load(str(path))
    graph = model.graph
    cast = onnx.helper.make_node("Cast", ["lengths"], ["sequence_lens_int32"], to=onnx.TensorProto.INT32,
                                 name="sequence_lens_cast")
    recurrent = [node for node in graph.node if node.op_type in ("LSTM", "GRU")]
    for node in recurrent:
        inputs = list(node.input) + [""] * max(0, 5 - len(node.input))
        inputs[4] = "sequence_lens_int32"
        del node.input[:]
        node.input.extend(inputs)
    graph.node.insert(0, cast)
    onnx.save(model, str(path))


def _trace(model: RNNClassifier, path: Path, exporter: str) -> int:
    config = model.config
    first = (torch.ones(2, 5, dtype=torch.int64) if config.vocab_size
             else torch.zeros(2, 5, config.feature_dim, dtype=torch.float32))
    example = (first, torch.tensor([5, 3], dtype=torch.int64))
    input_name = input_specs(config)[0].name
    names = {"input_names": [input_name, "lengths"], "output_names": ["logits"]}
    if exporter == "dynamo":
        batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
        program = torch.onnx.export(
            model, example, dynamo=True, opset_version=OPSET, verbose=False, external_data=False,
            dynamic_shapes=({0: batch, 1: time}, {0: batch}), **names,
        )
        program.save(str(path), external_data=False)
        return OPSET
    torch.onnx.export(
        model, example, str(path), dynamo=False, opset_version=17,
        dynamic_axes={input_name: {0: "batch", 1: "time"}, "lengths": {0: "batch"}, "logits": {0: "batch"}},
        **names,
    )
    return 17


def _check_native_recurrence(path: Path, config: ClassifierConfig):
    """Valid ONNX (checker and shape inference) running the native recurrent operator, not an
    unrolled loop; GRU with linear_before_reset=1. Returns the graph."""
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    op_type = config.cell.upper()
    recurrent = [node for node in graph.node if node.op_type == op_type]
    if not recurrent:
        raise ExportError(f"{path.name} has no native {op_type} operator")
    if any(node.op_type in ("Loop", "Scan") for node in graph.node):
        raise ExportError(f"{path.name} unrolls the recurrence into Loop/Scan")
    for node in recurrent:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op_type == "GRU" and attributes.get("linear_before_reset") != 1:
            raise ExportError("GRU must have linear_before_reset=1 to match PyTorch")
    # In one process, a dynamo export that follows another can come out with a fixed time
    # axis (seen: a unidirectional GRU, then a bidirectional one). The CLI exports in a fresh
    # process; library callers get this error instead of a model that rejects other lengths.
    fixed = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[:2] if not d.dim_param]
    if fixed:
        raise FixedAxesError(
            f"{path.name}: {graph.input[0].name} has fixed axes {fixed}; export in a fresh process or "
            "with exporter='torchscript'"
        )
    return graph


def check_graph(path: Path, config: ClassifierConfig) -> None:
    """The batch graph passes the checks above and has the contract's inputs and outputs."""
    graph = _check_native_recurrence(path, config)
    expected = [spec.name for spec in input_specs(config)]
    if [i.name for i in graph.input] != expected or [o.name for o in graph.output] != ["logits"]:
        raise ExportError(f"graph inputs/outputs must be {', '.join(expected)} -> logits")


def text_batches(encoder: TextEncoder, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Padded batches of 64 real texts, and the first text alone."""
    token_ids = encoder.token_ids(texts)
    return [encoder.pad(batch) for batch in [token_ids[i : i + 64] for i in range(0, len(token_ids), 64)]
            + [token_ids[:1]]]


def audio_batches(frontend: LogMel, clips: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batches of 64 clips' features, with a random share cut short (and zero-padded) so that
    padding is exercised, and the first clip alone."""
    rng = np.random.default_rng(0)
    batches = []
    for start in range(0, len(clips), 64):
        features = frontend(pcm16_to_float(clips[start : start + 64]))
        lengths = np.where(rng.random(len(features)) < 0.5, rng.integers(1, features.shape[1] + 1, len(features)),
                           features.shape[1]).astype(np.int64)
        for row, length in enumerate(lengths):
            features[row, length:] = 0.0
        batches.append((features, lengths))
    first, first_lengths = batches[0]
    return [*batches, (first[:1, : first_lengths[0]], first_lengths[:1])]


def check_parity(model: RNNClassifier, path: Path, batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Max |logits(ONNX Runtime) - logits(PyTorch)| over the given (inputs, lengths) batches."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = input_specs(model.config)[0].name
    worst = 0.0
    for inputs, lengths in batches:
        (onnx_logits,) = session.run(["logits"], {input_name: inputs, "lengths": lengths})
        with torch.no_grad():
            torch_logits = model(torch.from_numpy(inputs), torch.from_numpy(lengths)).numpy()
        worst = max(worst, float(np.abs(onnx_logits - torch_logits).max()))
        if not np.array_equal(onnx_logits.argmax(1), torch_logits.argmax(1)):
            raise ExportError("ONNX Runtime and PyTorch predict different labels")
    if worst > PARITY_TOLERANCE:
        raise ExportError(f"ONNX Runtime differs from PyTorch by {worst:.2e} (limit {PARITY_TOLERANCE:.0e})")
    return worst


def export_step(model: RNNClassifier, path: Path, exporter: str = "dynamo") -> list[StateTensor]:
    """Write step.onnx (see training.step) and return its state tensors."""
    step = StepModel(model)
    config = model.config
    first = (torch.ones(2, 5, dtype=torch.int64) if config.vocab_size
             else torch.zeros(2, 5, config.feature_dim, dtype=torch.float32))
    example = (first, torch.tensor([5, 3], dtype=torch.int64), *step.initial_state(2))
    input_name = input_specs(config)[0].name
    names = {
        "input_names": [input_name, "lengths", *(s.name for s in step.states)],
        "output_names": ["logits", "frame_logits", *(s.output for s in step.states)],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
            program = torch.onnx.export(
                step, example, dynamo=True, opset_version=OPSET, verbose=False, external_data=False,
                dynamic_shapes=({0: batch, 1: time}, {0: batch}, tuple({0: batch} for _ in step.states)), **names,
            )
            program.save(str(path), external_data=False)
        else:
            axes = {input_name: {0: "batch", 1: "time"}, "lengths": {0: "batch"}, "logits": {0: "batch"},
                    "frame_logits": {0: "batch", 1: "time"}}
            axes.update({s.name: {0: "batch"} for s in step.states})
            axes.update({s.output: {0: "batch"} for s in step.states})
            torch.onnx.export(step, example, str(path), dynamo=False, opset_version=17, dynamic_axes=axes, **names)
    # Rows shorter than the chunk stop their state at their own last step.
    wire_sequence_lengths(path)
    _check_native_recurrence(path, config)
    return step.states


def _chunk_bounds(length: int, rng: np.random.Generator) -> list[int]:
    """Random cut points of [0, length): single steps, short and long chunks mixed."""
    cuts, position = [0], 0
    while position < length:
        position = min(length, position + int(rng.choice([1, 2, 3, 7, 16, 40])))
        cuts.append(position)
    return cuts


def check_chunking(model_path: Path, step_path: Path, batches: list[tuple[np.ndarray, np.ndarray]],
                   states: list[StateTensor], limit: int = 64, expected_frames: np.ndarray | None = None,
                   seed: int = 0) -> tuple[float, int]:
    """Stream up to `limit` real sequences through step.onnx in random chunks, several streams
    per call with different chunk lengths, and compare the final logits with model.onnx on the
    whole sequences (and the per-step scores with expected_frames [B, T, C], where given).
    Returns (max abs difference, sequences checked)."""
    options = onnxruntime.SessionOptions()
    batch_session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    step_session = onnxruntime.InferenceSession(str(step_path), options, providers=["CPUExecutionProvider"])
    input_name = batch_session.get_inputs()[0].name
    inputs, lengths = batches[0]
    inputs, lengths = inputs[:limit], lengths[:limit]
    (expected,) = batch_session.run(["logits"], {input_name: inputs, "lengths": lengths})
    rng = np.random.default_rng(seed)
    bounds = [_chunk_bounds(int(n), rng) for n in lengths]
    frames = np.zeros((len(lengths), inputs.shape[1], expected.shape[1]), np.float32)
    state = {s.name: np.full((len(lengths), *s.shape), s.initial, np.float32) for s in states}
    final = np.zeros_like(expected)
    for call in range(max(len(b) for b in bounds) - 1):
        rows = [r for r, b in enumerate(bounds) if call + 1 < len(b)]
        spans = [(bounds[r][call], bounds[r][call + 1]) for r in rows]
        width = max(end - start for start, end in spans)
        chunk = np.zeros((len(rows), width, *inputs.shape[2:]), inputs.dtype)
        for i, (r, (start, end)) in enumerate(zip(rows, spans, strict=True)):
            chunk[i, : end - start] = inputs[r, start:end]
        feeds = {input_name: chunk, "lengths": np.array([end - start for start, end in spans], np.int64)}
        feeds.update({name: value[rows] for name, value in state.items()})
        outputs = step_session.run(None, feeds)
        final[rows] = outputs[0]
        for i, (r, (start, end)) in enumerate(zip(rows, spans, strict=True)):
            frames[r, start:end] = outputs[1][i, : end - start]
        for s, value in zip(states, outputs[2:], strict=True):
            state[s.name][rows] = value
    worst = float(np.abs(final - expected).max())
    if expected_frames is not None:
        for r, n in enumerate(lengths):
            worst = max(worst, float(np.abs(frames[r, :n] - expected_frames[r, :n]).max()))
    return worst, len(lengths)


def _export_streaming(model: RNNClassifier, folder: Path, batches) -> StreamingSpec:
    """step.onnx beside model.onnx, proven to match it chunk by chunk on real held-out data."""
    # The TorchScript exporter: dynamo declares the step graph's time axis with the example's
    # length (and, after another export in the same process, fixes it).
    states = export_step(model, folder / "step.onnx", exporter="torchscript")
    inputs, lengths = batches[0]
    with torch.no_grad():
        frames = model(torch.from_numpy(inputs[:64]), torch.from_numpy(lengths[:64]), frames=True).numpy()
    worst, count = check_chunking(folder / "model.onnx", folder / "step.onnx", batches, states,
                                  expected_frames=frames)
    if worst > PARITY_TOLERANCE:
        raise ExportError(f"step.onnx streamed in chunks differs from model.onnx by {worst:.2e} "
                          f"(limit {PARITY_TOLERANCE:.0e})")
    config = model.config
    first = input_specs(config)[0]
    classes = config.num_classes
    return StreamingSpec(
        inputs=[first, input_specs(config)[1],
                *(TensorSpec(name=s.name, dtype="float32", shape=["batch", *s.shape]) for s in states)],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", classes]),
                 TensorSpec(name="frame_logits", dtype="float32", shape=["batch", "time", classes]),
                 *(TensorSpec(name=s.output, dtype="float32", shape=["batch", *s.shape]) for s in states)],
        state=[StateSpec(name=s.name, output=s.output, shape=list(s.shape), initial=s.initial) for s in states],
        parity_max_abs_diff=float(f"{worst:.3g}"),
        parity_sequences=count,
    )


def next_version(model_dir: Path) -> int:
    if not model_dir.exists():
        return 1
    return max((int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), default=0) + 1


def export_run(run_dir: Path, models_dir: Path, name: str, exporter: str = "dynamo") -> Path:
    """Export run_dir as the next version of `name` in models_dir; returns the version folder."""
    run, model = load_run(run_dir)
    config = model.config
    audio = run.get("modality") == "audio"
    if audio:
        frontend_config = FrontendConfig(**run["frontend"])
        frontend = LogMel(frontend_config)
        preprocessing = AudioPreprocessing(**asdict(frontend_config), clip_samples=run["clip_samples"])
        clips, labels = np.load(run_dir / "test_clips.npy"), np.load(run_dir / "test_labels.npy")
        spread = np.linspace(0, len(clips) - 1, min(PARITY_EXAMPLES, len(clips))).astype(int)
        batches = audio_batches(frontend, clips[spread])
        features = clip_features(frontend, clips)
        full = [(features[i : i + 64], np.full(len(features[i : i + 64]), features.shape[1], np.int64))
                for i in range(0, len(features), 64)]
    else:
        max_tokens = run["train_config"]["max_tokens"]
        encoder = TextEncoder.from_file(run_dir / "tokenizer.json", max_tokens=max_tokens, pad_id=config.pad_id)
        with open(run_dir / "test.jsonl") as handle:
            rows = [json.loads(line) for line in handle]
        preprocessing = TextPreprocessing(max_tokens=max_tokens, pad_id=config.pad_id)
        batches = text_batches(encoder, [row["text"] for row in rows[:PARITY_EXAMPLES]])
        full = text_batches(encoder, [row["text"] for row in rows])[:-1]
        labels = np.array([run["labels"].index(row["label"]) for row in rows])

    if config.chunk_tokens and exporter == "dynamo":
        # Dynamo's GRU decomposition unrolls a recurrence over a fixed time axis, and a chunk's
        # is fixed (chunk_tokens); TorchScript keeps the native operator.
        log.info("chunked model: exporting with the TorchScript exporter")
        exporter = "torchscript"
    model_dir = models_dir / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=model_dir))
    try:
        opset = export_onnx(model, staging / "model.onnx", exporter)
        try:
            check_graph(staging / "model.onnx", config)
        except FixedAxesError as error:
            if exporter != "dynamo":
                raise
            # Seen with some torch versions, and after another dynamo export in one process.
            log.warning("%s; exporting with the TorchScript exporter instead", error)
            exporter = "torchscript"
            opset = export_onnx(model, staging / "model.onnx", exporter)
            check_graph(staging / "model.onnx", config)
        worst = check_parity(model, staging / "model.onnx", batches)
        streaming = None
        if not (config.bidirectional or config.chunk_tokens):
            streaming = _export_streaming(model, staging, batches)
        int8 = quantize_and_measure(staging / "model.onnx", staging / "model.int8.onnx", full, labels)
        if not audio:
            shutil.copy(run_dir / "tokenizer.json", staging / "tokenizer.json")
        card = ModelCard(
            name=name,
            task="keyword_spotting" if audio else "text_classification",
            description=run["description"],
            labels=run["labels"],
            architecture={key: value for key, value in config.to_dict().items()
                          if key not in (("vocab_size", "embedding_dim", "pad_id") if audio else ("feature_dim",))},
            inputs=input_specs(config),
            outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", len(run["labels"])])],
            preprocessing=preprocessing,
            streaming=streaming,
            int8=int8,
            limits=Limits(**run.get("limits", {})),
            metrics=run["metrics"],
            seeds=run.get("seeds"),
            evaluations=run.get("evaluations", {}),
            baseline=run["baseline"],
            baseline_method=run["baseline_method"],
            data=run["data"],
            training_command=run["training_command"],
            training_seconds=run["training_seconds"],
            git_revision=run["git_revision"],
            export=ExportInfo(
                exporter=exporter, opset=opset, torch_version=torch.__version__,
                onnxruntime_version=onnxruntime.__version__, parity_max_abs_diff=float(f"{worst:.3g}"),
                parity_examples=sum(len(lengths) for _, lengths in batches[:-1]), parity_labels_identical=True,
            ),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        (staging / "model.json").write_text(card.model_dump_json(indent=2) + "\n")
        os.chmod(staging, 0o755)
        while True:
            version_dir = model_dir / str(next_version(model_dir))
            try:
                os.rename(staging, version_dir)
                break
            except OSError:
                if not version_dir.exists():
                    raise
        log.info("exported %s as %s (parity %.2e)", run_dir, version_dir, worst)
        return version_dir
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
