"""Text preprocessing shared by serving and training: tokenize, truncate, pad."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


class TextEncoder:
    """Turns texts into the `input_ids` [B, T] and `lengths` [B] int64 tensors of a text model."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, pad_id: int = 0):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.pad_id = pad_id

    @classmethod
    def from_file(cls, path: Path, max_tokens: int, pad_id: int = 0) -> TextEncoder:
        return cls(Tokenizer.from_file(str(path)), max_tokens=max_tokens, pad_id=pad_id)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated to max_tokens (a text may give none)."""
        return [encoding.ids[: self.max_tokens] for encoding in self.tokenizer.encode_batch(texts)]

    def pad(self, token_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.fromiter((len(ids) for ids in token_ids), dtype=np.int64, count=len(token_ids))
        input_ids = np.full((len(token_ids), max(int(lengths.max(initial=0)), 1)), self.pad_id, np.int64)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = ids
        return input_ids, lengths
