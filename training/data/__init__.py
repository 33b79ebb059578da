"""Data sets for the bundled models and for users' own data."""

from training.data.dataset import TextDataset
from training.data.splits import predefined_split, stratified_split

__all__ = ["TextDataset", "predefined_split", "stratified_split"]
