"""An LSTM or GRU sequence classifier over token ids, padding-invariant by construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
POOLINGS = ("last", "mean", "max")


@dataclass(frozen=True)
class ClassifierConfig:
    vocab_size: int
    num_classes: int
    cell: str = "lstm"
    embedding_dim: int = 128
    hidden_size: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.2
    # "last" reads the output at position length-1; "mean"/"max" pool over the
    # real (unpadded) positions only, so padding never changes a result.
    pooling: str = "last"
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {self.cell!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.bidirectional and self.pooling == "last":
            raise ValueError("pooling='last' needs a unidirectional model; use mean or max")

    def to_dict(self) -> dict:
        return asdict(self)


class RNNClassifier(nn.Module):
    """Embedding -> LSTM/GRU -> pooling over valid positions -> linear head."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_id)
        self.rnn = CELLS[config.cell](
            input_size=config.embedding_dim,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            bidirectional=config.bidirectional,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        directions = 2 if config.bidirectional else 1
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size * directions, config.num_classes)
        # Set while exporting: packed sequences do not export, so a bidirectional model runs
        # its RNN unpacked and export wires the ONNX operator's sequence_lens input instead,
        # which gives the backward direction the same start as packing does.
        self.exporting = False

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """input_ids int64 [B, T], lengths int64 [B] (>= 1) -> logits float32 [B, C]."""
        embedded = self.dropout(self.embedding(input_ids))
        if self.config.bidirectional and not self.exporting:
            packed = nn.utils.rnn.pack_padded_sequence(
                embedded, lengths.cpu(), batch_first=True, enforce_sorted=False
            )
            outputs, _ = nn.utils.rnn.pad_packed_sequence(
                self.rnn(packed)[0], batch_first=True, total_length=input_ids.shape[1]
            )
        else:
            outputs, _ = self.rnn(embedded)
        return self.head(self.dropout(self.pool(outputs, lengths)))

    def pool(self, outputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.config.pooling == "last":
            index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, outputs.shape[-1])
            return outputs.gather(1, index).squeeze(1)
        positions = torch.arange(outputs.shape[1], device=outputs.device).unsqueeze(0)
        valid = (positions < lengths.unsqueeze(1)).unsqueeze(-1)
        if self.config.pooling == "mean":
            total = (outputs * valid).sum(dim=1)
            return total / lengths.clamp(min=1).unsqueeze(1).to(outputs.dtype)
        return outputs.masked_fill(~valid, float("-inf")).amax(dim=1)
