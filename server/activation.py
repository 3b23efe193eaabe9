"""The activation gate: when a transform's report allows it to serve a collection's queries.

A :class:`GatePolicy` holds three thresholds; the server has a default (``ServerConfig.min_retention``,
``max_negative_flip_rate``, ``require_ecc``) and each ActivateRoute request may override any of them.
:func:`gate` checks a report against a policy and returns why it fails, quoting every failing figure
against its threshold, or None. The figures:

* ``retention``: transformed Recall@10 / home->home Recall@10 on the evaluation set (the old model's
  own queries: what users have today). A report fitted without evaluation queries has none; then its
  ``estimated_retention`` from the held-out calibration slice (training relevance) stands in, and the
  refusal says it is an estimate. With neither, the gate refuses: no number is invented.
* ``neg_flip``: queries right at top-1 home->home and wrong through the transform (evaluation set only;
  a policy that limits it refuses a report without it).
* ``ecc_margin``: transformed Recall@10 − home->home Recall@10; ``require_ecc`` demands >= 0.

Covered by ``tests/test_gate_policy.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["GatePolicy", "gate"]


def _fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 <= value <= 1):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class GatePolicy:
    """Thresholds of the activation gate (module docstring); validated on construction."""

    min_retention: float = 0.85  #: least transformed / home->home Recall@10
    max_negative_flip_rate: float = 1.0  #: most negative-flip rate (1.0: no limit)
    require_ecc: bool = False  #: demand ECC margin >= 0

    def __post_init__(self) -> None:
        if isinstance(self.min_retention, bool) or not isinstance(self.min_retention, int | float):
            raise ValueError(f"min_retention must be a number >= 0, got {self.min_retention!r}")
        if not (math.isfinite(self.min_retention) and self.min_retention >= 0):
            raise ValueError(f"min_retention must be a finite number >= 0, got {self.min_retention!r}")
        _fraction("max_negative_flip_rate", self.max_negative_flip_rate)
        if not isinstance(self.require_ecc, bool):
            raise ValueError(f"require_ecc must be a boolean, got {self.require_ecc!r}")

    def override(self, **values: Any) -> GatePolicy:
        """This policy with the given (non-None) fields replaced; raises ValueError for a bad value."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return {
            "min_retention": self.min_retention,
            "max_negative_flip_rate": self.max_negative_flip_rate,
            "require_ecc": self.require_ecc,
        }


def _num(report: dict[str, Any], key: str) -> float | None:
    v = report.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def gate(report: dict[str, Any], policy: GatePolicy) -> str | None:
    """Why ``report`` fails ``policy``, every failing figure against its threshold; None when it passes."""
    problems = []
    retention, source = _num(report, "retention"), "evaluation set"
    if retention is None:
        retention, source = _num(report, "estimated_retention"), "estimated on the held-out calibration slice"
    if retention is None:
        problems.append(
            f"no retention figure to check against min_retention {policy.min_retention:.4f} (fit with evaluation "
            "queries and their relevant ids, or with training relevance, to measure it)"
        )
    elif retention < policy.min_retention:
        problems.append(f"retention {retention:.4f} ({source}) < min_retention {policy.min_retention:.4f}")
    if policy.max_negative_flip_rate < 1:
        flips = _num(report, "neg_flip")
        if flips is None:
            problems.append(
                f"no negative-flip rate to check against max_negative_flip_rate {policy.max_negative_flip_rate:.4f} "
                "(it needs evaluation queries)"
            )
        elif flips > policy.max_negative_flip_rate:
            problems.append(
                f"negative-flip rate {flips:.4f} > max_negative_flip_rate {policy.max_negative_flip_rate:.4f}"
            )
    if policy.require_ecc:
        margin = _num(report, "ecc_margin")
        if margin is None:
            problems.append("no ECC margin to check (require_ecc; it needs evaluation queries)")
        elif margin < 0:
            problems.append(f"ECC margin {margin:+.4f} < 0 (require_ecc: transformed Recall@10 is below home->home)")
    return "; ".join(problems) or None
