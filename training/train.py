"""The training loop for text classifiers: one run directory per run.

A run directory holds `checkpoint.pt` (state_dict only), `run.json` (model and
training config, metrics, baseline, data digest, history), `tokenizer.json`,
`test.jsonl` (the held-out split, used again by export for parity) and PNG plots.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from serving.text import TextEncoder
from training import distributed
from training.baseline import BASELINE_METHOD, tfidf_baseline
from training.config import TrainConfig
from training.data import TextDataset, predefined_split, stratified_split
from training.metrics import evaluation_metrics
from training.models.classifier import ClassifierConfig, RNNClassifier
from training.plots import plot_confusion_matrix, plot_learning_curves
from training.tokenizer import PAD_ID, train_tokenizer

log = logging.getLogger(__name__)


@dataclass
class EncodedSplit:
    token_ids: list[list[int]]
    labels: np.ndarray

    def batches(self, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
        """Index batches of similar lengths (little padding); shuffled when rng is given."""
        order = np.arange(len(self.labels))
        if rng is not None:
            rng.shuffle(order)
        lengths = np.array([len(ids) for ids in self.token_ids])
        pool = batch_size * 50
        chunks = [order[i : i + pool] for i in range(0, len(order), pool)]
        sorted_order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")] for chunk in chunks])
        batches = [sorted_order[i : i + batch_size] for i in range(0, len(sorted_order), batch_size)]
        if rng is not None:
            rng.shuffle(batches)
        return batches


def _encode(encoder: TextEncoder, data: TextDataset) -> tuple[EncodedSplit, TextDataset]:
    """Encode a split, dropping texts that give no token (the server rejects those too)."""
    token_ids = encoder.token_ids(data.texts)
    keep = [i for i, ids in enumerate(token_ids) if ids]
    kept = data.subset(keep)
    return EncodedSplit([token_ids[i] for i in keep], np.asarray(kept.labels)), kept


def _tensors(encoder: TextEncoder, split: EncodedSplit, index: np.ndarray):
    input_ids, lengths = encoder.pad([split.token_ids[i] for i in index])
    return torch.from_numpy(input_ids), torch.from_numpy(lengths), torch.from_numpy(split.labels[index])


def _evaluate(
    model, encoder, split: EncodedSplit, batch_size: int, context: distributed.Context
) -> tuple[float, np.ndarray]:
    """Mean loss and predictions over the whole split; each rank scores its share of batches."""
    model.eval()
    predicted: list[tuple[np.ndarray, np.ndarray]] = []
    total_loss = 0.0
    with torch.no_grad():
        for index in split.batches(batch_size * 4, rng=None)[context.rank :: context.world_size]:
            input_ids, lengths, labels = _tensors(encoder, split, index)
            logits = model(input_ids.to(context.device), lengths.to(context.device)).cpu()
            total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            predicted.append((index, logits.argmax(dim=1).numpy()))
    predictions = np.empty(len(split.labels), dtype=np.int64)
    gathered = distributed.gather_objects(context, (predicted, total_loss))
    for rank_predictions, _ in gathered:
        for index, values in rank_predictions:
            predictions[index] = values
    return sum(loss for _, loss in gathered) / max(len(split.labels), 1), predictions


def _gradient_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of the gradient per top-level module, before clipping."""
    squares: dict[str, float] = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            module = name.split(".")[0]
            squares[module] = squares.get(module, 0.0) + float(parameter.grad.pow(2).sum())
    return {module: math.sqrt(value) for module, value in squares.items()}


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


def train_text_classifier(
    task: str,
    description: str,
    dataset: TextDataset,
    model_overrides: dict,
    config: TrainConfig,
    runs_dir: Path,
    command: str,
    progress: bool = True,
) -> Path | None:
    """Train, evaluate against the baseline on the same split, and write a run directory.

    Under torchrun every rank trains on its shard of each epoch's batches (DistributedSampler)
    with DistributedDataParallel; losses and metrics are reduced across ranks and only rank 0
    writes the run directory (the other ranks return None).
    """
    started = time.perf_counter()
    context = distributed.setup()
    try:
        return _train(task, description, dataset, model_overrides, config, runs_dir, command,
                      progress and context.is_main, context, started)
    finally:
        distributed.teardown(context)


