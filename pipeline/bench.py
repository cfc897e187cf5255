"""Timing: warm-up outside the numbers, interleaved rounds, each engine's own sync, raw samples, statistics, memory.

Every process that times an engine (the run's own and each worker) runs under one harness, so an
engine's speed does not depend on which process holds it (measured on the CI machine kind in
docs/timing.md):
- the allocator keeps freed memory (`steady_allocator`): glibc hands a forward pass's freed
  activations back to the system when they sit at the top of its heap, and the next call faults
  them in again, page by page. A fresh worker did so on every call (11,000-16,000 page faults per
  MiniLM 8x128 call) where the long-lived run process did not (0): the same eager engine timed
  9-16% slower in a worker than beside it;
- after each timed call the process waits until its own threads are quiet (`settle`): OpenMP
  threads spin for milliseconds after a parallel region, and on two cores that spin would run
  over the next engine's call, in whichever process it is."""

from __future__ import annotations

import functools
import gc
import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from .progress import throttled


class Timeable(Protocol):
    device: str

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> Any: ...
    def synchronize(self) -> None: ...


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Timing:
    samples_ms: list[float]

    @property
    def median(self) -> float:
        return _quantile(self.samples_ms, 0.5)

    @property
    def p90(self) -> float:
        return _quantile(self.samples_ms, 0.9)

    @property
    def p95(self) -> float:
        return _quantile(self.samples_ms, 0.95)

    @property
    def p99(self) -> float:
        return _quantile(self.samples_ms, 0.99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples_ms) if self.samples_ms else float("nan")

    @property
    def stdev(self) -> float:
        return statistics.stdev(self.samples_ms) if len(self.samples_ms) > 1 else 0.0

    @property
    def iqr(self) -> float:
        return _quantile(self.samples_ms, 0.75) - _quantile(self.samples_ms, 0.25)

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "p90": self.p90, "p95": self.p95, "p99": self.p99, "mean": self.mean,
                "stdev": self.stdev, "iqr": self.iqr, "min": min(self.samples_ms, default=float("nan")),
                "n": len(self.samples_ms), "samples": [round(x, 4) for x in self.samples_ms]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Timing:
        return cls([float(x) for x in d["samples"]])


@dataclass
class Speedup:
    value: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Speedup:
        return cls(float(d["value"]), float(d["ci_low"]), float(d["ci_high"]))


def speedup(reference: Timing, candidate: Timing, resamples: int = 1000, seed: int = 0) -> Speedup:
    """reference median / candidate median, with a 95% bootstrap interval. The benchmark's
    interleaved rounds pair the two engines' samples round by round (sample i of each came from
    round i, under the same drift), so when both have every round the bootstrap resamples rounds,
    keeping the pairs; otherwise each list is resampled on its own."""
    rng = random.Random(seed)
    ref, cand = reference.samples_ms, candidate.samples_ms
    if len(ref) == len(cand) and ref:
        picks = (rng.choices(range(len(ref)), k=len(ref)) for _ in range(resamples))
        ratios = sorted(statistics.median([ref[i] for i in p]) / statistics.median([cand[i] for i in p]) for p in picks)
    else:
        ratios = sorted(
            statistics.median(rng.choices(ref, k=len(ref))) / statistics.median(rng.choices(cand, k=len(cand)))
            for _ in range(resamples)
        )
    return Speedup(reference.median / candidate.median, _quantile(ratios, 0.025), _quantile(ratios, 0.975))


