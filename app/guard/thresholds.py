"""The guard model's decision thresholds in force: the model's own (chosen at training) with the rails config's
overrides. Its own module so the config loader (app/guard/loader.py) can check threshold names without importing
the cascade, which imports the loader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.guard.base import Classifier, DetectorThresholds
    from app.guard.llama_guard import Role


@dataclass
class Thresholds:
    unsafe_block: float = 0.85
    unsafe_allow: float = 0.25
    attack_block: float = 0.8
    attack_allow: float = 0.4
    off_topic_block: float = 0.7
    # Answer windows (embedded mode) below this are allowed without the embedded judge; None = unsafe_block, so
    # the judge is never asked about answers. Measured: in the detector's band the small judge is close to noise
    # (5% of harmful vs 8% of benign text judged unsafe, docs/evaluation.md), while 10-18% of benign
    # knowledge-base windows score in the band, so asking it cut off benign answers mid-stream.
    answer_unsafe_allow: float | None = None

    @classmethod
    def resolve(cls, detector: Classifier | None, overrides: dict[str, float]) -> Thresholds:
        base: DetectorThresholds | Thresholds = detector.thresholds if detector is not None else cls()
        values: dict[str, float] = {}
        for name in cls.__dataclass_fields__:
            value = getattr(base, name, None)  # the detector stores no answer_unsafe_allow
            if value is not None:
                values[name] = float(value)
        values.update(overrides)
        # A classifier that decides alone stores allow == block (no band for the judge). A config that moves only
        # the block threshold keeps it that way; an allow above its block would be meaningless.
        for head in ("unsafe", "attack"):
            if f"{head}_allow" not in overrides and base_allow_is_block(base, head):
                values[f"{head}_allow"] = values[f"{head}_block"]
            values[f"{head}_allow"] = min(values[f"{head}_allow"], values[f"{head}_block"])
        return cls(**values)

    def allow_below(self, role: Role) -> float:
        """Stage 1 allows a message scoring below this without asking the judge."""
        if role == "User":
            return self.unsafe_allow
        return self.unsafe_block if self.answer_unsafe_allow is None else self.answer_unsafe_allow


def base_allow_is_block(base: object, head: str) -> bool:
    return bool(getattr(base, f"{head}_allow", None) == getattr(base, f"{head}_block", None))
