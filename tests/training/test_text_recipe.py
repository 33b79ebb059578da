"""The text recipe of issue 2.4: duplicates removed before splitting, whole texts read in chunks,
embeddings from the training texts' SVD, several seeds chosen on validation, and a quick topic
run trained, exported and served through the command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data.dedup import find_duplicates
from training.embeddings import svd_embeddings
from training.models.classifier import ClassifierConfig, RNNClassifier
from training.train import choose_seed

ROOT = Path(__file__).resolve().parents[2]
RNNSERVE = [sys.executable, "-m", "serving"]
WORDS = ("market shares bank profit league match goal film actor album election minister vote phone software "
         "network court police rail oil price growth budget tax school health music award season coach").split()


def _articles(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 60)) + f" story {i}" for i in range(count)]


def test_dedup_finds_planted_exact_and_near_duplicates():
    texts = _articles(40)
    exact = "  " + texts[3].upper().replace(" ", "  ") + " !"  # case, spacing and punctuation only
    words = texts[7].split()
    near = " ".join(words[:30] + ["typo"] + words[31:] + ["extra"])  # one word changed, one added
    texts += [exact, near, texts[3]]
    result = find_duplicates(texts, threshold=0.9)
    assert (result.exact_removed, result.near_removed) == (2, 1)
    assert result.kept == list(range(40))
    assert result.summary()["examples_before"] == 43 and "kept" not in result.summary()


def test_dedup_keeps_different_texts_on_the_same_subject():
    texts = _articles(30, seed=1)
    assert find_duplicates(texts, threshold=0.9).kept == list(range(30))


@pytest.mark.parametrize("chunk_tokens", [1, 4, 7])
def test_chunked_encoder_gives_the_same_logits_alone_and_in_a_batch(chunk_tokens):
    torch.manual_seed(0)
    model = RNNClassifier(ClassifierConfig(
        num_classes=3, vocab_size=40, cell="gru", embedding_dim=8, hidden_size=6, pooling="max",
        chunk_tokens=chunk_tokens, embedding_dropout=0.1, weight_dropout=0.2,
    )).eval()
    lengths = torch.tensor([23, 1, 7, 8, 15])
    inputs = torch.zeros(5, 30, dtype=torch.int64)  # padded past the longest row too
    for row, length in enumerate(lengths):
        inputs[row, :length] = torch.randint(1, 40, (int(length),))
    with torch.no_grad():
        batched = model(inputs, lengths)
        for row, length in enumerate(lengths):
            alone = model(inputs[row : row + 1, :length], lengths[row : row + 1])
            assert torch.allclose(alone, batched[row : row + 1], atol=1e-6)


def test_chunked_model_does_not_stream():
    with pytest.raises(ValueError, match="unidirectional"):
        ClassifierConfig(num_classes=2, vocab_size=10, bidirectional=True, pooling="max", chunk_tokens=8)
    model = RNNClassifier(ClassifierConfig(num_classes=2, vocab_size=10, pooling="max", chunk_tokens=4))
    with pytest.raises(ValueError, match="whole"):
        model(torch.ones(1, 5, dtype=torch.int64), torch.tensor([5]), frames=True)


def test_svd_embeddings_are_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    token_ids = [rng.integers(2, 150, rng.integers(5, 40)).tolist() for _ in range(120)]
    first = svd_embeddings(token_ids, vocab_size=200, dim=16, seed=13)
    assert first.shape == (200, 16) and first.dtype == np.float32
    assert np.array_equal(first, svd_embeddings(token_ids, vocab_size=200, dim=16, seed=13))
    assert not first[0].any()  # padding
    assert abs(float(first[2:150].std()) - 1.0) < 0.1  # seen tokens: unit scale, like a random init
    assert float(np.abs(first[150:]).max()) < 1.0  # unseen tokens: small noise


def test_seeds_are_chosen_on_validation_and_summarised(tmp_path):
    runs = []
    for seed, validation_f1, test_accuracy in [(13, 0.90, 0.99), (14, 0.95, 0.90), (15, 0.93, 0.97)]:
        folder = tmp_path / str(seed)
        folder.mkdir()
        run = {"train_config": {"seed": seed}, "training_seconds": 10.0,
               "validation": {"epoch": 3, "accuracy": validation_f1, "macro_f1": validation_f1},
               "metrics": {"accuracy": test_accuracy, "macro_f1": test_accuracy - 0.01}}
        (folder / "run.json").write_text(json.dumps(run))
        runs.append(folder)
    chosen = choose_seed(runs)
    assert chosen == tmp_path / "14"  # the best validation score, although its test score is the worst
    summary = json.loads((chosen / "run.json").read_text())["seeds"]
    assert summary["seeds"] == [13, 14, 15] and summary["chosen_seed"] == 14
    assert summary["test_accuracy_mean"] == pytest.approx(0.9533, abs=1e-4)
    assert summary["test_accuracy_std"] == pytest.approx(float(np.std([0.99, 0.90, 0.97], ddof=1)), abs=1e-4)
    assert "seeds" not in json.loads((tmp_path / "13" / "run.json").read_text())


def _wait_for_port(process: subprocess.Popen, log_path: Path, deadline_s: float = 120) -> int:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        match = re.search(r"serving .* on 127\.0\.0\.1:(\d+)", log_path.read_text())
        if match:
            return int(match.group(1))
        assert process.poll() is None, f"server exited early:\n{log_path.read_text()}"
        time.sleep(0.2)
    raise AssertionError(f"server did not start:\n{log_path.read_text()}")


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
        port = _wait_for_port(server, log_path)
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
