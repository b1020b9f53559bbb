"""``mda "command"``, ``mda wrapper`` and ``|command`` aliases: a command run as the
user with the message on its standard input (mirrors OpenSMTPD's mda_unpriv.c and
the CHILD_MDA part of smtpd.c).

As OpenSMTPD: ``/bin/sh -c COMMAND`` in the user's home (``/`` if it cannot be
entered), in a session of its own, stdout and stderr to one scratch file whose last
line becomes the error text, an environment of exactly PATH, DOMAIN, HOME,
ORIGINAL_RECIPIENT, RECIPIENT, SHELL, LOCAL, LOGNAME, USER, SENDER and (with a
sub-address) EXTENSION, and the exit status mapped with sysexits: 0 delivered,
EX_TEMPFAIL and EX_OSERR temporary, anything else permanent, a signal temporary.

Hostile addresses (the CVE-2020-7247 class) never reach the shell as code: the
command text is the administrator's, expanded by smtpd/mda_variables.py whose
values have every character outside ``[A-Za-z0-9@._+=,-]`` replaced (only an
explicit ``:raw`` lifts that); the addresses themselves travel in environment
variables, which ``sh -c`` does not parse.  docs/delivery.md.
"""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time

from smtpd.delivery_body import MessageBody

SHELL = "/bin/sh"
DEFAULT_PATH = "/usr/bin:/bin:/usr/sbin:/sbin:/usr/local/bin"     # _PATH_DEFPATH
TIMEOUT = 300                      # OpenSMTPD's alarm(300) in forkmda
OUTPUT_LIMIT = 4096                # the tail of the output read for the error line

EX_OK = 0
EX_TEMPFAIL = 75
EX_OSERR = 71
SYSEXITS = {
    64: "command line usage error", 65: "data format error", 66: "cannot open input",
    67: "user unknown", 68: "host name unknown", 69: "service unavailable",
    70: "internal software error", 71: "system resource problem", 72: "critical OS file missing",
    73: "can't create user output file", 74: "input/output error", 75: "temporary failure",
    76: "remote error in protocol", 77: "permission denied", 78: "local configuration error",
}


def environment(*, home: str, username: str, sender: str, rcpt: str, dest: str,
                subaddress: str) -> dict[str, str]:
    """mda_unpriv.c's environment, nothing else of ours."""
    rcpt_user, _, rcpt_domain = rcpt.rpartition("@") if "@" in rcpt else (rcpt, "", "")
    env = {
        "PATH": DEFAULT_PATH,
        "DOMAIN": rcpt_domain,
        "HOME": home,
        "ORIGINAL_RECIPIENT": rcpt,
        "RECIPIENT": dest,
        "SHELL": SHELL,
        "LOCAL": rcpt_user,
        "LOGNAME": username,
        "USER": username,
        "SENDER": sender,
    }
    if subaddress:
        env["EXTENSION"] = subaddress
    # A NUL cannot be passed in the environment; nothing legitimate carries one.
    return {k: v.replace("\0", "") for k, v in env.items()}


def status_of(returncode: int, output: bytes, stdin_error: str) -> tuple[str, str]:
    """(status, error) of a finished command: smtpd.c's mapping and mda.c's text."""
    last = _last_line(output)
    if returncode < 0:
        return "tempfail", last or f"terminated; signal {-returncode}"
    if returncode == EX_OK:
        if stdin_error:
            return "tempfail", "mda exited prematurely"
        return "ok", ""
    why = SYSEXITS.get(returncode)
    text = last or "exited abnormally"
    text = f"Error ({why}: {text})" if why else f"Error ({text})"
    return ("tempfail" if returncode in (EX_TEMPFAIL, EX_OSERR) else "permfail"), text


def _last_line(output: bytes) -> str:
    lines = [line for line in output.replace(b"\r", b"").split(b"\n") if line.strip()]
    return lines[-1].decode("utf-8", "replace")[:256] if lines else ""


def run(command: str, body: MessageBody, env: dict[str, str], home: str,
        timeout: float = TIMEOUT) -> tuple[str, str]:
    """Run ``command`` with the message on stdin; (status, error)."""
    cwd = home if home and os.path.isdir(home) and os.access(home, os.X_OK) else "/"
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                [SHELL, "-c", command], stdin=subprocess.PIPE, stdout=out, stderr=out,
                env=env, cwd=cwd, start_new_session=True, close_fds=True,
                restore_signals=True)
        except OSError as exc:
            return "tempfail", f"cannot run the mda: {exc.strerror or exc}"
        deadline = time.monotonic() + timeout
        stdin_error = ""
        old = signal.signal(signal.SIGALRM, _timeout)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            try:
                body.write_to(proc.stdin.fileno())
            except BrokenPipeError:
                stdin_error = "mda exited prematurely"
            except OSError as exc:
                stdin_error = exc.strerror or str(exc)
            try:
                proc.stdin.close()
            except OSError:
                pass
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except (_Timeout, subprocess.TimeoutExpired):
            _kill_group(proc)
            return "tempfail", "terminated; timeout"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        out.seek(max(0, out.seek(0, os.SEEK_END) - OUTPUT_LIMIT))
        return status_of(proc.returncode, out.read(), stdin_error)


class _Timeout(Exception):
    pass


def _timeout(_signum, _frame) -> None:
    raise _Timeout


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
