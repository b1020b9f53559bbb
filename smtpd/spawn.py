"""How the parent starts its five children: forked by one zygote (the default), or
each exec'd on its own (``PYSMTPD_SPAWN=exec``); docs/architecture.md, "Memory".

Either way a child runs ``smtpd.main.main(ARGS)`` in a fresh ``python -I``
interpreter (the zygote is one), with exactly the descriptors named for it, the
parent as its parent process, and the environment of ``child_environment()``.
The parent sees each through a ``Child`` (a pid it can wait for, signal and kill,
as a ``subprocess.Popen``).
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Where the parent's own packages were loaded from: the children import the same
# code, and nothing else of what the current directory, $PYTHON* or the user site
# could offer (python -I).  The directory goes on their path only when the
# interpreter's site-packages does not already provide our packages from there
# (a venv or /usr/lib/python3*/site-packages do; the RPM's private /usr/share/pysmtpd
# or a checkout do not).
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_FIND_ROOT = (
    "import os, sys, importlib.util; root = {root!r}; "
    "spec = importlib.util.find_spec('smtpd'); "
    "ours = spec is not None and spec.origin is not None and "
    "os.path.realpath(spec.origin) == os.path.join(root, 'smtpd', '__init__.py'); "
    "ours or sys.path.insert(0, root); ")
CHILD_ENTRY = _FIND_ROOT + "from smtpd.main import main; main()"
ZYGOTE_ENTRY = (_FIND_ROOT + "from smtpd.zygote import serve; argv = serve(); "
                "from smtpd.main import main; main(argv)")

ZYGOTE_TIMEOUT = 30.0
_PR_SET_CHILD_SUBREAPER = 36


class SpawnError(Exception):
    pass


@dataclass
class ChildSpec:
    name: str
    args: list[str]          # what smtpd.main.main() parses
    fds: list[int]           # descriptors it inherits, at the same numbers


def interpreter(entry: str) -> list[str]:
    """``python -I -c ENTRY``: isolated from the working directory (which
    ``python -m`` would put first on the path, and the children start as root),
    from $PYTHONPATH and friends, and from the user site."""
    return [sys.executable, "-I", "-c", entry.format(root=PACKAGE_ROOT)]


def child_environment() -> dict[str, str]:
    """The parent's environment without the interpreter's variables (ignored by
    ``python -I`` anyway): nothing a child might run inherits them."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}


def use_zygote() -> bool:
    return os.environ.get("PYSMTPD_SPAWN", "zygote") != "exec"


class Child:
    """A child the parent adopted from the zygote: what the parent uses of a Popen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def _waited(self, flags: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:
                pid, status = self.pid, 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._waited(os.WNOHANG)

    def wait(self) -> int:
        return self._waited(0)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start_exec(specs: list[ChildSpec]) -> dict[str, subprocess.Popen]:
    """One exec'd interpreter per child (the way before the zygote)."""
    return {s.name: subprocess.Popen(interpreter(CHILD_ENTRY) + s.args, pass_fds=s.fds, close_fds=True,
                                     env=child_environment())
            for s in specs}


def _set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise SpawnError(f"cannot {'become' if on else 'stop being'} a child subreaper: "
                         f"{os.strerror(ctypes.get_errno())}")


def _read_report(fd: int, deadline: float) -> bytes | None:
    """All the zygote writes on ``fd`` up to its EOF, or None when it takes too long."""
    data = b""
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk
    return None


def start_zygote(specs: list[ChildSpec]) -> dict[str, Child]:
    """Start the zygote with every child's descriptors, have it fork the children,
    adopt them (blocking: call from a thread or at start).  The parent is a child
    subreaper only for the zygote's short life, so nothing else is ever adopted."""
    report_r, report_w = os.pipe()
    spec = {"parent_pid": os.getpid(),
            "children": [{"name": s.name, "argv": s.args, "keep": s.fds} for s in specs]}
    fds = sorted({fd for s in specs for fd in s.fds} | {report_w})
    _set_subreaper(True)
    try:
        try:
            zygote = subprocess.Popen(interpreter(ZYGOTE_ENTRY) + [json.dumps(spec), str(report_w)],
                                      pass_fds=fds, close_fds=True, env=child_environment())
        finally:
            os.close(report_w)
        data = _read_report(report_r, time.monotonic() + ZYGOTE_TIMEOUT)
        try:
            status = zygote.wait(ZYGOTE_TIMEOUT)
        except subprocess.TimeoutExpired:
            status = None
        if status is None or data is None:
            zygote.kill()
            status = zygote.wait()
    finally:
        os.close(report_r)
        _set_subreaper(False)
    try:
        pids = json.loads(data) if data else {}
    except ValueError:
        pids = {}
    children = {name: Child(pid) for name, pid in pids.items()}
    if status != 0 or set(children) != {s.name for s in specs}:
        for child in children.values():
            child.kill()
            child.wait()
        raise SpawnError(f"the zygote failed (status {status})")
    return children
