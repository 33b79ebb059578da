"""The optimisation loop every task shares: AdamW with warmup and cosine decay, gradient
clipping by global norm, per-module gradient norms before clipping, early stopping on
validation macro-F1, best weights kept; DistributedDataParallel under torchrun.

Tasks supply how to build batches and how to score a batch; the loop does the rest.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import queue
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from training import distributed
from training.config import TrainConfig
from training.metrics import evaluation_metrics
from training.plots import plot_confusion_matrix, plot_gradient_norms, plot_learning_curves

log = logging.getLogger(__name__)

# (model as called for training, batch of example indices, rng) -> scalar loss; with
# prepare_batch, (model, what prepare_batch made of the batch, rng) -> scalar loss
BatchLoss = Callable[[nn.Module, np.ndarray, np.random.Generator], torch.Tensor]
# (batch of example indices, rng) -> the batch's data (inputs and targets), made ahead on a thread
PrepareBatch = Callable[[np.ndarray, np.random.Generator], object]


def made_ahead(make: Callable[[int], object], count: int, ahead: int = 2, name: str = "batches") -> Iterator:
    """make(0), ..., make(count - 1), made in order on a background thread, at most `ahead`
    ahead of the one taken: audio batches are numpy and scipy work that releases the interpreter
    lock, so they are made while the model trains on the ones before. An error there is raised
    here; a consumer that stops early stops the thread."""
    made: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                made.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False  # the consumer stopped taking them

    def produce():
        try:
            for index in range(count):
                if stop.is_set() or not hand_over(("made", make(index))):
                    return
        except BaseException as error:  # handed to the consumer, which raises it
            hand_over(("error", error))

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        for _ in range(count):
            kind, value = made.get()
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join()


@contextmanager
def core_left_free():
    """PyTorch on one thread fewer (at least one) while a made_ahead thread makes the batches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)
