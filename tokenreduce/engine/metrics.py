"""Classification metrics of an evaluation: top-1 and top-5 accuracy (torchmetrics)."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy


def topk_accuracy(num_classes: int) -> MetricCollection:
    """top1, and top5 when there are at least five classes: the fraction of samples whose label is
    among the k highest logits, over every sample seen (micro average, synchronised across processes)."""
    metrics = {"top1": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")}
    if num_classes >= 5:
        metrics["top5"] = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)
