"""Classification metrics of an evaluation: top-1 and top-5 accuracy (torchmetrics)."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from tokenreduce.errors import ConfigError


def topk_accuracy(num_classes: int) -> MetricCollection:
    """top1, and top5 when there are more than five classes: the fraction of samples whose label is
    among the k highest logits, over every sample seen (micro average, synchronised across processes).

    With five classes or fewer every label is among the top five, so top5 would be 1.0 whatever the
    model does: it is left out (the record's top5 is then None), not reported as a perfect score.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"model.num_classes={num_classes!r} is invalid; allowed: an integer >= 2 "
                          "(accuracy needs a classifier head with at least two classes)")
    metrics = {"top1": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")}
    if num_classes > 5:
        metrics["top5"] = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)
