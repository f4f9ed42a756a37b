"""Numbers as people read them, shared by charts, findings and the report."""

from __future__ import annotations

import math


def number(value: float | None, *, digits: int = 3) -> str:
    """3 significant digits, no scientific notation for everyday magnitudes: 0.0213, 128, 12,345."""
    if value is None or not math.isfinite(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1e4:
        return f"{value:,.0f}"
    if magnitude >= 10 ** (digits - 1):
        return f"{value:.0f}"
    if magnitude >= 1e-4 or magnitude == 0:
        return f"{value:.{digits}g}"
    return f"{value:.{digits - 1}e}"


def interval(low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "no interval"
    return f"{number(low)}–{number(high)}"


def compact(value: float) -> str:
    """Tick labels: 0.02, 5, 300, 10k, 2.5M."""
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value / 1e6:g}M"
    if magnitude >= 1e4:
        return f"{value / 1e3:g}k"
    return f"{value:g}"