def median_ci(samples: Sequence[float], resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """A 95% bootstrap interval of the median of `samples`."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(samples, k=len(samples))) for _ in range(resamples))
    return _quantile(medians, 0.025), _quantile(medians, 0.975)


def time_call(model: Timeable, inputs: Mapping[str, torch.Tensor]) -> float:
    """One call in milliseconds, ended by the engine's own synchronize; CUDA events on a GPU.
    Python's garbage collector is held off during the call (as timeit does): a collection's cost
    grows with the whole process's heap, not with the engine, and would land on whichever call
    triggered it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _time_call(model, inputs)
    finally:
        if enabled:
            gc.enable()


def _time_call(model: Timeable, inputs: Mapping[str, torch.Tensor]) -> float:
    if model.device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(inputs)
        end.record()
        model.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter_ns()
    model(inputs)
    model.synchronize()
    return (time.perf_counter_ns() - t0) / 1e6


K = TypeVar("K", bound=Hashable)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
TRIM_BYTES, MMAP_BYTES = 1 << 30, 32 << 20  # glibc's largest mmap threshold: bigger blocks are mapped and unmapped per call


@functools.cache
def steady_allocator() -> str:
    """Sets this process's allocator to keep what a call frees for the next call; says what it set.
    Once per process: every timing path calls it, the first one sets it."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc: its own policy stays
        return "the C library's own allocator policy"
    if mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES) != 1 or mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES) != 1:
        return "glibc's default allocator policy (mallopt refused)"
    return f"glibc keeps freed memory (trim threshold {TRIM_BYTES >> 20} MiB, blocks up to {MMAP_BYTES >> 20} MiB from the heap)"


SETTLE_WINDOW_S, SETTLE_LIMIT_S = 0.005, 0.1


def settle(window_s: float = SETTLE_WINDOW_S, limit_s: float = SETTLE_LIMIT_S) -> float:
    """Returns once this process's threads have used (almost) no CPU over one window, or after
    `limit_s`; the seconds it waited. The caller sleeps meanwhile, so what CPU time grows is
    other threads' (an OpenMP pool still spinning). The window is a few ms: some kernels account
    thread time in batches of that order."""
    start = time.perf_counter()
    c0 = time.process_time()
    while time.perf_counter() - start < limit_s:
        time.sleep(window_s)
        c = time.process_time()
        if c - c0 < window_s * 0.1:
            break
        c0 = c
    return time.perf_counter() - start


def quiet_call(model: Timeable, inputs: Mapping[str, torch.Tensor]) -> float:
    """One timed call, then this process quiet before anything else runs (on a CPU; a GPU's host
    threads are not what is timed)."""
    t = time_call(model, inputs)
    if not model.device.startswith("cuda"):
        settle()
    return t


class Noop:
    """An engine that does nothing: timed the same way as the others, the harness's own cost."""

    backend, device = "no-op", "cpu"

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> None:
        return None

    def synchronize(self) -> None:
        pass


def _timed(model: Timeable, inputs: Mapping[str, torch.Tensor]) -> float:
    """One timed call: by the engine itself where it times its own calls (an engine in a worker
    process), else here."""
    own = getattr(model, "timed", None)
    return float(own(inputs)) if own is not None else quiet_call(model, inputs)


def benchmark(entries: Mapping[K, tuple[Timeable, Mapping[str, torch.Tensor]]], *, warmup: int, rounds: int,
              iters: int = 1, seed: int = 0, progress: Callable[[str], None] | None = None,
              failures: dict[K, BaseException] | None = None) -> dict[K, Timing]:
    """Times every entry. Each round runs every entry `iters` times, in a fresh random order,
    so that drift (thermal, other load) hits all entries alike. With `failures`, an entry that
    raises is recorded there and left out of the later rounds; the others go on."""
    steady_allocator()
    rng = random.Random(seed)
    keys = list(entries)
    samples: dict[K, list[float]] = {k: [] for k in keys}

    def attempt(k: K, calls: int, keep: bool) -> None:
        model, inputs = entries[k]
        try:
            times = [_timed(model, inputs) for _ in range(calls)]
            model.synchronize()
        except Exception as e:
            if failures is None:
                raise
            failures[k] = e
            keys.remove(k)
            return
        if keep:
            samples[k].extend(times)

    tick = throttled(progress) if progress else None
    for k in list(keys):
        attempt(k, warmup, keep=False)
    for r in range(rounds):
        rng.shuffle(keys)
        for k in list(keys):
            attempt(k, iters, keep=True)
        if tick:
            tick(f"round {r + 1}/{rounds}", r + 1 == rounds)
    return {k: Timing(v) for k, v in samples.items() if k in keys}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the process peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: a child keeps its parent's across fork
    and exec, so a worker started by a 700 MB `kiln run` would read 700 MB as its own peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return _rss_bytes()


def reset_peak_rss() -> int:
    """Sets the peak back to the present RSS where Linux allows it (clear_refs mode 5), so the next
    peak_rss_bytes() measures only what follows; returns the present RSS, the baseline to subtract."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _rss_bytes()


@dataclass
class MemoryWatch:
    """Peak host RSS above the start, sampled every `interval` s; peak device memory on CUDA."""

    device: str = "cpu"
    interval: float = 0.002
    peak_host_mb: float = 0.0
    peak_device_mb: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> MemoryWatch:
        self._start = self._peak = _rss_bytes()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._dev0 = torch.cuda.memory_allocated(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_host_mb = (self._peak - self._start) / 2**20
        if self.device.startswith("cuda"):
            self.peak_device_mb = (torch.cuda.max_memory_allocated(self.device) - self._dev0) / 2**20
