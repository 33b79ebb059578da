"""Training configuration: frozen dataclasses, plain data (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    # Clip the global gradient norm to this value; 0 disables clipping.
    clip_grad_norm: float = 1.0
    # Stop after this many epochs without a better validation macro-F1.
    patience: int = 3
    seed: int = 13
    # The train/validation/test split's seed, fixed whatever the training seed, so that runs of
    # several seeds are scored on the same test texts.
    split_seed: int = 13
    # Train this many seeds (seed, seed + 1, ...) on the same split and keep the one with the
    # best validation macro-F1; run.json and the card report all of them (mean and std).
    seeds: int = 1
    # Remove exact copies and near copies (TF-IDF cosine >= this) before splitting; 0 keeps all.
    dedup_threshold: float = 0.0
    # "random", or "svd": the embedding table starts from the training texts' latent semantic
    # analysis (training.embeddings).
    embedding_init: str = "random"
    max_tokens: int = 64
    vocab_size: int = 8000
    # Train on at most this many examples (quick runs); 0 uses the whole split.
    max_train_examples: int = 0


def quick(config: TrainConfig) -> TrainConfig:
    """A seconds-long run for tests and smoke checks."""
    return replace(config, epochs=2, max_train_examples=6000, vocab_size=3000, patience=2)
