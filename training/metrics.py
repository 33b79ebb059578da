"""Classification metrics in the shape the model card records."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from serving.card import ClassMetrics, EvaluationMetrics


def evaluation_metrics(
    split: str, labels: list[int] | np.ndarray, predictions: list[int] | np.ndarray, label_names: list[str]
) -> EvaluationMetrics:
    classes = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0
    )
    labels_array = np.asarray(labels)
    return EvaluationMetrics(
        split=split,
        examples=int(labels_array.size),
        accuracy=round(float(np.mean(labels_array == np.asarray(predictions))), 4),
        macro_f1=round(float(np.mean(f1)), 4),
        per_class={
            name: ClassMetrics(
                precision=round(float(precision[i]), 4),
                recall=round(float(recall[i]), 4),
                f1=round(float(f1[i]), 4),
                support=int(support[i]),
            )
            for i, name in enumerate(label_names)
        },
        confusion_matrix=confusion_matrix(labels, predictions, labels=classes).tolist(),
    )
