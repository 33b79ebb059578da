"""PNG plots of a training run: learning curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_learning_curves(history: list[dict], path: Path) -> None:
    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, score_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train")
    loss_axes.plot(epochs, [row["validation_loss"] for row in history], marker="o", label="validation")
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    loss_axes.legend()
    score_axes.plot(epochs, [row["validation_accuracy"] for row in history], marker="o", label="accuracy")
    score_axes.plot(epochs, [row["validation_macro_f1"] for row in history], marker="o", label="macro-F1")
    score_axes.set(xlabel="epoch", ylabel="score", title="Validation")
    score_axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_confusion_matrix(matrix: list[list[int]], label_names: list[str], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(1.2 * len(label_names) + 2, 1.2 * len(label_names) + 1.5))
    image = axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(label_names)), label_names, rotation=45, ha="right")
    axes.set_yticks(range(len(label_names)), label_names)
    axes.set(xlabel="predicted", ylabel="true", title="Confusion matrix (test)")
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            axes.text(j, i, count, ha="center", va="center", color="white" if count > peak / 2 else "black")
    figure.colorbar(image)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_gradient_norms(history: list[dict], path: Path) -> None:
    """Median gradient norm per module (before clipping) and the share of clipped steps, per epoch."""
    epochs = [row["epoch"] for row in history]
    figure, (norm_axes, clip_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for module in history[0]["gradient_norm_median"]:
        norm_axes.plot(epochs, [row["gradient_norm_median"].get(module, float("nan")) for row in history],
                       marker="o", label=module)
    norm_axes.set(xlabel="epoch", ylabel="median L2 norm (before clipping)", title="Gradient norm per module",
                  yscale="log")
    norm_axes.legend()
    clip_axes.plot(epochs, [row["clipped_fraction"] for row in history], marker="o")
    clip_axes.set(xlabel="epoch", ylabel="fraction of steps", title="Steps clipped", ylim=(0, 1.05))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
