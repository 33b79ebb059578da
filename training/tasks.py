"""The bundled tasks: where their data comes from and the defaults they train with."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from training.config import TrainConfig
from training.data import AudioClips, TextDataset


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    # Loads the data; the argument asks for the small data set of --quick runs where the task
    # has one (generated audio), text tasks ignore it.
    load: Callable[[bool], TextDataset | AudioClips]
    modality: str = "text"
    model: dict = field(default_factory=dict)
    train: TrainConfig = TrainConfig()
    # Model overrides for --quick runs (a smaller network), and training overrides on top of
    # training.config.quick (fewer or shorter texts where the data is long).
    quick_model: dict = field(default_factory=dict)
    quick_train: dict = field(default_factory=dict)
    # Keyword spotting trained on synthesised continuous speech too (training/stream_training.py).
    continuous_speech: bool = False
    # Serving limits for the card (serving.card.Limits fields) where the defaults do not fit.
    limits: dict = field(default_factory=dict)


def _load_sentiment(quick: bool = False) -> TextDataset:
    from training.data.sentiment import load_sentiment

    return load_sentiment()


def _load_topic(quick: bool = False) -> TextDataset:
    from training.data.topic import load_topic

    return load_topic()


def cache_dir() -> Path:
    """Where generated data sets are kept: $RNNSERVE_CACHE, else ~/.cache/rnnserve."""
    return Path(os.environ.get("RNNSERVE_CACHE") or Path.home() / ".cache" / "rnnserve")


# Speakers synthesised for --quick keyword runs (the full set has every voice x variant).
QUICK_SPEAKERS = 60


def _load_keywords(quick: bool = False) -> AudioClips:
    from training.data.speech import generate_dataset, load_generated

    folder = generate_dataset(cache_dir() / "speech", speaker_limit=QUICK_SPEAKERS if quick else 0,
                              workers=os.cpu_count() or 1, progress=True)
    return load_generated(folder)


def _no_data(quick: bool = False) -> TextDataset:
    raise FileNotFoundError("custom training needs --data PATH")


TASKS: dict[str, TaskSpec] = {
    "sentiment": TaskSpec(
        name="sentiment",
        description="3-class sentiment (negative, neutral, positive) of short English texts such as "
        "tweets; unidirectional LSTM so that it can also stream",
        load=_load_sentiment,
        model={"cell": "lstm", "embedding_dim": 128, "hidden_size": 192, "num_layers": 1,
               "dropout": 0.3, "pooling": "max"},
        # Max pooling over time beat reading the last step (0.770 vs 0.749 test accuracy); the
        # model overfits after two or three epochs, hence the short schedule.
        train=TrainConfig(epochs=6, batch_size=64, learning_rate=3e-3, patience=2, max_tokens=64, vocab_size=8000),
        quick_model={"embedding_dim": 48, "hidden_size": 48},
    ),
    "topic": TaskSpec(
        name="topic",
        description="5-class news topic (business, entertainment, politics, sport, tech) of English "
        "news articles; GRU reading the whole article in chunks of 32 tokens, max and mean pooled; "
        "batch only (the chunks do not stream)",
        load=_load_topic,
        # Measured one step at a time on the deduplicated split (README, "The text recipe"): the
        # whole article in chunks with LSA-initialised embeddings learnt slowly under max pooling
        # (0.922 test after 4 epochs); max+mean pooling and a higher learning rate reached 0.976
        # validation in 2 epochs.
        model={"cell": "gru", "embedding_dim": 64, "hidden_size": 64, "num_layers": 1,
               "dropout": 0.3, "pooling": "max_mean", "chunk_tokens": 32, "embedding_dropout": 0.1},
        train=TrainConfig(epochs=8, batch_size=32, learning_rate=8e-3, patience=3, max_tokens=8192,
                          vocab_size=16000, dedup_threshold=0.9, embedding_init="svd"),
        quick_model={"embedding_dim": 32, "hidden_size": 32},
        quick_train={"max_train_examples": 300, "max_tokens": 1024},
        # Whole articles: the longest BBC article has 25,427 characters.
        limits={"max_text_chars": 32768},
    ),
    "keywords": TaskSpec(
        name="keywords",
        description="spoken keyword spotting (yes, no, up, down, left, right, on, off, stop, go, plus "
        "_silence_ and _unknown_) in 16 kHz audio; unidirectional LSTM over log-mel frames that "
        "reports after every 20 ms frame, trained on continuous synthesised speech so that it can "
        "listen to an endless stream where people talk",
        load=_load_keywords,
        modality="audio",
        # frame_head: the detector reads a head of its own, trained on streams only (README).
        model={"cell": "lstm", "hidden_size": 128, "num_layers": 2, "dropout": 0.1, "pooling": "frame_max",
               "frame_head": True},
        train=TrainConfig(epochs=12, batch_size=32, learning_rate=3e-3, patience=4),
        quick_model={"hidden_size": 32, "num_layers": 1},
        continuous_speech=True,
    ),
}


# Defaults for users' own data (`rnnserve train --data PATH --name NAME`).
CUSTOM = TaskSpec(
    name="custom",
    description="text classifier",
    load=_no_data,
    model={"cell": "lstm", "embedding_dim": 128, "hidden_size": 192, "num_layers": 1, "dropout": 0.3,
           "pooling": "max"},
    train=TrainConfig(epochs=10, batch_size=64, learning_rate=3e-3, patience=3, max_tokens=256, vocab_size=16000),
    quick_model={"embedding_dim": 32, "hidden_size": 32},
)

# Defaults for users' own Speech Commands folders (`rnnserve train --data FOLDER`).
CUSTOM_AUDIO = TaskSpec(
    name="custom",
    description="keyword spotter",
    load=_no_data,
    modality="audio",
    # Clips only (no continuous speech to train a frame head on): one head.
    model={k: v for k, v in TASKS["keywords"].model.items() if k != "frame_head"},
    train=TASKS["keywords"].train,
    quick_model=TASKS["keywords"].quick_model,
)
