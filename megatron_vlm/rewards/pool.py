"""A pool of reward worker processes with a hard, process-level timeout per job.

Why processes and not threads or library timeouts: math-verify's timeout is `signal.alarm` (main
thread only, and its exception derives from `BaseException`), sympy's `simplify` and a user's
reward can loop forever, and some math-verify inputs hang after `parse` returned. Only killing the
process is safe. Design:
- workers start with the spawn or forkserver method (forking a process whose torch thread pools
  are running can deadlock); with forkserver the verifier modules are preloaded once in the fork
  server, and exercised once there (`warmup`), so a replacement worker is a fork that is ready,
  warm, in milliseconds;
- one job at a time per worker over its own pipe; a job's clock starts when it is sent, so time
  spent waiting for a free worker never counts against it;
- the dispatcher sleeps in `multiprocessing.connection.wait` until the nearest deadline, then
  SIGKILLs the late worker and starts a replacement without waiting for it: a hung job is
  reported within its timeout plus milliseconds, and the batch goes on;
- a worker that dies mid-job (segfault, `os._exit`) fails that job and is replaced; a reward that
  raises anything, `BaseException` included, fails only its job;
- a worker that dies before it is ready (a preload or warm-up that raises or exits) is restarted
  after a back-off that doubles (`startup_backoff_s`, at most `MAX_BACKOFF_S`); after
  `max_start_failures` failures in a row in one slot, `run` raises `WorkerStartupError` with the
  worker's own error, instead of restarting in a tight loop;
- a reward must return a real number: bool, int and float count, a string (even "1.0") is a
  failure of its job, as is NaN or inf.
"""
from __future__ import annotations

import importlib
import math
import multiprocessing as mp
import numbers
import os
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Sequence

DEFAULT_PRELOAD = ("megatron_vlm.rewards.warmup",)  # imports and exercises every built-in verifier
START_METHODS = ("forkserver", "spawn")
MAX_ERROR_CHARS = 500
MAX_BACKOFF_S = 5.0


class WorkerStartupError(RuntimeError):
    """A reward worker failed to start `max_start_failures` times in a row; the message carries
    the worker's last error (its exception, or its exit code)."""


@dataclass(frozen=True)
class Job:
    """One reward call: `resolve_reward_fn(fn_spec)(*args)` in a worker."""
    fn_spec: str
    args: tuple


@dataclass(frozen=True)
class JobResult:
    value: float | None      # None when the job failed
    error: str | None        # why it failed
    timed_out: bool
    elapsed_s: float         # from sending the job to its result (or to the kill)


def _start_up(warm_specs: Sequence[str], preload: Sequence[str]) -> dict[str, Any]:
    from megatron_vlm.rewards.registry import resolve_reward_fn

    for module in preload:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    functions: dict[str, Any] = {}
    for spec in warm_specs:  # a bad spec is reported by the jobs that use it
        try:
            functions[spec] = resolve_reward_fn(spec)
        except Exception:
            pass
    return functions


def _call(function: Any, args: tuple) -> float:
    value = function(*args)
    if not isinstance(value, numbers.Real):  # bool and int are Real; "1.0" is not
        raise TypeError(f"reward returned {type(value).__name__} {str(value)[:40]!r}; "
                        f"it must return a real number (bool, int or float)")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"reward returned a non-finite value {value}")
    return value


def _worker_main(conn: Connection, warm_specs: Sequence[str], preload: Sequence[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        functions = _start_up(warm_specs, preload)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which backs off
        conn.send(("startup_error", f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS],
                   traceback.format_exc()[-MAX_ERROR_CHARS:]))
        conn.close()
        os._exit(1)
    from megatron_vlm.rewards.registry import resolve_reward_fn

    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        job_id, spec, args = message
        try:
            if spec not in functions:
                functions[spec] = resolve_reward_fn(spec)
            reply = (job_id, _call(functions[spec], args), None)
        except BaseException as e:  # noqa: BLE001 - math-verify's TimeoutException, SystemExit
            reply = (job_id, None, f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS])
        conn.send(reply)


@dataclass
class _Worker:
    process: Any
    conn: Connection
    ready: bool = False
    job: tuple[int, float] | None = None  # (job index, send time)


