"""One engine in a process of its own, so that a native crash, an abort, an OOM kill or a hang costs
that engine's row and not the run. The parent keeps the references, the comparator and the
benchmark's schedule; the worker compiles or loads one engine and answers one request at a time:
run these inputs, time one call on inputs staged earlier (so the message passing stays outside the
timed region), save, describe. A worker that dies is reported with its signal and its last stderr lines."""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

import backends as registry

from . import errors, progress
from .errors import BackendError, KilnError
from .fsutil import clean_stale
from .bench import Noop, peak_rss_bytes, quiet_call, reset_peak_rss, steady_allocator
from .choices import QuantSpec, Shape
from .precision import Precision

HEARTBEAT_S = progress.TICK_S  # a worker silent this long while the caller waits gets a "still working" line

Tensors = dict[str, torch.Tensor]


class WorkerCrashed(BackendError):
    """The worker process died (a signal, an exit) or stopped answering."""


_SENDING = threading.Lock()  # progress may come from a thread of the backend's while the answer goes out


def _send(conn: Any, obj: Any) -> None:
    """Plain pickle, not multiprocessing's: torch registers reducers there that pass tensors as
    shared file descriptors, which need a multiprocessing parent this worker does not have."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    with _SENDING:
        conn.send_bytes(data)


def _recv(conn: Any) -> Any:
    return pickle.loads(conn.recv_bytes())


def _serve(conn: Any, threads: int) -> None:
    """The worker's loop: one request at a time, every error sent back as a message."""
    torch.set_num_threads(threads)
    steady_allocator()  # as the caller's timing sets its own: an engine's speed is not its process's
    state: dict[str, Any] = {"inputs": {}}
    while True:
        try:
            op, args = _recv(conn)
        except EOFError:
            return
        try:
            if op == "quit":
                _send(conn, ("ok", None))
                return
            with progress.to(lambda message: _send(conn, ("progress", message))):  # read by Worker.call as it waits
                result = _OPS[op](state, *args)
            _send(conn, ("ok", result))
        except BaseException as e:  # every error goes back as a message; only a crash ends the worker
            kind = type(e).__name__
            _send(conn, ("error", (kind, str(e), isinstance(e, KilnError), traceback.format_exc(limit=8))))


def isolated(isolation: str, model_spec: str | None, name: str, reference: str) -> tuple[str, str] | None:
    """The backend's class as an import path when it runs in a worker; None when it runs here: no
    isolation asked, the reference (timed beside everything else, in the caller), a model given
    in memory (a worker cannot load it) or a backend class defined in __main__ (nor import it)."""
    if not loads_in_worker(isolation, name) or name == reference or model_spec is None:
        return None
    cls = type(registry.get(name))
    return (cls.__module__, cls.__qualname__)


def loads_in_worker(isolation: str, name: str) -> bool:
    """Where a build accepts the files it saved: in a fresh worker, which has none of the model's
    code, unless no isolation is asked or the backend's class is defined in __main__ (a worker
    cannot import it). One rule for every workload."""
    return isolation == "process" and type(registry.get(name)).__module__ != "__main__"


@dataclass(frozen=True)
class CompileRequest:
    """What a worker needs to compile one engine, sent whole: the model by its spec (loaded there,
    its captured program read from the cache by content, checked against `graph_hash`), the
    backend (by import path where the parent registered it at run time) and its settings."""

    model_spec: str
    model_task: str | None
    cache_dir: str | None
    graph_hash: str
    quant: QuantSpec
    backend: str
    cls_path: tuple[str, str] | None
    precision: Precision
    device: str
    options: Mapping[str, Any]
    shapes: tuple[Shape, ...]


_RSS0 = [0]  # the worker's RSS when its engine started to be made: its peak above it is the engine's


def engine_starts() -> None:
    """A maker calls this once what is not the engine (the model, its capture) is loaded."""
    _RSS0[0] = reset_peak_rss()


def _op_make(state: dict[str, Any], target: str, *args: Any) -> dict[str, Any]:
    """The worker's engine, made by `module:function(*args)`, found by name here: a workload's own
    maker (forward's in forward.py, generation's steps in genrun.py)."""
    module, _, function = target.partition(":")
    engine_starts()
    state["engine"] = getattr(importlib.import_module(module), function)(*args)
    return _facts(state)