def _train(task, description, dataset, model_overrides, config, runs_dir, command, progress, context, started):
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)

    if dataset.parts is not None:
        split = predefined_split(dataset.parts)
        method = "predefined"
    else:
        split = stratified_split(dataset.labels, seed=config.seed)
        method = "stratified"
    train_data = dataset.subset(split.train)
    if config.max_train_examples and len(train_data) > config.max_train_examples:
        chosen = np.sort(rng.choice(len(train_data), config.max_train_examples, replace=False))
        train_data = train_data.subset(chosen.tolist())
    validation_data, test_data = dataset.subset(split.validation), dataset.subset(split.test)

    # One tokenizer for all ranks: rank 0 trains it, the others receive it.
    tokenizer_json = train_tokenizer(train_data.texts, config.vocab_size).to_str() if context.is_main else None
    tokenizer = Tokenizer.from_str(distributed.broadcast_object(context, tokenizer_json))
    encoder = TextEncoder(tokenizer, max_tokens=config.max_tokens, pad_id=PAD_ID)
    train_split, train_data = _encode(encoder, train_data)
    validation_split, validation_data = _encode(encoder, validation_data)
    test_split, test_data = _encode(encoder, test_data)
    if context.is_main:
        log.info("train %d, validation %d, test %d examples", len(train_data), len(validation_data), len(test_data))

    model_config = ClassifierConfig(
        vocab_size=tokenizer.get_vocab_size(), num_classes=len(dataset.label_names), pad_id=PAD_ID,
        **model_overrides,
    )
    model = RNNClassifier(model_config).to(context.device)
    trained = DistributedDataParallel(model) if context.enabled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size / context.world_size)
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
        batches = train_split.batches(config.batch_size, rng)
        # Every rank builds the same batch list (same seed); the sampler hands each rank its
        # share, padded to equal counts so the ranks step in lockstep.
        sampler = DistributedSampler(
            range(len(batches)), num_replicas=context.world_size, rank=context.rank, shuffle=True,
            seed=config.seed,
        )
        sampler.set_epoch(epoch)
        bar = tqdm(
            [batches[i] for i in sampler], desc=f"{task} epoch {epoch}/{config.epochs}",
            disable=not progress, leave=False, unit="batch",
        )
        for index in bar:
            input_ids, lengths, labels = (t.to(context.device) for t in _tensors(encoder, train_split, index))
            loss = nn.functional.cross_entropy(trained(input_ids, lengths), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norms.append(_gradient_norms(model))
            if config.clip_grad_norm > 0:
                total_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
                clipped += int(total_norm > config.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        validation_loss, predictions = _evaluate(model, encoder, validation_split, config.batch_size, context)
        validation = evaluation_metrics("validation", validation_split.labels, predictions, dataset.label_names)
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
    _, test_predictions = _evaluate(model, encoder, test_split, config.batch_size, context)
    if not context.is_main:
        return None
    test_metrics = evaluation_metrics("test", test_split.labels, test_predictions, dataset.label_names)
    baseline = tfidf_baseline(train_data, test_data, seed=config.seed)

    run_dir = runs_dir / task / datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    run_dir.mkdir(parents=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, run_dir / "checkpoint.pt")
    tokenizer.save(str(run_dir / "tokenizer.json"))
    with open(run_dir / "test.jsonl", "w") as handle:
        for text, label in zip(test_data.texts, test_data.labels, strict=True):
            handle.write(json.dumps({"text": text, "label": dataset.label_names[label]}) + "\n")
    plot_learning_curves(history, run_dir / "learning_curves.png")
    plot_confusion_matrix(test_metrics.confusion_matrix, dataset.label_names, run_dir / "confusion_matrix.png")
    run = {
        "task": task,
        "description": description,
        "labels": dataset.label_names,
        "model_config": model_config.to_dict(),
        "train_config": asdict(config),
        "metrics": test_metrics.model_dump(),
        "baseline": baseline.model_dump(),
        "baseline_method": BASELINE_METHOD,
        "data": {
            "source": dataset.source,
            "digest": dataset.digest(),
            "examples": len(dataset),
            "split": {
                "method": method,
                "seed": split.seed,
                "fractions": list(split.fractions),
                "train": len(train_data),
                "validation": len(validation_data),
                "test": len(test_data),
            },
        },
        "training_command": command,
        "training_seconds": round(time.perf_counter() - started, 1),
        "world_size": context.world_size,
        "git_revision": git_revision(),
        "history": history,
    }
    (run_dir / "run.json").write_text(json.dumps(run, indent=2))
    return run_dir

