"""The whole path through the command line: quick train -> export -> serve -> examples/classify.py,
and the quick topic recipe (chunked whole articles, two seeds) served to both APIs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
RNNSERVE = [sys.executable, "-m", "serving"]


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT, **kwargs)


def _wait_for_port(process: subprocess.Popen, log_path: Path, deadline_s: float = 60) -> int:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        match = re.search(r"serving .* on 127\.0\.0\.1:(\d+)", log_path.read_text())
        if match:
            return int(match.group(1))
        assert process.poll() is None, f"server exited early:\n{log_path.read_text()}"
        time.sleep(0.2)
    raise AssertionError(f"server did not start:\n{log_path.read_text()}")


def test_train_export_serve_classify(tmp_path):
    trained = _run([*RNNSERVE, "train", "sentiment", "--quick", "--runs-dir", str(tmp_path / "runs")])
    assert trained.returncode == 0, trained.stderr
    run_dir = Path(re.search(r"run: (\S+)", trained.stdout).group(1))
    assert {"checkpoint.pt", "run.json", "tokenizer.json", "test.jsonl", "learning_curves.png"} <= {
        p.name for p in run_dir.iterdir()
    }

    models = tmp_path / "models"
    exported = _run([*RNNSERVE, "export", str(run_dir), "--models", str(models)])
    assert exported.returncode == 0, exported.stderr
    files = {p.name for p in (models / "sentiment" / "1").iterdir()}
    assert {"model.onnx", "step.onnx", "model.json", "tokenizer.json"} <= files
    assert files <= {"model.onnx", "step.onnx", "model.int8.onnx", "model.json", "tokenizer.json"}

    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [*RNNSERVE, "serve", "--models", str(models), "--host", "127.0.0.1", "--port", "0"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    try:
        port = _wait_for_port(server, log_path)
        classified = _run([sys.executable, "examples/classify.py", "--server", f"127.0.0.1:{port}",
                           "what a wonderful flight", "my bags were lost again"])
        assert classified.returncode == 0, classified.stderr
        lines = classified.stdout.strip().splitlines()
        assert len(lines) == 2
        for line, text in zip(lines, ["what a wonderful flight", "my bags were lost again"], strict=True):
            assert re.match(r"(negative|neutral|positive) +0\.\d{3}  \[negative 0\.\d{3}, neutral 0\.\d{3}, "
                            r"positive 0\.\d{3}\]  " + re.escape(text), line), line
        server.terminate()
        assert server.wait(timeout=30) == 0
        assert "shutting down" in log_path.read_text()
    finally:
        if server.poll() is None:
            server.kill()


def test_train_on_own_csv_and_serve_it(tmp_path):
    """`rnnserve train --data my.csv --name reviews --export-to DIR`, then the repository serves it."""
    import random

    from serving.dataplane import DataPlane
    from serving.repository import load_repository

    rng = random.Random(0)
    good, bad = ["great", "lovely", "superb", "fine"], ["awful", "broken", "late", "rude"]
    rows = ["text,label"]
    for _ in range(1500):
        label = rng.choice(["good", "bad"])
        words = rng.sample(good if label == "good" else bad, 2) + rng.sample(["the", "a", "service", "food"], 2)
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{label}")
    (tmp_path / "reviews.csv").write_text("\n".join(rows) + "\n")
    models = tmp_path / "models"
    trained = _run([*RNNSERVE, "train", "--data", str(tmp_path / "reviews.csv"), "--quick", "--epochs", "5",
                    "--runs-dir", str(tmp_path / "runs"), "--export-to", str(models)])
    assert trained.returncode == 0, trained.stderr
    model, predictions = DataPlane(load_repository(models)).classify_texts(
        "reviews", "", ["the food superb lovely", "rude service late"]
    )
    assert model.card.labels == ["bad", "good"]
    assert [p.label for p in predictions] == ["good", "bad"]


def test_train_without_task_or_data_is_refused(tmp_path):
    result = _run([*RNNSERVE, "train"])
    assert result.returncode == 2 and "name a bundled task or give --data" in result.stderr


@pytest.mark.slow
def test_quick_topic_recipe_trains_exports_and_serves_long_articles(tmp_path):
    """Two seeds of the quick topic recipe through `rnnserve train --export-to`, then a real server
    classifies an article longer than the default text limit by the typed API and KServe's `text`
    tensor, as ONNX Runtime does on the graph directly, and refuses to stream it."""
    import grpc
    import onnxruntime
    import tritonclient.grpc as triton

    from serving.grpc.client import RnnServeClient
    from serving.text import TextEncoder

    models = tmp_path / "models"
    trained = subprocess.run(
        [*RNNSERVE, "train", "topic", "--quick", "--seeds", "2", "--epochs", "1", "--embedding-init", "svd",
         "--runs-dir", str(tmp_path / "runs"), "--export-to", str(models)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert trained.returncode == 0, trained.stderr
    folder = models / "topic" / "1"
    assert not (folder / "step.onnx").exists()
    card = json.loads((folder / "model.json").read_text())
    assert card["architecture"]["chunk_tokens"] > 0 and card["streaming"] is None
    assert card["data"]["deduplication"]["exact_removed"] > 0
    assert card["seeds"]["seeds"] == [13, 14] and card["limits"]["max_text_chars"] > 4096
    assert card["export"]["parity_max_abs_diff"] <= 1e-4

    rows = [json.loads(line) for line in open(Path(card["seeds"]["per_seed"][0]["run"]) / "test.jsonl")]
    article = max((row["text"] for row in rows), key=len)
    assert len(article) > 4096
    encoder = TextEncoder.from_file(folder / "tokenizer.json", card["preprocessing"]["max_tokens"])
    input_ids, lengths = encoder.pad(encoder.token_ids([article]))
    assert input_ids.shape[1] > card["architecture"]["chunk_tokens"]  # more than one chunk
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": input_ids, "lengths": lengths})
    expected = card["labels"][int(logits.argmax())]

    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([*RNNSERVE, "serve", "--models", str(models), "--port", "0"],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        port = _wait_for_port(server, log_path, deadline_s=120)
        with RnnServeClient(f"127.0.0.1:{port}") as client:
            (result,) = client.classify("topic", [article])
            assert result.label == expected
            with pytest.raises(grpc.RpcError) as refused:
                list(client.stream("topic", ["some words"]))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "chunks" in refused.value.details()
        kserve = triton.InferenceServerClient(f"127.0.0.1:{port}")
        text = triton.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([article.encode()], dtype=object))
        answer = kserve.infer("topic", [text])
        assert answer.as_numpy("label")[0].decode() == expected
        kserve.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