def _facts(state: dict[str, Any]) -> dict[str, Any]:
    e = state["engine"]
    return {"backend": e.backend, "precision": e.precision.value, "device": e.device, "input_names": e.input_names,
            "output_names": e.output_names, "build_s": e.build_s}


def _host(x: Any) -> Any:
    """Named tensors (or one tensor) on the host, to cross the socket; anything else as it is."""
    if isinstance(x, Mapping):
        return {k: v.cpu() for k, v in x.items()}
    return x.cpu() if isinstance(x, torch.Tensor) else x


def _op_run(state: dict[str, Any], inputs: Any) -> Any:
    return _host(state["engine"](inputs))


def _op_stage(state: dict[str, Any], key: int, inputs: Tensors) -> None:
    state["inputs"][key] = {k: v.to(state["engine"].device) for k, v in inputs.items()}


def _op_time(state: dict[str, Any], key: int | None, calls: int) -> list[float]:
    """`calls` timed calls on inputs staged earlier; key None: an empty call (the harness's own cost)."""
    engine, inputs = (Noop(), {}) if key is None else (state["engine"], state["inputs"][key])
    return [quiet_call(engine, inputs) for _ in range(calls)]


def _op_info(state: dict[str, Any]) -> dict[str, Any]:
    e = state["engine"]
    return {"describe": e.describe(), "notes": e.notes(), "peak_host_mb": (peak_rss_bytes() - _RSS0[0]) / 2**20}


def _op_save(state: dict[str, Any], directory: str) -> list[str]:
    return [str(p) for p in state["engine"].save(directory)]


_OPS: dict[str, Callable[..., Any]] = {"make": _op_make, "run": _op_run, "stage": _op_stage, "time": _op_time, "info": _op_info,
                                       "save": _op_save}


def _raise(kind: str, message: str, kiln: bool, trace: str) -> None:
    logging.getLogger("kiln").debug("in the worker:\n%s", trace)  # shown with KILN_DEBUG, like an in-process failure
    cls = getattr(errors, kind, None)
    if kiln and isinstance(cls, type) and issubclass(cls, KilnError):
        err = Exception.__new__(cls)  # the same class and message; its own __init__ may want other arguments
        Exception.__init__(err, message)
        raise err
    raise BackendError(f"{kind}: {message.strip().splitlines()[0] if message.strip() else ''}")


