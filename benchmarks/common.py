"""What every benchmark shares: figures, statistics, the run's settings."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The busybox test image (scripts/test-images.sh builds it; nothing is pulled).
BUSYBOX = os.environ.get("CQ_TEST_BUSYBOX_IMAGE", "cq-test/busybox:1")


@dataclass
class Figure:
    """One measured figure, with its target and the baseline it was measured against."""

    name: str
    value: float
    unit: str  # "x", "ms", "runs/s", "MB"
    target: str  # e.g. "≤ 1.15"; "" when the figure has none
    met: bool | None  # None: no target
    baseline: str  # what it was compared with, with the baseline's own numbers
    detail: str = ""

    def formatted(self) -> str:
        if self.unit == "x":
            return f"{self.value:.2f}x"
        if self.unit == "runs/s":
            return f"{self.value:,.0f} runs/s"
        if self.unit == "ms":
            return f"{self.value:.2f} ms" if self.value < 10 else f"{self.value:.0f} ms"
        return f"{self.value:,.0f} {self.unit}"

    def line(self) -> str:
        """``name: value (target …)``, as the run prints it."""
        verdict = "" if self.met is None else ("met" if self.met else "MISSED")
        target = f"target {self.target}: {verdict}; " if self.target else ""
        extra = f"; {self.detail}" if self.detail else ""
        return f"{self.name}: {self.formatted()} ({target}baseline: {self.baseline}{extra})"


@dataclass
class Settings:
    """How big this run is, and where it keeps its files."""

    quick: bool
    workdir: Path
    #: The smallest sizes that still run every step (the test suite's check that the
    #: benchmarks run at all; its figures mean nothing).
    tiny: bool = False

    def size(self, full: int, quick: int, tiny: int) -> int:
        return tiny if self.tiny else quick if self.quick else full


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0 to 100), linearly interpolated between the closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    low, high = math.floor(k), math.ceil(k)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def ms(seconds: float) -> float:
    return seconds * 1000


def say(text: str) -> None:
    """Progress, on stderr (stdout carries only the figures)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)
