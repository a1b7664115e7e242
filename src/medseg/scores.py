"""Data-set scores: a competition's own metric that a data set brings (the UW-Madison score, say), used
to pick checkpoints in training, as ``medseg tune``'s objective and in ``medseg evaluate``'s summary.

Generic code never names a data set: it asks ``score_for(format, classes)`` for the score that applies,
and works with its sums. A score accumulates four numbers per class and case (a Dice sum and count, a
distance sum and count) and turns their totals into its value.

    score = score_for("uwmgi", classes)          # None for data sets without one
    total = score.case_terms(pred, truth)         # [4] sums of one case (z, k, h, w masks)
    score.result(total)                            # {"score": ..., "dice": ..., "hd": ...}
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from medseg.registry import Registry


class TaskScore(ABC):
    name: ClassVar[str]  # key of summaries and of training's metrics columns (val_<name>_<part>)
    label: ClassVar[str]  # what people call it
    parts: ClassVar[tuple[str, ...]] = ("score", "dice", "hd")
    variants: ClassVar[tuple[str, ...]] = ("competition",)

    @classmethod
    @abstractmethod
    def applies(cls, fmt: str | None, classes: list[str]) -> bool:
        """Whether a data set read by ``fmt`` with these classes is scored this way."""

    @abstractmethod
    def class_terms(self, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
        """``[4]`` sums of one class of one case (``[z, h, w]`` masks)."""

    def case_terms(self, pred: np.ndarray, truth: np.ndarray, variant: str = "competition") -> np.ndarray:
        """``[4]`` sums of one case over its classes (``[z, k, h, w]`` masks)."""
        return sum((self.class_terms(pred[:, k], truth[:, k]) for k in range(pred.shape[1])), np.zeros(4))

    @abstractmethod
    def value(self, total: np.ndarray) -> np.ndarray:
        """The score of summed terms ``total[..., 4]`` (vectorised: ``tune`` scores many candidates at once)."""

    def result(self, total: np.ndarray) -> dict[str, Any]:
        """{part: value} of summed terms, plus the counts."""
        d, nd, h, nh = (float(v) for v in total)
        return {"score": float(self.value(np.asarray(total))), "dice": d / nd if nd else 1.0, "hd": h / nh if nh else 0.0,
                "n_dice": int(nd), "n_hd": int(nh)}

    def definition(self, variant: str = "competition") -> str:
        """How the number was made, for the summary."""
        return self.label

    def columns(self) -> list[str]:
        return [f"val_{self.name}_{p}" for p in self.parts]


SCORES: Registry[type[TaskScore]] = Registry("score", ["medseg.evaluation.uwmgi_score"])


def score_for(fmt: str | None, classes: list[str]) -> TaskScore | None:
    """The data-set score that applies to a data set of format ``fmt`` with ``classes``, if any."""
    for name in SCORES.names():
        cls = SCORES.get(name)
        if cls.applies(fmt, list(classes)):
            return cls()
    return None


def score_named(name: str | None) -> TaskScore | None:
    return None if name is None else SCORES.get(name)()


__all__ = ["TaskScore", "SCORES", "score_for", "score_named"]
