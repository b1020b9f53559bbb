"""Privilege separation: the users, and dropping to them.

Started as root, each child but the parent runs as ``_smtpd`` (the queue as
``_smtpq``) with no supplementary groups.  Started as any other user, nothing
is dropped and every process runs as that user.
"""
from __future__ import annotations

import ctypes
import os
import pwd
import signal
from dataclasses import dataclass

SMTPD_USER = "_smtpd"
SMTPQ_USER = "_smtpq"

PROC_USER = {"control": SMTPD_USER, "lka": SMTPD_USER, "pony": SMTPD_USER,
             "scheduler": SMTPD_USER, "queue": SMTPQ_USER}

CREATE_USERS_HINT = (
    "create them with: useradd -r -M -d /var/empty -s /usr/sbin/nologin _smtpd && "
    "useradd -r -M -d /var/spool/smtpd -s /usr/sbin/nologin _smtpq "
    "(or install the sysusers.d snippet from systemd/)")


class PrivsepError(Exception):
    pass


@dataclass(frozen=True)
class Ids:
    uid: int
    gid: int


def privileged() -> bool:
    return os.geteuid() == 0


def ids_for(proc: str) -> Ids:
    """The uid/gid a process runs as: its user when root, else the current ids."""
    if not privileged() or proc == "parent":
        return Ids(os.getuid(), os.getgid())
    name = PROC_USER[proc]
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise PrivsepError(f"unknown user {name}; {CREATE_USERS_HINT}") from None
    return Ids(pw.pw_uid, pw.pw_gid)


def check_users() -> None:
    for proc in PROC_USER:
        ids_for(proc)


def drop(proc: str) -> None:
    """Become the process's user for good (no way back, no supplementary groups)."""
    if not privileged():
        return
    ids = ids_for(proc)
    os.setgroups([])
    os.setresgid(ids.gid, ids.gid, ids.gid)
    os.setresuid(ids.uid, ids.uid, ids.uid)
    if os.getuid() != ids.uid or os.geteuid() != ids.uid or os.getgroups():
        raise PrivsepError(f"{proc}: privilege drop failed")


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the parent dies (set after any uid change,
    which clears it), then close the race with a check of the current parent."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)
