"""Generation defaults the app and the labeling CLI share (no torch import: argument parsing stays fast)."""

from __future__ import annotations

import math
import os

# The bundled model loops on a repeated phrase in 12.5 % of its answers at 512 new tokens (temperature 0.7); a
# penalty of 1.1 brought that to 6.3 % (bench/README.md, "Does the loop move the model?"). 1.15 cut loops further
# (4.7 %) but also lists: a list repeats its markers, and answers laid out as a list fell from 48 % to 26-31 %.
# 1 = off.
REPETITION_PENALTY = 1.1


def repetition_penalty_default() -> float:
    """$PREFLOOP_REPETITION_PENALTY, else REPETITION_PENALTY: the default of every --repetition-penalty flag."""
    return float(os.environ.get("PREFLOOP_REPETITION_PENALTY", str(REPETITION_PENALTY)))


def repetition_penalty_problem(value) -> str | None:
    """What is wrong with `value` as a repetition penalty (a number in [1, 2]), or None when nothing is."""
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return None if number and 1 <= value <= 2 else f"must be in [1, 2] (1 = off), not {value!r}"
