"""An LSTM or GRU sequence classifier over token ids (text) or feature frames (audio),
padding-invariant by construction."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
POOLINGS = ("last", "mean", "max", "max_mean", "frame_max")


@dataclass(frozen=True)
class ClassifierConfig:
    num_classes: int
    # Text models embed token ids from a vocabulary; audio models read feature_dim floats per
    # frame (normalised by per-feature statistics stored in the model). Exactly one is set.
    vocab_size: int = 0
    feature_dim: int = 0
    cell: str = "lstm"
    embedding_dim: int = 128
    hidden_size: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.2
    # "last" reads the output at position length-1; "mean"/"max" pool the RNN outputs over the
    # real (unpadded) positions only, so padding never changes a result; "frame_max" applies the
    # head to every frame and takes each class's largest logit over the real positions (a
    # keyword spotter's per-frame scores, pooled over a clip); "max_mean" concatenates the max and
    # the mean (the mean's gradient reaches every position, the max's only the largest) in
    # batch-only models.
    pooling: str = "last"
    pad_id: int = 0
    # Text read in independent chunks of this many tokens through the one recurrent encoder,
    # pooled over all real positions of all chunks: a long text costs chunk_tokens sequential
    # steps rather than its length. 0 reads the text as one sequence. Chunked models do not
    # stream (a stream's state would run across chunk borders).
    chunk_tokens: int = 0
    # AWD-LSTM regularisation, training only: drop whole rows of the embedding table (every
    # occurrence of a token in a batch at once), and DropConnect on the hidden-to-hidden weights.
    embedding_dropout: float = 0.0
    weight_dropout: float = 0.0
    # A second linear head for the per-frame scores a stream's detector reads (forward with
    # frames=True, step.onnx's frame_logits), beside the head that frame_max pools over a clip
    # (model.onnx, step.onnx's logits). Both read the same recurrent outputs. Without it the one
    # head does both, and the clip objective's frame maximum pulls the detector's scores early.
    frame_head: bool = False

    def __post_init__(self) -> None:
        if (self.vocab_size > 0) == (self.feature_dim > 0):
            raise ValueError("set exactly one of vocab_size (text) and feature_dim (audio)")
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {self.cell!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.bidirectional and self.pooling in ("last", "frame_max"):
            raise ValueError(f"pooling={self.pooling!r} needs a unidirectional model; use mean or max")
        pools_positions = self.pooling in ("mean", "max", "max_mean")
        if self.chunk_tokens < 0 or (self.chunk_tokens and not (self.vocab_size and pools_positions)):
            raise ValueError("chunk_tokens needs a text model with mean, max or max_mean pooling")
        if self.pooling == "max_mean" and not (self.bidirectional or self.chunk_tokens):
            raise ValueError("pooling='max_mean' is for batch-only (bidirectional or chunked) models")
        if self.chunk_tokens and self.bidirectional:
            raise ValueError("chunk_tokens needs a unidirectional model")
        if self.frame_head and self.pooling != "frame_max":
            raise ValueError("frame_head needs pooling='frame_max'")

    def to_dict(self) -> dict:
        return asdict(self)


class RNNClassifier(nn.Module):
    """Embedding (text) or feature normalisation (audio) -> LSTM/GRU -> pooling over valid
    positions -> linear head."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        if config.vocab_size:
            self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_id)
            input_size = config.embedding_dim
        else:
            # Training statistics of the features, set before training and saved with the weights.
            self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
            self.register_buffer("feature_std", torch.ones(config.feature_dim))
            input_size = config.feature_dim
        self.rnn = CELLS[config.cell](
            input_size=input_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            bidirectional=config.bidirectional,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        directions = 2 if config.bidirectional else 1
        self.dropout = nn.Dropout(config.dropout)
        pooled = 2 if config.pooling == "max_mean" else 1
        self.head = nn.Linear(config.hidden_size * directions * pooled, config.num_classes)
        # A copy of the head (no random draw, so the clip stage trains as it does without one);
        # the stream stage starts it from the trained clip head (begin_frame_head).
        self.frame_head = copy.deepcopy(self.head) if config.frame_head else None
        # Set while exporting: packed sequences do not export, so a bidirectional model runs
        # its RNN unpacked and export wires the ONNX operator's sequence_lens input instead,
        # which gives the backward direction the same start as packing does.
        self.exporting = False

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor, frames: bool = False,
                head: str = "frame") -> torch.Tensor:
        """inputs: token ids int64 [B, T] or features float32 [B, T, F]; lengths int64 [B] (>= 1)
        -> logits float32 [B, C].

        frames=True (unidirectional models) gives logits after every step instead, [B, T, C]:
        with head="frame", what a stream's detector reads after each step, whatever the pooling;
        with head="clip", the per-frame logits frame_max pools (the same unless frame_head).
        """
        embedded = self.encode(inputs)
        if frames:
            if self.config.bidirectional or self.config.chunk_tokens:
                raise ValueError("per-step outputs need a unidirectional model that reads its input whole")
            return self.scores(self.dropout(self.recur(embedded)[0]), head)
        if self.config.pooling == "frame_max":
            frame_logits = self.head(self.dropout(self.recur(embedded)[0]))
            return self.pool(frame_logits, lengths, "max")
        if self.config.chunk_tokens:
            outputs = self.recur_chunks(embedded)
        elif self.config.bidirectional and not self.exporting:
            packed = nn.utils.rnn.pack_padded_sequence(
                embedded, lengths.cpu(), batch_first=True, enforce_sorted=False
            )
            outputs, _ = nn.utils.rnn.pad_packed_sequence(
                self.recur(packed)[0], batch_first=True, total_length=inputs.shape[1]
            )
        else:
            outputs, _ = self.recur(embedded)
        return self.head(self.dropout(self.pool(outputs, lengths, self.config.pooling)))

    def scores(self, outputs: torch.Tensor, head: str = "frame") -> torch.Tensor:
        """Per-step logits of recurrent outputs [B, T, D]: the detector's ("frame") or the ones
        frame_max pools over a clip ("clip")."""
        if head not in ("frame", "clip"):
            raise ValueError(f"head must be 'frame' or 'clip', got {head!r}")
        return (self.frame_head if head == "frame" and self.frame_head is not None else self.head)(outputs)

    def begin_frame_head(self) -> None:
        """Start the frame head from the clip head's weights (before training on streams)."""
        if self.frame_head is not None:
            self.frame_head.load_state_dict(self.head.state_dict())

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Token embeddings or normalised features [B, T, input size], before the RNN."""
        if not self.config.vocab_size:
            return self.dropout((inputs - self.feature_mean) / self.feature_std)
        rate = self.config.embedding_dropout
        if self.training and rate:
            table = self.embedding.weight
            keep = torch.empty(table.shape[0], 1, device=table.device).bernoulli_(1 - rate) / (1 - rate)
            return self.dropout(nn.functional.embedding(inputs, table * keep, self.config.pad_id))
        return self.dropout(self.embedding(inputs))

    def recur(self, inputs, initial=None):
        """The recurrent layers, with DropConnect on their hidden-to-hidden weights in training."""
        rate = self.config.weight_dropout
        arguments = (inputs,) if initial is None else (inputs, initial)
        if not (self.training and rate):
            return self.rnn(*arguments)
        dropped = {name: nn.functional.dropout(weight, rate) for name, weight in self.rnn.named_parameters()
                   if name.startswith("weight_hh")}
        return torch.func.functional_call(self.rnn, dropped, arguments)

    def recur_chunks(self, embedded: torch.Tensor) -> torch.Tensor:
        """[B, T, E] -> RNN outputs [B, T, D], each run of chunk_tokens positions read on its
        own from a zero state. Chunks start at fixed positions, so padding at the end of a row
        never changes its real positions' outputs."""
        size = self.config.chunk_tokens
        batch, time, width = embedded.shape
        chunks = (time + size - 1) // size
        padded = nn.functional.pad(embedded, (0, 0, 0, chunks * size - time))
        outputs, _ = self.recur(padded.reshape(batch * chunks, size, width))
        return outputs.reshape(batch, chunks * size, outputs.shape[-1])[:, :time]

    @staticmethod
    def pool(outputs: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
        """[B, T, D] -> [B, D] over the first `lengths` steps of each row."""
        if pooling == "last":
            index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, outputs.shape[-1])
            return outputs.gather(1, index).squeeze(1)
        if pooling == "max_mean":
            pools = [RNNClassifier.pool(outputs, lengths, "max"), RNNClassifier.pool(outputs, lengths, "mean")]
            return torch.cat(pools, dim=-1)
        positions = torch.arange(outputs.shape[1], device=outputs.device).unsqueeze(0)
        valid = (positions < lengths.unsqueeze(1)).unsqueeze(-1)
        if pooling == "mean":
            total = (outputs * valid).sum(dim=1)
            return total / lengths.clamp(min=1).unsqueeze(1).to(outputs.dtype)
        return outputs.masked_fill(~valid, float("-inf")).amax(dim=1)
