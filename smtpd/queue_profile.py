"""``smtpctl profile queue`` and ``smtpd -T queue``: timing and tracing of queue I/O.

OpenSMTPD wraps each queue backend operation (queue_backend.c) in
``profile_enter(name)``/``profile_leave()`` and logs
``profile-queue: queue_message_commit 0.000812345`` per operation when profiling is
on; ``-T queue`` logs each operation and its result (``queue-backend: ...``).

Here the queue process's storage backend (what ``smtpd.queue.prepare`` returns, the
spool) is seen through ``Observed``, which times and traces every public method
call when its switch is on and forwards it untouched otherwise.  Generators (the
spool walk at start) are timed step by step.  Operation names are OpenSMTPD's where
one exists, ``queue_<method>`` otherwise.
"""
from __future__ import annotations

import functools
import inspect
import time

from common.trace import FLAGS, trace

# Our spool's method -> OpenSMTPD's operation name (queue_backend.c profile_enter).
OPERATION = {
    "create_message": "queue_message_create",
    "rollback": "queue_message_delete",
    "commit": "queue_message_commit",
    "commit_batch": "queue_message_commit",
    "read_message": "queue_message_fd_r",
    "open_message": "queue_message_fd_r",
    "open_body": "queue_message_fd_rw",
    "write_incoming_envelope": "queue_envelope_create",
    "delete_envelope": "queue_envelope_delete",
    "load_envelope": "queue_envelope_load",
    "load_envelope_mtime": "queue_envelope_load",
    "listed_envelope": "queue_envelope_load",
    "update_envelope": "queue_envelope_update",
    "walk": "queue_message_walk",
    "move_to_corrupt": "queue_message_corrupt",
}


def _short(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:016x}" if value > 0xFFFFFFFF else f"{value:08x}"
    ident = getattr(value, "id", None)
    if isinstance(ident, int):
        return f"evp:{ident:016x}"
    if isinstance(value, (str, bytes)) or value is None:
        return repr(value)[:40]
    return type(value).__name__


def _report(op: str, args: tuple, result, elapsed_ns: int) -> None:
    if FLAGS.profile_queue:
        trace("profile-queue: %s %d.%09d", op, elapsed_ns // 1_000_000_000, elapsed_ns % 1_000_000_000)
    if FLAGS.queue:
        trace("queue-backend: %s(%s) -> %s", op, ", ".join(_short(a) for a in args), _short(result))


class Observed:
    """A transparent proxy of the queue backend; attribute reads are forwarded."""

    def __init__(self, backend) -> None:
        object.__setattr__(self, "_backend", backend)

    def __getattr__(self, name: str):
        value = getattr(self._backend, name)
        if name.startswith("_") or not callable(value):
            return value
        if not (FLAGS.profile_queue or FLAGS.queue):
            return value
        op = OPERATION.get(name, f"queue_{name}")
        if inspect.isgeneratorfunction(getattr(type(self._backend), name, None)):
            return functools.partial(_timed_steps, op, value)

        @functools.wraps(value)
        def timed(*args, **kwargs):
            started = time.perf_counter_ns()
            result = exc = None
            try:
                result = value(*args, **kwargs)
                return result
            except BaseException as e:
                exc = e
                raise
            finally:
                _report(op, args, exc if exc is not None else result, time.perf_counter_ns() - started)
        return timed

    def __setattr__(self, name: str, value) -> None:
        setattr(self._backend, name, value)


def _timed_steps(op: str, method, *args, **kwargs):
    iterator = method(*args, **kwargs)
    for _ in range(1 << 40):             # as long as the walk itself
        started = time.perf_counter_ns()
        try:
            item = next(iterator)
        except StopIteration:
            return
        _report(op, args, item[0] if isinstance(item, tuple) and item else item,
                time.perf_counter_ns() - started)
        yield item
