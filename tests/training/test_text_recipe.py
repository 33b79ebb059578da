"""The text recipe: duplicates removed before splitting, whole texts read in chunks, embeddings
from the training texts' SVD, several seeds chosen on validation (the command line's quick topic
run is in tests/test_e2e.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.data.dedup import find_duplicates
from training.embeddings import svd_embeddings
from training.models.classifier import ClassifierConfig, RNNClassifier
from training.train import choose_seed

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


@pytest.mark.parametrize(("chunk_tokens", "pooling"), [(1, "max"), (4, "max_mean"), (7, "mean")])
def test_chunked_encoder_gives_the_same_logits_alone_and_in_a_batch(chunk_tokens, pooling):
    torch.manual_seed(0)
    model = RNNClassifier(ClassifierConfig(
        num_classes=3, vocab_size=40, cell="gru", embedding_dim=8, hidden_size=6, pooling=pooling,
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
    with pytest.raises(ValueError, match="batch-only"):
        ClassifierConfig(num_classes=2, vocab_size=10, pooling="max_mean")
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
