"""Privilege separation: the users, the confinement, and dropping to them.

Started as root, each child but the parent runs as ``_smtpd`` (the queue as
``_smtpq``) with no supplementary groups, chrooted where OpenSMTPD chroots (control,
scheduler and pony to the runtime directory, which holds only the channels; the
queue to the spool; lka not, as it reads tables, home directories and
resolv.conf), with no-new-privs and an empty capability bounding set.  Started as
any other user, nothing is dropped and every process runs as that user, with
no-new-privs.  What each process can still do: docs/security.md.
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

# OpenSMTPD chroots control, scheduler, the dispatcher (our pony) and ca to
# /var/empty, the queue to the spool, and leaves lka outside (control.c, scheduler.c,
# dispatcher.c, ca.c, queue.c, lka.c).  Our empty directory is the runtime directory:
# it holds nothing but the channel sockets these processes connect to.
CHROOT_IN_RUNDIR = ("control", "scheduler", "pony")

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


def chroot_dir(proc: str, rundir: str, spool: str) -> str | None:
    """The directory ``proc`` is chrooted to (None: not chrooted); root only."""
    if not privileged():
        return None
    if proc in CHROOT_IN_RUNDIR:
        return rundir
    return spool if proc == "queue" else None


_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_LAST_CAP = "/proc/sys/kernel/cap_last_cap"


def _prctl(what: str, option: int, arg: int = 0, arg3: int = 0) -> None:
    if _libc.prctl(option, arg, arg3, 0, 0) != 0:
        raise PrivsepError(f"{what}: {os.strerror(ctypes.get_errno())}")


def restrict() -> None:
    """No-new-privs, no ambient capabilities and, as root, an empty capability
    bounding set: nothing this process or anything it could execute gains a
    privilege again (setuid files, file capabilities).  Called at a child's start,
    before any thread exists, as these are per-thread attributes inherited only by
    threads created later; the bounding set needs CAP_SETPCAP, so before the drop."""
    _prctl("cannot set no-new-privs", _PR_SET_NO_NEW_PRIVS, 1)
    _prctl("cannot clear the ambient capabilities", _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    if privileged():
        with open(CAP_LAST_CAP) as f:
            last = int(f.read())
        for cap in range(last + 1):
            _prctl("cannot empty the capability bounding set (it needs CAP_SETPCAP, "
                   "which systemd/smtpd.service keeps)", _PR_CAPBSET_DROP, cap)


def drop(proc: str, root: str | None = None) -> None:
    """Chroot to ``root`` (if given), then become the process's user for good (no way
    back, no supplementary groups, no capability left)."""
    if not privileged():
        return
    ids = ids_for(proc)             # the user database is not in the chroot
    if root is not None:
        os.chroot(root)
        os.chdir("/")
    os.setgroups([])
    os.setresgid(ids.gid, ids.gid, ids.gid)
    os.setresuid(ids.uid, ids.uid, ids.uid)
    if os.getuid() != ids.uid or os.geteuid() != ids.uid or os.getgroups():
        raise PrivsepError(f"{proc}: privilege drop failed")


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the parent dies (set after any uid change,
    which clears it), then close the race with a check of the current parent."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)
