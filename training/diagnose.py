"""Why LSTM and GRU train where a plain RNN fails, and how clipping tames exploding gradients.

On a recall task (remember the symbol shown at the first step through T-1 steps
of distractors) this measures, for a plain tanh RNN, an LSTM and a GRU:

1. gradient flow: the norm of dL/dh_t against the distance from the loss, at
   initialisation, on a log scale (vanishing gradients show as a steep fall);
2. what each reaches in a fixed training budget at several sequence lengths;
3. an exploding case: a plain RNN with a large recurrent initialisation and a
   high learning rate, trained with and without clipping the global gradient norm.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.plots import plt

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
SYMBOLS = 8
DISTRACTORS = 4


@dataclass(frozen=True)
class DiagnoseConfig:
    sequence_lengths: tuple[int, ...] = (15, 30, 60)
    hidden_size: int = 32
    batch_size: int = 64
    train_steps: int = 400
    learning_rate: float = 3e-3
    exploding_length: int = 20
    exploding_steps: int = 300
    exploding_learning_rate: float = 0.05
    exploding_recurrent_gain: float = 2.5
    clip_grad_norm: float = 1.0
    seed: int = 0


QUICK = DiagnoseConfig(sequence_lengths=(10, 30), hidden_size=32, train_steps=150, exploding_steps=150)


def recall_task(batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [B, T, SYMBOLS + DISTRACTORS] one-hot; target [B]: the symbol seen at t=0.

    After the first step only distractor symbols arrive, so the answer has to be carried
    across T-1 steps: chance accuracy is 1/SYMBOLS.
    """
    symbols = torch.randint(0, SYMBOLS, (batch,), generator=generator)
    noise = torch.randint(SYMBOLS, SYMBOLS + DISTRACTORS, (batch, length - 1), generator=generator)
    sequence = torch.cat([symbols.unsqueeze(1), noise], dim=1)
    return nn.functional.one_hot(sequence, SYMBOLS + DISTRACTORS).float(), symbols


class Classifier(nn.Module):
    def __init__(self, cell: str, hidden_size: int):
        super().__init__()
        self.rnn = CELLS[cell](input_size=SYMBOLS + DISTRACTORS, hidden_size=hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, SYMBOLS)
        # Gated cells start out remembering: bias 1 on the LSTM forget gate (gates i, f, g, o)
        # and on the GRU update gate (gates r, z, n; z near 1 keeps the old state).
        if cell in ("lstm", "gru"):
            with torch.no_grad():
                self.rnn.bias_ih_l0[hidden_size : 2 * hidden_size].fill_(1.0)
                self.rnn.bias_hh_l0[hidden_size : 2 * hidden_size].fill_(0.0)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.rnn(inputs)
        return self.head(outputs[:, -1])

    def unrolled(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The same computation one step at a time, keeping every hidden state h_t.

        The fused recurrent kernels do not expose dL/dh_t for earlier steps; a cell that
        shares the fused layer's weights does.
        """
        cell_class = {nn.RNN: nn.RNNCell, nn.LSTM: nn.LSTMCell, nn.GRU: nn.GRUCell}[type(self.rnn)]
        cell = cell_class(self.rnn.input_size, self.rnn.hidden_size)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            setattr(cell, name, getattr(self.rnn, f"{name}_l0"))
        hidden = torch.zeros(inputs.shape[0], self.rnn.hidden_size)
        state = (hidden, torch.zeros_like(hidden)) if isinstance(self.rnn, nn.LSTM) else hidden
        states = []
        for step in range(inputs.shape[1]):
            state = cell(inputs[:, step], state)
            hidden = state[0] if isinstance(state, tuple) else state
            hidden.retain_grad()
            states.append(hidden)
        return self.head(hidden), states


def gradient_flow(model: Classifier, length: int, seed: int, batch_size: int) -> list[float]:
    """Mean ||dL/dh_t|| for t = T-1 ... 0 (index = distance from the loss)."""
    inputs, targets = recall_task(batch_size, length, torch.Generator().manual_seed(seed))
    logits, states = model.unrolled(inputs)
    nn.functional.cross_entropy(logits, targets).backward()
    model.zero_grad()
    return [float(state.grad.norm(dim=-1).mean()) for state in reversed(states)]


def train_budget(cell: str, length: int, config: DiagnoseConfig) -> tuple[dict, Classifier, Classifier]:
    """Train for a fixed number of steps; report held-out accuracy (chance: 1/SYMBOLS).

    Returns the result row, the model as initialised and the trained model.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed + length)
    model = Classifier(cell, config.hidden_size)
    initial = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    for _ in range(config.train_steps):
        inputs, targets = recall_task(config.batch_size, length, generator)
        loss = nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
        optimizer.step()
    row = {"cell": cell, "length": length, **_held_out(model, length)}
    return row, initial, model


def _held_out(model: Classifier, length: int) -> dict:
    with torch.no_grad():
        inputs, targets = recall_task(1000, length, torch.Generator().manual_seed(12345))
        logits = model(inputs)
    return {
        "loss": round(float(nn.functional.cross_entropy(logits, targets)), 4),
        "accuracy": round(float((logits.argmax(dim=1) == targets).float().mean()), 3),
    }


