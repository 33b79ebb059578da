"""The streaming graph `step.onnx` of a unidirectional classifier: one chunk plus the state the
model carries across time in, running outputs plus the updated state out.

State tensors put the batch axis first, so a server can stack the states of many streams
into one call and split them again without knowing what they hold:

- `state_h` [B, layers, hidden] (and `state_c` for LSTM): the recurrent state;
- the running pooling statistic, if the model pools: `state_max` [B, hidden] for max
  pooling, `state_sum` [B, hidden] and `state_count` [B, 1] for mean pooling, `state_max`
  [B, classes] for frame_max pooling. "last" needs none.

Outputs: `logits` [B, C] (the prediction for everything streamed so far, equal to model.onnx on
the whole sequence), `frame_logits` [B, T, C] (the scores after each step of this chunk, from the
frame head where the model has one; rows past a row's length are not meaningful) and
`<state>_out` for every state input.

A row of a chunk may be shorter than the chunk (`lengths`): export wires the lengths into the
recurrent operators' sequence_lens input, so each row's state stops at its own last step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from training.models.classifier import RNNClassifier

# Initial value of running maxima: the lowest float32, so the first real step always wins.
LOWEST = float(torch.finfo(torch.float32).min)


@dataclass(frozen=True)
class StateTensor:
    name: str
    shape: tuple[int, ...]  # per stream (the batch axis comes first and is not listed)
    initial: float

    @property
    def output(self) -> str:
        return f"{self.name}_out"


def state_tensors(model: RNNClassifier) -> list[StateTensor]:
    c = model.config
    if c.bidirectional:
        raise ValueError("only unidirectional models stream")
    states = [StateTensor("state_h", (c.num_layers, c.hidden_size), 0.0)]
    if c.cell == "lstm":
        states.append(StateTensor("state_c", (c.num_layers, c.hidden_size), 0.0))
    if c.pooling == "max":
        states.append(StateTensor("state_max", (c.hidden_size,), LOWEST))
    elif c.pooling == "mean":
        states += [StateTensor("state_sum", (c.hidden_size,), 0.0), StateTensor("state_count", (1,), 0.0)]
    elif c.pooling == "frame_max":
        states.append(StateTensor("state_max", (c.num_classes,), LOWEST))
    return states


class StepModel(nn.Module):
    """Wraps a trained unidirectional RNNClassifier as one streaming step (eval mode)."""

    def __init__(self, model: RNNClassifier):
        super().__init__()
        self.model = model
        self.states = state_tensors(model)
        # Exporters restore the training flag they found: keep it off for the wrapped model too.
        self.eval()

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor, *states: torch.Tensor):
        model, config = self.model, self.model.config
        named = dict(zip((s.name for s in self.states), states, strict=True))
        initial_h = named["state_h"].transpose(0, 1).contiguous()
        embedded = model.encode(inputs)
        if config.cell == "lstm":
            outputs, (h, c) = model.rnn(embedded, (initial_h, named["state_c"].transpose(0, 1).contiguous()))
            updated = [h.transpose(0, 1), c.transpose(0, 1)]
        else:
            outputs, h = model.rnn(embedded, initial_h)
            updated = [h.transpose(0, 1)]
        frame_logits = model.scores(outputs, "frame")
        positions = torch.arange(outputs.shape[1], device=outputs.device).unsqueeze(0)
        valid = (positions < lengths.unsqueeze(1)).unsqueeze(-1)
        if config.pooling == "last":
            logits = model.head(RNNClassifier.pool(outputs, lengths, "last"))
        elif config.pooling == "max":
            running = torch.maximum(named["state_max"], outputs.masked_fill(~valid, LOWEST).amax(dim=1))
            logits, updated = model.head(running), [*updated, running]
        elif config.pooling == "mean":
            total = named["state_sum"] + (outputs * valid).sum(dim=1)
            count = named["state_count"] + lengths.unsqueeze(1).to(outputs.dtype)
            logits, updated = model.head(total / count.clamp(min=1.0)), [*updated, total, count]
        else:  # frame_max
            clip_frames = model.scores(outputs, "clip") if model.frame_head is not None else frame_logits
            running = torch.maximum(named["state_max"], clip_frames.masked_fill(~valid, LOWEST).amax(dim=1))
            logits, updated = running, [*updated, running]
        return (logits, frame_logits, *updated)

    def initial_state(self, batch: int) -> list[torch.Tensor]:
        return [torch.full((batch, *s.shape), s.initial, dtype=torch.float32) for s in self.states]
