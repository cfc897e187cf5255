"""One engine in a process of its own, so that a native crash, an abort, an OOM kill or a hang costs
that engine's row and not the run.

The parent keeps the references, the comparator and the benchmark's schedule; the worker compiles
or loads one engine and answers one request at a time: run these inputs, time one call on inputs
staged earlier (so the message passing stays outside the timed region), save, describe. A worker
that dies is reported with its signal and the last lines of its stderr.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from . import errors
from .errors import BackendError, KilnError
from .precision import Precision

Tensors = dict[str, torch.Tensor]
_CTX = mp.get_context("spawn")  # a fresh interpreter: no inherited threads, CUDA context or locks


class WorkerCrashed(BackendError):
    """The worker process died (a signal, an exit) or stopped answering."""


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _serve(conn: Any, stderr_path: str, threads: int) -> None:
    """The worker's loop. Its stderr goes to a file the parent reads when the worker dies."""
    fd = os.open(stderr_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)
    torch.set_num_threads(threads)
    state: dict[str, Any] = {"inputs": {}}
    while True:
        try:
            op, args = conn.recv()
        except EOFError:
            return
        try:
            if op == "quit":
                conn.send(("ok", None))
                return
            conn.send(("ok", _OPS[op](state, *args)))
        except BaseException as e:  # every error goes back as a message; only a crash ends the worker
            kind = type(e).__name__
            conn.send(("error", (kind, str(e), isinstance(e, KilnError), traceback.format_exc(limit=8))))


def _backend(name: str, cls_path: tuple[str, str] | None) -> Any:
    """The registered backend, or, for one registered at run time in the parent, its class by import path."""
    import importlib

    import backends as registry

    if name in registry.names() or cls_path is None:
        return registry.get(name)
    cls = importlib.import_module(cls_path[0])
    for part in cls_path[1].split("."):
        cls = getattr(cls, part)
    return cls()  # type: ignore[operator]


def _op_compile(state: dict[str, Any], model_spec: str, cache_dir: str | None, graph_hash: str, name: str,
                cls_path: tuple[str, str] | None, precision: str, device: str, options: Mapping[str, Any],
                shapes: list[str]) -> dict[str, Any]:
    from .capture import capture
    from .inputs import Shape
    from .models import load_model

    start = _rss()
    captured = capture(load_model(model_spec), Path(cache_dir) if cache_dir else None)
    if captured.graph_hash != graph_hash:
        raise BackendError(f"the worker captured graph {captured.graph_hash}, the run {graph_hash}: the model loaded differently")
    backend = _backend(name, cls_path)
    state["engine"] = backend.compile(captured, Precision(precision), device, options, [Shape.parse(s) for s in shapes])
    state["rss0"] = start
    return _facts(state)


def _op_load(state: dict[str, Any], directory: str, device: str) -> dict[str, Any]:
    from .store import load

    state["rss0"] = _rss()
    state["engine"] = load(directory, device)
    return _facts(state)


def _facts(state: dict[str, Any]) -> dict[str, Any]:
    e = state["engine"]
    return {"backend": e.backend, "precision": e.precision.value, "device": e.device, "input_names": e.input_names,
            "output_names": e.output_names, "build_s": e.build_s}


def _op_run(state: dict[str, Any], inputs: Tensors) -> Tensors:
    return {k: v.cpu() for k, v in state["engine"](inputs).items()}


def _op_stage(state: dict[str, Any], key: int, inputs: Tensors) -> None:
    state["inputs"][key] = {k: v.to(state["engine"].device) for k, v in inputs.items()}


def _op_time(state: dict[str, Any], key: int, calls: int) -> list[float]:
    from .bench import time_call

    return [time_call(state["engine"], state["inputs"][key]) for _ in range(calls)]


def _op_info(state: dict[str, Any]) -> dict[str, Any]:
    e = state["engine"]
    return {"describe": e.describe(), "notes": e.notes(), "peak_host_mb": (_rss() - state.get("rss0", 0)) / 2**20}


def _op_save(state: dict[str, Any], directory: str) -> list[str]:
    return [str(p) for p in state["engine"].save(directory)]


_OPS: dict[str, Callable[..., Any]] = {"compile": _op_compile, "load": _op_load, "run": _op_run, "stage": _op_stage, "time": _op_time, "info": _op_info,
        "save": _op_save}


def _raise(kind: str, message: str, kiln: bool, trace: str) -> None:
    if kiln and isinstance(getattr(errors, kind, None), type) and issubclass(getattr(errors, kind), KilnError):
        raise getattr(errors, kind)(message)
    raise BackendError(f"{kind}: {message.strip().splitlines()[0] if message.strip() else ''}")


class Worker:
    """A spawned process serving one engine. Every request waits at most `timeout_s`."""

    def __init__(self, label: str, timeout_s: float = 3600.0) -> None:
        self.label, self.timeout_s = label, timeout_s
        fd, self.stderr_path = tempfile.mkstemp(prefix="kiln-worker-", suffix=".log")
        os.close(fd)
        self.conn, child = _CTX.Pipe()
        self.process = _CTX.Process(target=_serve, args=(child, self.stderr_path, torch.get_num_threads()), daemon=True)
        self.process.start()
        child.close()

    def call(self, op: str, *args: Any, timeout_s: float | None = None) -> Any:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        try:
            self.conn.send((op, args))
            while not self.conn.poll(0.05):
                if not self.process.is_alive():
                    raise self._crashed()
                if time.monotonic() > deadline:
                    self.process.kill()
                    self.process.join(5)
                    raise WorkerCrashed(f"{self.label}: no answer to {op!r} within {timeout_s or self.timeout_s:.0f}s; "
                                        f"the worker was killed{self._tail()}")
            status, value = self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            raise self._crashed() from None
        if status == "error":
            _raise(*value)
        return value

    def _crashed(self) -> WorkerCrashed:
        self.process.join(5)
        code = self.process.exitcode
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
        if self.process.is_alive():
            try:
                self.conn.send(("quit", ()))
                self.process.join(10)
            except (BrokenPipeError, OSError):
                pass
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        Path(self.stderr_path).unlink(missing_ok=True)


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
    def compile(cls, label: str, timeout_s: float, **kw: Any) -> RemoteEngine:
        worker = Worker(label, timeout_s)
        try:
            return cls(worker, worker.call("compile", kw["model_spec"], kw["cache_dir"], kw["graph_hash"], kw["name"],
                                           kw["cls_path"], kw["precision"], kw["device"], kw["options"], kw["shapes"]))
        except BaseException:
            worker.close()
            raise

    @classmethod
    def load(cls, label: str, directory: Path, device: str, timeout_s: float = 600.0) -> RemoteEngine:
        worker = Worker(label, timeout_s)
        try:
            return cls(worker, worker.call("load", str(directory), device))
        except BaseException:
            worker.close()
            raise

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> Tensors:
        return dict(self.worker.call("run", {k: v.cpu() for k, v in inputs.items()}))

    def synchronize(self) -> None:
        """Each timed call synchronizes inside the worker."""

    def timed(self, inputs: Mapping[str, torch.Tensor]) -> float:
        """One call timed by the worker on inputs sent to it once, beforehand."""
        key = id(inputs)
        if key not in self._staged:
            self.worker.call("stage", key, {k: v.cpu() for k, v in inputs.items()})
            self._staged[key] = inputs  # kept alive, so the id stays this batch's
        return float(self.worker.call("time", key, 1)[0])

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
