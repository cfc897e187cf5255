"""Is the machine quiet enough for a speed ratio to mean anything? A busy machine lies: on two
cores shared with a build, ONNX Runtime once timed at 10x eager where a quiet host shows 1.1x.

While a shape is timed, Watch counts the CPU time the whole machine spent busy (steal included:
a hypervisor taking the cores) against the CPU time of this process and its workers; what is
left is other processes'. Too much of it, or a drifting speedup, makes the report
`noisy`: its ratios are kept as measured but not presented or gated as a speedup.
The reference's own rounds are a second witness, read through the ratios: interleaving makes a
speedup immune to drift that hits every engine alike, so what counts is a speedup that moves
between the first and the second half of the rounds."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

BUSY_SHARE = 0.25  # other processes using more than a quarter of the machine's CPU time while timing
# A speedup moving by more than half between the halves of the rounds. Calls of a millisecond move
# more than they seem: tiny-bert at 1x64 on a quiet host moved 21% (eager's own median 92%).
DRIFT = 0.50
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


def ratio_drift(reference: Sequence[float], candidate: Sequence[float]) -> float | None:
    """How far an engine's speedup over the reference in the second half of the rounds lies from
    the first half's. Interleaving makes the ratio immune to drift that hits every engine alike
    (a host that slows down for a while): only a drift that moves the ratio is a lie."""
    if len(reference) != len(candidate) or len(reference) < MIN_ROUNDS_FOR_DRIFT:
        return None
    half = len(reference) // 2
    halves = [statistics.median(reference[s]) / statistics.median(candidate[s]) for s in (slice(None, half), slice(half, None))]
    return abs(halves[1] - halves[0]) / min(halves) if min(halves) > 0 else None


def judge(shape: str, others_share: float | None, reference: Sequence[float],
          candidates: dict[str, Sequence[float]] | None = None) -> dict[str, Any]:
    """One shape's reading: the numbers and, when the timing cannot be trusted, why. The
    reference's own drift is recorded; a speedup that drifts between the halves is judged."""
    moved = {name: d for name, samples in (candidates or {}).items() if (d := ratio_drift(reference, samples)) is not None}
    reasons = []
    if others_share is not None and others_share > BUSY_SHARE:
        reasons.append(f"other processes used {others_share:.0%} of the CPU time while {shape} was timed (at most {BUSY_SHARE:.0%})")
    worst = max(moved, key=moved.__getitem__, default=None)
    if worst is not None and moved[worst] > DRIFT:
        reasons.append(f"{worst}'s speedup moved {moved[worst]:.0%} between the halves of its rounds at {shape} (at most {DRIFT:.0%})")
    return {"shape": shape, "others_cpu_share": others_share, "reference_drift": drift(reference),
            "speedup_drift": max(moved.values(), default=None), "noisy": "; ".join(reasons) or None}


def verdict(readings: Sequence[dict[str, Any]]) -> str | None:
    """The report's: None when every shape was timed on a quiet machine, else every reason."""
    return "; ".join(r["noisy"] for r in readings if r.get("noisy")) or None


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
