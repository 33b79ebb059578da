"""Data sets for the bundled models and for users' own data."""

from training.data.dataset import AudioClips, TextDataset
from training.data.splits import predefined_split, stratified_split

__all__ = ["AudioClips", "TextDataset", "predefined_split", "stratified_split"]
