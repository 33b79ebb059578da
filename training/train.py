"""The training loop for text classifiers: one run directory per run.

A run directory holds `checkpoint.pt` (state_dict only), `run.json` (model and
training config, metrics, baseline, data digest, history), `tokenizer.json`,
`test.jsonl` (the held-out split, used again by export for parity) and PNG plots.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from serving.text import TextEncoder
from training import distributed
from training.baseline import BASELINE_METHOD, tfidf_baseline
from training.config import TrainConfig
from training.data import TextDataset, predefined_split, stratified_split
from training.data.dedup import find_duplicates
from training.embeddings import EMBEDDING_INITS, svd_embeddings
from training.loop import fit, git_revision, predict, write_run
from training.metrics import evaluation_metrics
from training.models.classifier import ClassifierConfig, RNNClassifier
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


def train_text_classifier(
    task: str,
    description: str,
    dataset: TextDataset,
    model_overrides: dict,
    config: TrainConfig,
    runs_dir: Path,
    command: str,
    progress: bool = True,
    limits: dict | None = None,
) -> Path | None:
    """Train, evaluate against the baseline on the same split, and write a run directory.

    With config.dedup_threshold, duplicate texts are removed before splitting. With
    config.seeds > 1, one run directory per seed is written on the same split and the one
    chosen on validation is returned, its run.json holding every seed's scores. `limits`
    (serving.card.Limits fields) go into run.json for the card.

    Under torchrun every rank trains on its shard of each epoch's batches (DistributedSampler)
    with DistributedDataParallel; losses and metrics are reduced across ranks and only rank 0
    writes the run directory (the other ranks return None).
    """
    if config.embedding_init not in EMBEDDING_INITS:
        raise ValueError(f"embedding_init must be one of {EMBEDDING_INITS}, got {config.embedding_init!r}")
    context = distributed.setup()
    try:
        deduplication = None
        if config.dedup_threshold > 0:
            deduplication = find_duplicates(dataset.texts, config.dedup_threshold)
            dataset = dataset.subset(deduplication.kept)
            if context.is_main:
                log.info("removed %d exact and %d near duplicates (cosine >= %g) of %d texts",
                         deduplication.exact_removed, deduplication.near_removed, config.dedup_threshold,
                         deduplication.examples_before)
        run_dirs = []
        for seed in range(config.seed, config.seed + max(config.seeds, 1)):
            run_dirs.append(_train(task, description, dataset, model_overrides, replace(config, seed=seed), runs_dir,
                                   command, progress and context.is_main, context, deduplication, limits))
        if not context.is_main:
            return None
        return choose_seed(run_dirs) if len(run_dirs) > 1 else run_dirs[0]
    finally:
        distributed.teardown(context)


def _train(task, description, dataset, model_overrides, config, runs_dir, command, progress, context, deduplication,
           limits):
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)

    if dataset.parts is not None:
        split = predefined_split(dataset.parts)
        method = "predefined"
    else:
        split = stratified_split(dataset.labels, seed=config.split_seed)
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
    model = RNNClassifier(model_config)
    if config.embedding_init == "svd":
        table = svd_embeddings(train_split.token_ids, model_config.vocab_size, model_config.embedding_dim,
                               seed=config.seed, pad_id=PAD_ID)
        with torch.no_grad():
            model.embedding.weight.copy_(torch.from_numpy(table))
    model = model.to(context.device)

    def scores(split: EncodedSplit):
        def score(scored_model, index):
            input_ids, lengths, labels = (t.to(context.device) for t in _tensors(encoder, split, index))
            return scored_model(input_ids, lengths), labels
        return score

    def batch_loss(trained_model, index, _rng):
        logits, labels = scores(train_split)(trained_model, index)
        return nn.functional.cross_entropy(logits, labels)

    history = fit(
        model, config, context, task, dataset.label_names,
        train_batches=lambda epoch_rng: train_split.batches(config.batch_size, epoch_rng),
        batch_loss=batch_loss,
        validation_batches=validation_split.batches(config.batch_size * 4, rng=None),
        validation_scores=scores(validation_split), validation_labels=validation_split.labels,
        rng=rng, progress=progress,
    )
    _, test_predictions = predict(
        model, test_split.batches(config.batch_size * 4, rng=None), scores(test_split), len(test_split.labels),
        context,
    )
    if not context.is_main:
        return None
    test_metrics = evaluation_metrics("test", test_split.labels, test_predictions, dataset.label_names)
    baseline = tfidf_baseline(train_data, test_data, seed=config.seed)

    run_dir = runs_dir / task / datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    run_dir.mkdir(parents=True)
    tokenizer.save(str(run_dir / "tokenizer.json"))
    with open(run_dir / "test.jsonl", "w") as handle:
        for text, label in zip(test_data.texts, test_data.labels, strict=True):
            handle.write(json.dumps({"text": text, "label": dataset.label_names[label]}) + "\n")
    run = {
        "task": task,
        "description": description,
        "labels": dataset.label_names,
        "model_config": model_config.to_dict(),
        "train_config": asdict(config),
        "metrics": test_metrics.model_dump(),
        "baseline": baseline.model_dump(),
        "baseline_method": BASELINE_METHOD,
        "validation": best_validation(history),
        "data": {
            "source": dataset.source,
            "digest": dataset.digest(),
            "examples": len(dataset),
            "deduplication": deduplication.summary() if deduplication else None,
            "split": {
                "method": method,
                "seed": split.seed,
                "fractions": list(split.fractions),
                "train": len(train_data),
                "validation": len(validation_data),
                "test": len(test_data),
            },
        },
        "limits": limits or {},
        "training_command": command,
        "training_seconds": round(time.perf_counter() - started, 1),
        "world_size": context.world_size,
        "git_revision": git_revision(),
        "history": history,
    }
    write_run(run_dir, model, run, dataset.label_names)
    return run_dir



def best_validation(history: list[dict]) -> dict:
    """Validation accuracy and macro-F1 of the epoch whose weights were kept (the best macro-F1)."""
    best = max(history, key=lambda epoch: epoch["validation_macro_f1"])
    return {"epoch": best["epoch"], "accuracy": best["validation_accuracy"], "macro_f1": best["validation_macro_f1"]}


def choose_seed(run_dirs: list[Path]) -> Path:
    """The run with the best validation macro-F1 (then accuracy, then the lower seed), its
    run.json given the summary of every seed: validation and test metrics per seed, their
    means and standard deviations. Test scores play no part in the choice."""
    runs = [json.loads((run_dir / "run.json").read_text()) for run_dir in run_dirs]
    chosen = max(range(len(runs)), key=lambda i: (runs[i]["validation"]["macro_f1"],
                                                  runs[i]["validation"]["accuracy"], -i))
    per_seed = [{
        "seed": run["train_config"]["seed"],
        "run": str(run_dir),
        "validation_accuracy": run["validation"]["accuracy"],
        "validation_macro_f1": run["validation"]["macro_f1"],
        "test_accuracy": run["metrics"]["accuracy"],
        "test_macro_f1": run["metrics"]["macro_f1"],
    } for run_dir, run in zip(run_dirs, runs, strict=True)]
    summary = {"seeds": [row["seed"] for row in per_seed], "chosen_seed": per_seed[chosen]["seed"],
               "chosen_on": "validation macro-F1, then validation accuracy"}
    for key in ("validation_accuracy", "validation_macro_f1", "test_accuracy", "test_macro_f1"):
        values = np.array([row[key] for row in per_seed])
        summary[f"{key}_mean"] = round(float(values.mean()), 4)
        summary[f"{key}_std"] = round(float(values.std(ddof=1)), 4)
    summary["training_seconds_total"] = round(sum(run["training_seconds"] for run in runs), 1)
    summary["per_seed"] = per_seed
    run = dict(runs[chosen], seeds=summary)
    (run_dirs[chosen] / "run.json").write_text(json.dumps(run, indent=2))
    log.info("seeds %s: test accuracy %.4f +- %.4f, chose seed %d on validation", summary["seeds"],
             summary["test_accuracy_mean"], summary["test_accuracy_std"], summary["chosen_seed"])
    return run_dirs[chosen]