def exploding(clip: bool, config: DiagnoseConfig) -> dict:
    """A plain RNN whose recurrent matrix is an orthogonal one scaled by a gain > 1 (so
    gradients grow with distance), trained with SGD and momentum, with or without clipping."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    length = config.exploding_length
    model = Classifier("rnn", config.hidden_size)
    with torch.no_grad():
        orthogonal = torch.linalg.qr(torch.randn(config.hidden_size, config.hidden_size))[0]
        model.rnn.weight_hh_l0.copy_(orthogonal * config.exploding_recurrent_gain)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.exploding_learning_rate, momentum=0.9)
    losses, norms, clipped = [], [], 0
    for _ in range(config.exploding_steps):
        inputs, targets = recall_task(config.batch_size, length, generator)
        loss = nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        limit = config.clip_grad_norm if clip else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), limit))
        clipped += int(clip and norm > config.clip_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        norms.append(norm)
    return {
        "clip": clip,
        "length": length,
        "losses": losses,
        "gradient_norms": norms,
        "max_gradient_norm": max(norms),
        "clipped_fraction": round(clipped / len(losses), 3),
        **_held_out(model, length),
    }


def run_diagnosis(config: DiagnoseConfig, output_dir: Path, progress=None) -> dict:
    """Run all three measurements; write diagnose.json, diagnose.md and three PNG plots."""
    output_dir.mkdir(parents=True, exist_ok=True)
    longest = max(config.sequence_lengths)
    budget, flows = [], {}
    for length in config.sequence_lengths:
        for cell in CELLS:
            row, initial, trained = train_budget(cell, length, config)
            budget.append(row)
            if length == longest:
                flows[cell] = {
                    "initial": gradient_flow(initial, length, config.seed, config.batch_size),
                    "trained": gradient_flow(trained, length, config.seed, config.batch_size),
                }
            if progress:
                progress(row)
    blowups = {"without_clipping": exploding(False, config), "with_clipping": exploding(True, config)}
    report = {
        "config": asdict(config),
        "task": f"recall the first of T one-hot symbols ({SYMBOLS} symbols, {DISTRACTORS} distractors)",
        "gradient_flow": {cell: {"length": longest, **values} for cell, values in flows.items()},
        "budget": budget,
        "exploding": blowups,
    }
    (output_dir / "diagnose.json").write_text(json.dumps(report, indent=2))
    _plot_gradient_flow(flows, longest, output_dir / "gradient_flow.png")
    _plot_budget(budget, config, output_dir / "accuracy_vs_length.png")
    _plot_exploding(blowups, config, output_dir / "exploding_gradients.png")
    (output_dir / "diagnose.md").write_text(markdown_table(report))
    return report


def markdown_table(report: dict) -> str:
    lengths = sorted({row["length"] for row in report["budget"]})
    longest = max(lengths)
    lines = ["| cell | " + " | ".join(f"T={n} accuracy" for n in lengths)
             + f" | dL/dh_0 / dL/dh_{longest - 1} at init | same, trained |",
             "|---|" + "---|" * (len(lengths) + 2)]
    for cell in CELLS:
        cells = []
        for length in lengths:
            row = next(r for r in report["budget"] if r["cell"] == cell and r["length"] == length)
            cells.append(f"{row['accuracy']:.3f}")
        flow = report["gradient_flow"][cell]
        ratios = [v[-1] / v[0] if v[0] else float("nan") for v in (flow["initial"], flow["trained"])]
        lines.append(f"| {cell} | " + " | ".join(cells) + f" | {ratios[0]:.1e} | {ratios[1]:.1e} |")
    without, with_clip = report["exploding"]["without_clipping"], report["exploding"]["with_clipping"]
    lines += [
        "",
        f"| exploding case (plain RNN, T={without['length']}) | max gradient norm | held-out accuracy "
        "| clipped steps |",
        "|---|---|---|---|",
        f"| without clipping | {without['max_gradient_norm']:.3g} | {without['accuracy']:.3f} | - |",
        f"| with clipping | {with_clip['max_gradient_norm']:.3g} | {with_clip['accuracy']:.3f} | "
        f"{with_clip['clipped_fraction']:.0%} |",
    ]
    return "\n".join(lines) + "\n"


def _plot_gradient_flow(flows: dict, length: int, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for (cell, values), color in zip(flows.items(), ("tab:red", "tab:blue", "tab:green"), strict=False):
        for stage, style in (("initial", "--"), ("trained", "-")):
            norms = np.maximum(values[stage], 1e-30)
            axes.semilogy(range(len(norms)), norms, style, color=color, label=f"{cell.upper()} {stage}")
    axes.set(xlabel="distance from the loss (time steps)", ylabel="mean ||dL/dh_t||",
             title=f"Gradient flow, recall task, T={length}")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_budget(budget: list[dict], config: DiagnoseConfig, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for cell in CELLS:
        rows = [r for r in budget if r["cell"] == cell]
        axes.plot([r["length"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=cell.upper())
    axes.axhline(1 / SYMBOLS, color="grey", linestyle="--", label="chance")
    axes.set(xlabel="sequence length", ylabel="held-out accuracy",
             title=f"Recall task after {config.train_steps} training steps", ylim=(-0.02, 1.02))
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_exploding(blowups: dict, config: DiagnoseConfig, path: Path) -> None:
    figure, (loss_axes, norm_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for name, result in blowups.items():
        label = name.replace("_", " ")
        loss_axes.plot(result["losses"], label=label)
        norm_axes.semilogy(np.nan_to_num(result["gradient_norms"], nan=1e30, posinf=1e30), label=label)
    loss_axes.set(xlabel="step", ylabel="training loss", title="Plain RNN, recurrent gain > 1, SGD + momentum")
    norm_axes.axhline(config.clip_grad_norm, color="grey", linestyle="--", label="clip threshold")
    norm_axes.set(xlabel="step", ylabel="gradient norm (before clipping)", title="Gradient norm")
    loss_axes.legend()
    norm_axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
