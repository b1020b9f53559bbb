"""``mailq`` (``smtpctl show queue``) while the daemon is down: the spool read directly.

As OpenSMTPD's smtpctl does when it cannot reach the control socket (do_show_queue):
every envelope file of ``queue/`` (16 hex digits under ``XX/<msgid>/``) is read and
printed with the runstate ``offline``; the expiry is the envelope's ctime + ttl, as
OpenSMTPD prints it offline (the daemon's configuration is not read).  The spool's
directories are the queue user's, mode 0700: only root (or the user an unprivileged
daemon runs as) may list them, as only they may run ``show queue`` (``need root
privileges`` otherwise).  The spool is
``$SMTPD_SPOOL``, else ``/var/spool/smtpd``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

from common import envelope as envcodec
from smtpctl import format as fmt
from smtpctl.client import Connection, NotRunning

DEFAULT_SPOOL = "/var/spool/smtpd"
MAX_ENVELOPE = 64 * 1024            # an envelope file is a few hundred bytes


def spool_path() -> Path:
    return Path(os.environ.get("SMTPD_SPOOL") or DEFAULT_SPOOL)


def daemon_down(sock: str) -> bool:
    """Nothing answers on the control socket (smtpctl then reads the spool)."""
    try:
        Connection(sock).close()
    except NotRunning:
        return True
    return False


def _is_hex(name: str, size: int) -> bool:
    return len(name) == size and all(c in "0123456789abcdef" for c in name)


def envelope_files(queue: Path, msgid: int = 0) -> Iterator[tuple[int, Path]]:
    """(evpid, path) of every envelope of queue/, in evpid order (only ``msgid``'s
    when it is not 0)."""
    buckets = [f"{msgid >> 24:02x}"] if msgid else sorted(os.listdir(queue))
    for bucket in buckets:
        if not _is_hex(bucket, 2) or not (queue / bucket).is_dir():
            continue
        names = [f"{msgid:08x}"] if msgid else sorted(os.listdir(queue / bucket))
        for name in names:
            directory = queue / bucket / name
            if not _is_hex(name, 8) or not directory.is_dir():
                continue
            for entry in sorted(os.listdir(directory)):
                if _is_hex(entry, 16):
                    yield int(entry, 16), directory / entry


def offline_fields(evpid: int, env: envcodec.Envelope) -> dict:
    return {
        "evpid": evpid, "sockaddr": env.sockaddr, "type": env.type, "flags": env.flags,
        "sender": env.sender, "rcpt": env.rcpt, "dest": env.dest, "ctime": env.ctime,
        "expire": env.ctime + env.ttl, "lasttry": env.last_try, "retry": env.retry,
        "runstate": "offline", "runtime": None, "errorline": env.errorline,
    }


def show_offline(as_json: bool, msgid: int = 0) -> int:
    """Print the queue from the spool; the exit status."""
    queue = spool_path() / "queue"
    try:
        # root, or the user an unprivileged daemon runs as (who owns queue/): the
        # same users control lets run show queue, whatever else could read the files
        if os.geteuid() not in (0, queue.stat().st_uid):
            raise PermissionError
        files = list(envelope_files(queue, msgid))
    except PermissionError:
        print("smtpctl: need root privileges", file=sys.stderr)
        return 1
    except FileNotFoundError:
        # no spool either: nothing to list, as for any command without the daemon
        print("smtpctl: smtpd doesn't seem to be running", file=sys.stderr)
        return 1
    for evpid, path in files:
        try:
            with open(path, "rb") as f:
                env = envcodec.load(f.read(MAX_ENVELOPE), evpid)
        except FileNotFoundError:
            continue                    # delivered meanwhile
        except (OSError, envcodec.EnvelopeError) as exc:
            print(f"smtpctl: {evpid:016x}: {exc}", file=sys.stderr)
            continue
        fields = offline_fields(evpid, env)
        print(fmt.format_queue_json(fields) if as_json else fmt.format_queue_line(fields))
    return 0
