"""PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime INT8, per bundled model, batch 1/8/32/128.

    python benchmarks/runtime.py [--repeats 3]

The PyTorch model is the training code's RNNClassifier with the bundled version's own
weights, read back from model.onnx (named initializers; the exporter's fused RNN biases are
split and their gates put back in PyTorch's order), and checked against ONNX Runtime before
anything is timed. Inputs: random token ids / log-mel frames of a realistic length (64
tokens, 49 frames = 1 s of audio), all rows full length. Every configuration is timed in the
same run, interleaved per repeat; one thread per runtime (torch.set_num_threads and ORT
intra_op_num_threads both 1) so the comparison is per core. Writes
benchmarks/results/runtime.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import summary, write_results  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parent.parent
BATCHES = (1, 8, 32, 128)
# ONNX gate order -> PyTorch gate order, as chunk indices of the 3H/4H axis.
GATES = {"LSTM": [0, 2, 3, 1], "GRU": [1, 0, 2]}


def torch_model(folder: Path):
    import onnx
    import torch
    from onnx import numpy_helper

    from training.models.classifier import ClassifierConfig, RNNClassifier

    card = json.loads((folder / "model.json").read_text())
    model = RNNClassifier(ClassifierConfig(**card["architecture"])).eval()
    graph = onnx.load(str(folder / "model.onnx")).graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state = {name: torch.from_numpy(initializers[name].copy()) for name in model.state_dict() if name in initializers}
    for layer, node in enumerate(n for n in graph.node if n.op_type in GATES):
        bias = initializers[node.input[3]][0]
        half = len(bias) // 2
        order = GATES[node.op_type]
        for part, name in ((bias[:half], f"rnn.bias_ih_l{layer}"), (bias[half:], f"rnn.bias_hh_l{layer}")):
            chunks = np.split(part, len(order))
            state[name] = torch.from_numpy(np.concatenate([chunks[i] for i in order]))
    if "head.weight" not in state:  # some exports keep the head as a transposed MatMul constant
        wanted = tuple(model.head.weight.shape[::-1])
        found = [v for v in initializers.values() if v.shape == wanted]
        if len(found) == 1:
            state["head.weight"] = torch.from_numpy(found[0].T.copy())
    missing = [name for name in model.state_dict() if name not in state]
    if missing:
        raise RuntimeError(f"{folder}: weights not found in model.onnx: {missing}")
    model.load_state_dict(state)
    return model, card


def inputs_for(card: dict, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if card["task"] == "keyword_spotting":
        features = rng.standard_normal((batch, 49, card["architecture"]["feature_dim"])).astype(np.float32) - 8
        return features, np.full(batch, 49, np.int64)
    ids = rng.integers(1, card["architecture"]["vocab_size"], size=(batch, 64), dtype=np.int64)
    return ids, np.full(batch, 64, np.int64)


def seconds_per_call(run, budget_s: float = 0.35) -> float:
    run()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < budget_s:
        run()
        calls += 1
    return (time.perf_counter() - started) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "runtime.json")
    args = parser.parse_args()
    import onnxruntime
    import torch

    torch.set_num_threads(1)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    rng = np.random.default_rng(0)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "onnxruntime": onnxruntime.__version__}, "threads": 1, "repeats": args.repeats, "models": {}}
    for folder in sorted((ROOT / "models").glob("*/1")):
        model, card = torch_model(folder)
        name = input_name = card["inputs"][0]["name"]
        sessions = {"onnxruntime fp32": onnxruntime.InferenceSession(str(folder / "model.onnx"), options)}
        if (folder / "model.int8.onnx").exists():
            sessions["onnxruntime int8"] = onnxruntime.InferenceSession(str(folder / "model.int8.onnx"), options)
        data, lengths = inputs_for(card, 32, rng)
        with torch.no_grad():
            eager = model(torch.from_numpy(data), torch.from_numpy(lengths)).numpy()
        ort = sessions["onnxruntime fp32"].run(["logits"], {input_name: data, "lengths": lengths})[0]
        parity = float(np.abs(eager - ort).max())
        if parity > 1e-3:
            raise RuntimeError(f"{folder}: PyTorch and ONNX Runtime disagree by {parity}")
        timings: dict[str, dict[int, list[float]]] = {k: {b: [] for b in BATCHES}
                                                      for k in ("pytorch eager", *sessions)}
        for _ in range(args.repeats):
            for batch in BATCHES:
                data, lengths = inputs_for(card, batch, rng)
                tensors = (torch.from_numpy(data), torch.from_numpy(lengths))

                def eager_call(model=model, tensors=tensors):
                    with torch.no_grad():
                        model(*tensors)

                timings["pytorch eager"][batch].append(batch / seconds_per_call(eager_call))
                for label, session in sessions.items():
                    feeds = {input_name: data, "lengths": lengths}
                    rate = batch / seconds_per_call(lambda session=session, feeds=feeds: session.run(["logits"], feeds))
                    timings[label][batch].append(rate)
        name = folder.parent.name
        report["models"][name] = {
            "pytorch_vs_onnx_max_abs_diff": parity,
            "rows_per_s": {label: {str(b): summary(v)
                                   for b, v in per.items()} for label, per in timings.items()},
        }
        for label, per in timings.items():
            cells = "  ".join(f"b{b}: {statistics.median(v):8.0f}" for b, v in per.items())
            print(f"{name:<10} {label:<17} rows/s  {cells}", flush=True)
    write_results(args.output, report)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