class Worker:
    """A fresh interpreter (`python -m pipeline.worker`) serving one engine over a local socket; its
    stderr goes to a file read back when it dies. A fresh interpreter rather than a fork: no
    inherited threads, CUDA context or locks, and the caller's script is not imported again.
    Every request waits at most `timeout_s`."""

    def __init__(self, label: str, timeout_s: float, on_progress: Callable[[str], None] | None = None) -> None:
        self.label, self.timeout_s, self.on_progress = label, timeout_s, on_progress
        clean_stale(Path(tempfile.gettempdir()), "kiln-worker-")  # left by runs that were killed
        self.tmp = Path(tempfile.mkdtemp(prefix=f"kiln-worker-{os.getpid()}-"))
        self.stderr_path = self.tmp / "stderr.log"
        # The socket lives in a directory only this user can enter (mkdtemp: 0700), so no one else connects.
        listener = Listener(str(self.tmp / "socket"), family="AF_UNIX")
        # the caller's backends and plugins
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}
        with open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "pipeline.worker", str(self.tmp / "socket"),
                                             str(torch.get_num_threads())], stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                            env=env)
        accepted: list[Any] = []
        waiter = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
        waiter.start()
        deadline = time.monotonic() + 120
        while waiter.is_alive() and self.process.poll() is None and time.monotonic() < deadline:
            waiter.join(0.05)
        listener.close()  # unblocks the waiter if the worker never connected
        if not accepted:
            self.process.kill()
            raise WorkerCrashed(f"{label}: the worker process did not start{self._tail()}")
        self.conn = accepted[0]

    def call(self, op: str, *args: Any, timeout_s: float | None = None) -> Any:
        """The worker's answer to one request. While it works, its progress lines go to
        `on_progress`, and after HEARTBEAT_S without one, a line saying it is still at it."""
        start = time.monotonic()
        deadline, heard = start + (timeout_s or self.timeout_s), start
        try:
            _send(self.conn, (op, args))
            while True:
                while not self.conn.poll(0.05):
                    if self.process.poll() is not None:
                        raise self._crashed()
                    if time.monotonic() > deadline:
                        self.process.kill()
                        self.process.wait(5)
                        raise WorkerCrashed(f"{self.label}: no answer to {op!r} within {timeout_s or self.timeout_s:.0f}s; "
                                            f"the worker was killed{self._tail()}")
                    if self.on_progress and time.monotonic() - heard > HEARTBEAT_S:
                        heard = time.monotonic()
                        self.on_progress(f"still working on {op!r} ({heard - start:.0f}s)")
                status, value = _recv(self.conn)
                if status != "progress":
                    break
                heard = time.monotonic()
                if self.on_progress:
                    self.on_progress(value)
        except (EOFError, BrokenPipeError, ConnectionResetError):
            raise self._crashed() from None
        if status == "error":
            _raise(*value)
        return value

    def _crashed(self) -> WorkerCrashed:
        try:
            code: int | None = self.process.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
        else:
            how = f"exited with code {code}"
        return WorkerCrashed(f"{self.label}: the worker process {how}{self._tail()}")

    def _tail(self, lines: int = 6) -> str:
        try:
            text = [ln for ln in Path(self.stderr_path).read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return (": " + " | ".join(text[-lines:]))[:800] if text else ""

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                _send(self.conn, ("quit", ()))
                self.process.wait(10)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.conn.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class RemoteEngine:
    """An engine that lives in a Worker, with the parts of the CompiledModel contract the runner uses."""

    def __init__(self, worker: Worker, facts: dict[str, Any]) -> None:
        self.worker = worker
        self.backend, self.device = facts["backend"], facts["device"]
        self.precision = Precision(facts["precision"])
        self.input_names, self.output_names = tuple(facts["input_names"]), tuple(facts["output_names"])
        self.build_s = float(facts["build_s"])
        self._staged: dict[int, Any] = {}

    @classmethod
    def make(cls, label: str, timeout_s: float, on_progress: Callable[[str], None] | None, target: str,
             args: tuple[Any, ...]) -> RemoteEngine:
        """A fresh worker holding the engine `target(*args)` made there; closed if it fails to."""
        worker = Worker(label, timeout_s, on_progress)
        try:
            return cls(worker, worker.call("make", target, *args))
        except BaseException:
            worker.close()
            raise

    @classmethod
    def load(cls, label: str, directory: Path, device: str, cls_path: tuple[str, str] | None,
             timeout_s: float) -> RemoteEngine:
        return cls.make(label, timeout_s, None, "pipeline.forward:loaded", (str(directory), device, cls_path))

    def __call__(self, inputs: Any) -> Any:
        return self.worker.call("run", _host(inputs))

    def synchronize(self) -> None:
        """Each timed call synchronizes inside the worker."""

    def timed(self, inputs: Mapping[str, torch.Tensor]) -> float:
        """One call timed by the worker on inputs sent to it once, beforehand."""
        key = id(inputs)
        if key not in self._staged:
            self.worker.call("stage", key, {k: v.cpu() for k, v in inputs.items()})
            self._staged[key] = inputs  # kept alive, so the id stays this batch's
        return float(self.worker.call("time", key, 1)[0])

    def noop(self) -> Any:
        """An empty engine in this worker, timed as this worker times its engine."""
        return SimpleNamespace(device="cpu", synchronize=lambda: None, timed=lambda _: float(self.worker.call("time", None, 1)[0]))

    def info(self) -> dict[str, Any]:
        return dict(self.worker.call("info"))

    def describe(self) -> dict[str, Any]:
        return dict(self.info()["describe"])

    def notes(self) -> list[str]:
        return list(self.info()["notes"])

    def save(self, directory: str | Path) -> list[Path]:
        return [Path(p) for p in self.worker.call("save", str(directory))]

    def close(self) -> None:
        self.worker.close()


if __name__ == "__main__":  # python -m pipeline.worker SOCKET THREADS: started by Worker
    # served by the module imported by name, not this __main__ copy: makers found by name
    # ("pipeline.forward:compiled") then share its state (the engine's memory baseline)
    from pipeline import worker

    worker._serve(Client(sys.argv[1], family="AF_UNIX"), int(sys.argv[2]))
