"""Is the machine quiet enough for a speed ratio to mean anything? A busy machine lies: on two
cores shared with a build, ONNX Runtime once timed at 10x eager where a quiet host shows 1.1x.

While a shape is timed, Watch counts the CPU time the whole machine spent busy (steal included:
a hypervisor taking the cores) against the CPU time of this process and its workers; what is
left is other processes'. The reference's own rounds are a second witness: its median should
not move between the first and second half of the rounds. Either failing makes the report
`noisy`: its ratios are kept as measured but not presented or gated as a speedup."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

BUSY_SHARE = 0.25  # other processes using more than a quarter of the machine's CPU time while timing
DRIFT = 0.20  # the reference's median moving more than 20% between the halves of its rounds
MIN_ROUNDS_FOR_DRIFT = 6


def _machine() -> tuple[int, int] | None:
    """(busy, total) jiffies of every CPU since boot; None where /proc/stat is not there."""
    try:
        with open("/proc/stat") as f:
            parts = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (parts + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def _own(pids: Iterable[int]) -> int:
    """CPU jiffies (user + system) of this process and `pids`, every thread included."""
    total = 0
    for pid in {os.getpid(), *pids}:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            continue  # a worker that ended: its time is gone with it
    return total


@dataclass
class Watch:
    """Other processes' share of the machine's CPU time between start() and stop()."""

    pids: Callable[[], Sequence[int]] = lambda: ()
    others_share: float | None = None
    _start: tuple[int, int, int] | None = field(default=None, repr=False)

    def start(self) -> Watch:
        m = _machine()
        self._start = (*m, _own(self.pids())) if m else None
        return self

    def stop(self) -> float | None:
        m = _machine()
        if self._start is None or m is None:
            return None
        busy0, total0, own0 = self._start
        spent = m[1] - total0
        if spent <= 0:
            return None
        others = (m[0] - busy0) - (_own(self.pids()) - own0)
        self.others_share = max(0.0, others / spent)
        return self.others_share


def drift(samples: Sequence[float]) -> float | None:
    """How far the median of the second half of the rounds lies from the first half's, relative."""
    if len(samples) < MIN_ROUNDS_FOR_DRIFT:
        return None
    half = len(samples) // 2
    a, b = statistics.median(samples[:half]), statistics.median(samples[half:])
    return abs(b - a) / min(a, b) if min(a, b) > 0 else None


def judge(shape: str, others_share: float | None, reference_samples: Sequence[float]) -> dict[str, Any]:
    """One shape's reading: the numbers and, when the timing cannot be trusted, why."""
    d = drift(reference_samples)
    reasons = []
    if others_share is not None and others_share > BUSY_SHARE:
        reasons.append(f"other processes used {others_share:.0%} of the CPU time while {shape} was timed (at most {BUSY_SHARE:.0%})")
    if d is not None and d > DRIFT:
        reasons.append(f"the reference's median moved {d:.0%} between the halves of its rounds at {shape} (at most {DRIFT:.0%})")
    return {"shape": shape, "others_cpu_share": others_share, "reference_drift": d, "noisy": "; ".join(reasons) or None}


def verdict(readings: Sequence[dict[str, Any]]) -> str | None:
    """The report's: None when every shape was timed on a quiet machine, else every reason."""
    return "; ".join(r["noisy"] for r in readings if r.get("noisy")) or None


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