# (model, batch of example indices) -> (logits [n, C], labels [n]) for evaluation
BatchScores = Callable[[nn.Module, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


def predict(
    model: nn.Module, batches: list[np.ndarray], scores: BatchScores, count: int, context: distributed.Context
) -> tuple[float, np.ndarray]:
    """Mean loss and predicted class per example; each rank scores its share of the batches."""
    model.eval()
    predicted: list[tuple[np.ndarray, np.ndarray]] = []
    total_loss = 0.0
    with torch.no_grad():
        for index in batches[context.rank :: context.world_size]:
            logits, labels = scores(model, index)
            logits, labels = logits.cpu(), labels.cpu()
            total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            predicted.append((index, logits.argmax(dim=1).numpy()))
    predictions = np.empty(count, dtype=np.int64)
    gathered = distributed.gather_objects(context, (predicted, total_loss))
    for rank_predictions, _ in gathered:
        for index, values in rank_predictions:
            predictions[index] = values
    return sum(loss for _, loss in gathered) / max(count, 1), predictions


_RNN_LAYER = re.compile(r"_(l\d+(?:_reverse)?)$")


def _layer_of(name: str) -> str:
    """"rnn.weight_hh_l1" -> "rnn.l1", "rnn.bias_ih_l0_reverse" -> "rnn.l0_reverse", "head.bias" -> "head"."""
    module, _, parameter = name.partition(".")
    layer = _RNN_LAYER.search(parameter)
    return f"{module}.{layer.group(1)}" if layer else module


def gradient_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of the gradient per layer (each recurrent layer and direction, the embedding,
    the head), before clipping."""
    squares: dict[str, float] = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            layer = _layer_of(name)
            squares[layer] = squares.get(layer, 0.0) + float(parameter.grad.pow(2).sum())
    return {layer: math.sqrt(value) for layer, value in squares.items()}


def fit(
    model: nn.Module,
    config: TrainConfig,
    context: distributed.Context,
    task: str,
    label_names: list[str],
    train_batches: Callable[[np.random.Generator], list[np.ndarray]],
    batch_loss: BatchLoss,
    validation_batches: list[np.ndarray],
    validation_scores: BatchScores,
    validation_labels: np.ndarray,
    rng: np.random.Generator,
    progress: bool,
    prepare_batch: PrepareBatch | None = None,
) -> list[dict]:
    """Train until the epochs run out or validation macro-F1 stops improving; leaves the best
    weights in `model` and returns the per-epoch history. prepare_batch: each batch's data is
    made ahead on a background thread (made_ahead), in order and from `rng` as batch_loss
    would have drawn it, and batch_loss gets what it made."""
    trained = DistributedDataParallel(model) if context.enabled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    first_batches = train_batches(rng)
    steps_per_epoch = math.ceil(len(first_batches) / context.world_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = max(1, int(total_steps * config.warmup_fraction))

    def learning_rate_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    history: list[dict] = []
    best_f1, best_state, stale_epochs = -1.0, None, 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        losses, norms, clipped = [], [], 0
        batches = first_batches if epoch == 1 else train_batches(rng)
        # Every rank builds the same batch list (same seed); the sampler hands each rank its
        # share, padded to equal counts so the ranks step in lockstep.
        sampler = DistributedSampler(
            range(len(batches)), num_replicas=context.world_size, rank=context.rank, shuffle=True,
            seed=config.seed,
        )
        sampler.set_epoch(epoch)
        chosen = [batches[i] for i in sampler]
        source = chosen if prepare_batch is None else made_ahead(
            lambda i, chosen=chosen: prepare_batch(chosen[i], rng), len(chosen))
        bar = tqdm(source, total=len(chosen), desc=f"{task} epoch {epoch}/{config.epochs}",
                   disable=not progress, leave=False, unit="batch")
        with core_left_free() if prepare_batch is not None else nullcontext():
            for batch in bar:
                loss = batch_loss(trained, batch, rng)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norms.append(gradient_norms(model))
                if config.clip_grad_norm > 0:
                    total_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
                    clipped += int(total_norm > config.clip_grad_norm)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        validation_loss, predictions = predict(
            model, validation_batches, validation_scores, len(validation_labels), context
        )
        validation = evaluation_metrics("validation", validation_labels, predictions, label_names)
        history.append({
            "epoch": epoch,
            "train_loss": round(distributed.mean(context, float(np.mean(losses))), 4),
            "validation_loss": round(validation_loss, 4),
            "validation_accuracy": validation.accuracy,
            "validation_macro_f1": validation.macro_f1,
            "gradient_norm_median": {
                module: round(float(np.median([n[module] for n in norms if module in n])), 4)
                for module in norms[0]
            },
            "clipped_fraction": round(distributed.mean(context, clipped / max(len(losses), 1)), 4),
        })
        if context.is_main:
            log.info(
                "%s epoch %d: train loss %.3f, validation loss %.3f, accuracy %.3f, macro-F1 %.3f",
                task, epoch, history[-1]["train_loss"], validation_loss, validation.accuracy, validation.macro_f1,
            )
        if validation.macro_f1 > best_f1:
            best_f1, best_state, stale_epochs = validation.macro_f1, copy.deepcopy(model.state_dict()), 0
        else:
            stale_epochs += 1
            if stale_epochs >= config.patience:
                break
    model.load_state_dict(best_state)
    return history


def write_run(run_dir: Path, model: nn.Module, run: dict, label_names: list[str]) -> None:
    """checkpoint.pt (state_dict only), run.json and the PNG plots of a finished run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, run_dir / "checkpoint.pt")
    if run["history"] and "epoch" in run["history"][0]:  # epochs of `fit` (stream training has rounds)
        plot_learning_curves(run["history"], run_dir / "learning_curves.png")
        plot_gradient_norms(run["history"], run_dir / "gradient_norms.png")
    plot_confusion_matrix(run["metrics"]["confusion_matrix"], label_names, run_dir / "confusion_matrix.png")
    (run_dir / "run.json").write_text(json.dumps(run, indent=2))


def git_revision() -> str | None:
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision + ("-dirty" if dirty else "")
