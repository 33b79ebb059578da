"""The shared optimisation loop: batches made ahead on a background thread train exactly as
batches made inline do."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from training.config import TrainConfig
from training.distributed import Context
from training.loop import fit

FEATURES, CLASSES = 6, 3


def _data():
    generator = np.random.default_rng(0)
    inputs = generator.standard_normal((96, FEATURES)).astype(np.float32)
    return inputs, (inputs[:, 0] > 0).astype(np.int64) + (inputs[:, 1] > 1).astype(np.int64)


def _train(made_ahead: bool, tmp_path) -> tuple[dict, list[dict]]:
    inputs, labels = _data()
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, CLASSES)

    def prepare(index, rng):  # noise drawn from the loop's rng, as audio augmentation does
        noisy = inputs[index] + rng.standard_normal((len(index), FEATURES)).astype(np.float32) * 0.1
        return torch.from_numpy(noisy), torch.from_numpy(labels[index])

    def loss(trained, batch, rng):
        features, targets = batch if made_ahead else prepare(batch, rng)
        return nn.functional.cross_entropy(trained(features), targets)

    def scores(scored, rows):
        return scored(torch.from_numpy(inputs[rows])), torch.from_numpy(labels[rows])

    history = fit(model, TrainConfig(epochs=3, patience=5), Context(), "toy", ["a", "b", "c"],
                  train_batches=lambda rng: np.array_split(rng.permutation(len(inputs)), 6), batch_loss=loss,
                  validation_batches=[np.arange(len(inputs))], validation_scores=scores, validation_labels=labels,
                  rng=np.random.default_rng(1), progress=False, prepare_batch=prepare if made_ahead else None)
    return {name: value.clone() for name, value in model.state_dict().items()}, history


def test_batches_made_ahead_train_the_same_weights_as_batches_made_inline(tmp_path):
    threads = torch.get_num_threads()
    ahead, ahead_history = _train(True, tmp_path)
    inline, inline_history = _train(False, tmp_path)
    assert torch.get_num_threads() == threads  # the core left free is given back
    for name in inline:
        assert torch.equal(ahead[name], inline[name]), name
    assert [row["train_loss"] for row in ahead_history] == [row["train_loss"] for row in inline_history]
