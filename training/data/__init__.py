"""Data sets for the bundled models and for users' own data."""

from training.data.dataset import TextDataset
from training.data.splits import stratified_split

__all__ = ["TextDataset", "stratified_split"]