class WorkerPool:
    """`run(jobs, timeout_s)` -> one `JobResult` per job, in order. Not thread-safe."""

    def __init__(self, num_workers: int, *, start_method: str = "forkserver",
                 warm_specs: Sequence[str] = (), preload: Sequence[str] = DEFAULT_PRELOAD,
                 startup_timeout_s: float = 120.0, max_start_failures: int = 4,
                 startup_backoff_s: float = 0.5):
        if start_method not in START_METHODS:
            raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":  # takes effect if the fork server is not running yet
            self._ctx.set_forkserver_preload(list(preload))
        self._warm_specs, self._preload = tuple(warm_specs), tuple(preload)
        self._startup_timeout_s = startup_timeout_s
        self._max_start_failures, self._startup_backoff_s = max_start_failures, startup_backoff_s
        self.restarts = 0  # workers killed or dead and replaced, over the pool's life
        self.start_failures = 0  # workers that died before they were ready, over the pool's life
        self._failed_starts = [0] * num_workers          # per slot, in a row
        self._restart_at: list[float | None] = [None] * num_workers  # a slot waiting out its back-off
        self._workers = [self._start() for _ in range(num_workers)]

    def _start(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, daemon=True,
                                    args=(child_conn, self._warm_specs, self._preload))
        process.start()
        child_conn.close()  # so that the parent sees EOF when the child dies
        return _Worker(process, parent_conn)

    def _replace(self, index: int) -> None:
        worker = self._workers[index]
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()
        self.restarts += 1
        self._workers[index] = self._start()

    def _start_failed(self, index: int, error: str) -> None:
        """The worker in slot `index` died before it was ready: back off, or give up."""
        worker = self._workers[index]
        worker.process.join(timeout=5)
        worker.conn.close()
        self.start_failures += 1
        self._failed_starts[index] += 1
        tries = self._failed_starts[index]
        if tries >= self._max_start_failures:
            raise WorkerStartupError(f"reward worker failed to start {tries} times in a row; last error: {error}")
        self._restart_at[index] = time.monotonic() + min(MAX_BACKOFF_S, self._startup_backoff_s * 2 ** (tries - 1))

    def _restart_due(self) -> None:
        now = time.monotonic()
        for index, due in enumerate(self._restart_at):
            if due is not None and now >= due:
                self._restart_at[index] = None
                self.restarts += 1
                self._workers[index] = self._start()

    def _live(self) -> list[tuple[int, _Worker]]:
        return [(i, w) for i, w in enumerate(self._workers) if self._restart_at[i] is None]

    def run(self, jobs: Sequence[Job], timeout_s: float) -> list[JobResult]:
        results: list[JobResult | None] = [None] * len(jobs)
        queue = deque(range(len(jobs)))
        last_progress = time.monotonic()
        while queue or any(w.job is not None for w in self._workers):
            self._restart_due()
            self._dispatch(jobs, queue, results)
            now = time.monotonic()
            deadlines = [w.job[1] + timeout_s for w in self._workers if w.job is not None]
            deadlines += [due for due in self._restart_at if due is not None]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 1.0
            readable = wait([w.conn for _, w in self._live()], timeout=wait_s)
            if self._collect(readable, results) or deadlines:
                last_progress = time.monotonic()
            self._kill_late(timeout_s, results)
            if time.monotonic() - last_progress > self._startup_timeout_s:
                raise RuntimeError(f"no reward worker became ready in {self._startup_timeout_s} s")
        return results  # type: ignore[return-value]

    def _dispatch(self, jobs: Sequence[Job], queue: deque, results: list) -> None:
        for index, worker in self._live():
            if not (queue and worker.ready and worker.job is None):
                continue
            job_index = queue.popleft()
            job = jobs[job_index]
            try:
                worker.conn.send((job_index, job.fn_spec, job.args))
            except (BrokenPipeError, EOFError, ConnectionError):
                queue.appendleft(job_index)  # the worker died while idle
                self._replace(index)
                continue
            except Exception as e:  # e.g. arguments that cannot be pickled
                results[job_index] = JobResult(None, f"cannot send job: {type(e).__name__}: {e}", False, 0.0)
                continue
            worker.job = (job_index, time.monotonic())

    def _collect(self, readable: list, results: list) -> bool:
        progressed = False
        for index, worker in self._live():
            if worker.conn not in readable:
                continue
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                if not worker.ready:
                    worker.process.join(timeout=1)
                    self._start_failed(index, f"worker exited during start-up (exit code {worker.process.exitcode})")
                    continue
                if worker.job is not None:
                    job_index, sent = worker.job
                    worker.process.join(timeout=1)  # reap it, to report its exit code
                    code = worker.process.exitcode
                    results[job_index] = JobResult(None, f"worker died (exit code {code})", False,
                                                   time.monotonic() - sent)
                self._replace(index)
                continue
            progressed = True
            if message[0] == "ready":
                worker.ready = True
                self._failed_starts[index] = 0
                continue
            if message[0] == "startup_error":
                self._start_failed(index, message[1])
                continue
            job_index, value, error = message
            results[job_index] = JobResult(value, error, False, time.monotonic() - worker.job[1])
            worker.job = None
        return progressed

    def _kill_late(self, timeout_s: float, results: list) -> None:
        now = time.monotonic()
        for index, worker in self._live():
            if worker.job is not None and now - worker.job[1] >= timeout_s:
                job_index, sent = worker.job
                worker.process.kill()
                results[job_index] = JobResult(None, f"timed out after {timeout_s} s", True,
                                               time.monotonic() - sent)
                self._replace(index)

    def close(self) -> None:
        self._workers = [w for _, w in self._live()]
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=2)
            worker.conn.close()
        self._workers = []

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
