"""The real OpenSMTPD (Debian's opensmtpd package, unpacked, never installed) booted for tests.

The reference the fidelity tests compare pysmtpd with. The package is fetched with
``apt-get download`` into a cache directory and unpacked with ``dpkg -x``; nothing of it is
installed on the machine. Its paths are compiled in (``strings usr/sbin/smtpd``): the spool
``/var/spool/smtpd``, the control socket ``/var/run/smtpd.sock`` and the chroot
``/var/lib/opensmtpd/empty``, and it drops privileges to the ``opensmtpd`` and ``opensmtpq``
users (Debian's names for _smtpd/_smtpq). So the daemon runs as root in a private mount
namespace (``unshare -m``) where tmpfs hide /var/spool, /run and /var/lib: the host's spool and
/run are never touched, and everything it wrote vanishes with its last process.

Where this cannot run (no apt-get, the download fails, not root) the caller skips with the
reason; under CI (``CI`` set in the environment) it fails instead, as CI has the registry.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PACKAGE = "opensmtpd"
# Debian's privilege-separation users for smtpd (its children) and the queue.
USERS = ("opensmtpd", "opensmtpq")
CACHE = Path(os.environ.get("PYSMTPD_ORACLE_CACHE",
                            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pysmtpd-oracle"))
BOOT_TIMEOUT = 15.0

# Run inside the private mount namespace before smtpd starts: its compiled-in paths on tmpfs.
# The resolver file is replaced by one naming only loopback, so the daemon's reverse lookups of
# the client never leave the machine (an /etc/resolv.conf pointing into /run would be hidden).
_NAMESPACE_SCRIPT = r"""
set -e
resolv=$(readlink -f /etc/resolv.conf || echo /etc/resolv.conf)
mount -t tmpfs -o mode=755 tmpfs /var/spool
mkdir -m 711 /var/spool/smtpd
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p -m 755 /var/lib
mount -t tmpfs -o mode=755 tmpfs /var/lib
mkdir -p -m 755 /var/lib/opensmtpd/empty
mkdir -p "$(dirname "$resolv")"
[ -e "$resolv" ] || : > "$resolv"
mount --bind "$PRIVATE_RESOLV" "$resolv"
exec "$SMTPD" -d -f "$CONFIG"
"""


class Unavailable(Exception):
    """OpenSMTPD cannot be fetched or run here; the message says why."""


def unavailable(reason: str):
    """Skip with the reason, or fail under CI, where the oracle must run."""
    if os.environ.get("CI"):
        pytest.fail(f"OpenSMTPD oracle must run in CI: {reason}")
    pytest.skip(f"OpenSMTPD oracle unavailable: {reason}")


def fetch(cache: Path = CACHE) -> Path:
    """The unpacked package's root directory (downloaded and unpacked once per cache)."""
    return unpack_package(PACKAGE, cache / "root", "usr/sbin/smtpd", keep_deb=True)


def unpack_package(package: str, root: Path, ready: str, keep_deb: bool = False) -> Path:
    """Debian's ``package`` unpacked at ``root`` (``apt-get download`` + ``dpkg -x``, never
    installed), unless ``root/ready`` is already there; raises Unavailable with the reason.

    Several test runs may fetch at once (helpers share a machine): each downloads and unpacks
    in a directory of its own, and the first to finish installs its copy by a rename.
    ``keep_deb`` leaves the .deb beside ``root`` (version() reads its name)."""
    if (root / ready).exists():
        return root
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise Unavailable("apt-get/dpkg not found (a Debian-family system is needed)")
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fetch-", dir=root.parent))
    try:
        deb = _download(package, work)
        if deb is None and os.geteuid() == 0:
            # A fresh container has no package lists yet: read them once, then retry.
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
            deb = _download(package, work)
        if deb is None:
            raise Unavailable(f"apt-get download {package} failed (no Debian registry reachable?)")
        subprocess.run(["dpkg", "-x", str(deb), str(work / "root")], check=True, timeout=120,
                       capture_output=True)
        (work / "root").chmod(0o755)          # mkdtemp's 0700 would hide it from dropped users
        if keep_deb:
            os.replace(deb, root.parent / deb.name)
        try:
            os.rename(work / "root", root)
        except OSError:
            if not (root / ready).exists():      # not another run's copy: a real error
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return root


def _download(package: str, directory: Path) -> Path | None:
    try:
        subprocess.run(["apt-get", "download", "-qq", package], cwd=directory,
                       capture_output=True, timeout=300, check=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    debs = sorted(directory.glob(f"{package}_*.deb"))
    return debs[-1] if debs else None


def version(root: Path) -> str:
    deb = sorted(root.parent.glob(f"{PACKAGE}_*.deb"))
    return deb[-1].name.split("_")[1] if deb else "unknown"


def missing_libraries(smtpd: Path) -> list[str]:
    out = subprocess.run(["ldd", str(smtpd)], capture_output=True, text=True).stdout
    return re.findall(r"^\s*(\S+) => not found", out, re.M)


def ensure_users() -> None:
    for user in USERS:
        if not _user_exists(user):
            home = "/var/spool/smtpd" if user == "opensmtpq" else "/var/lib/opensmtpd/empty"
            res = subprocess.run(["useradd", "-r", "-M", "-d", home, "-s", "/usr/sbin/nologin", user],
                                 capture_output=True, text=True)
            if res.returncode != 0 and not _user_exists(user):    # else made by a concurrent run
                raise AssertionError(f"useradd {user}: {res.stderr.strip()}")


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


class OpenSmtpd:
    """One OpenSMTPD daemon (``smtpd -d``) in a private mount namespace, its own process group."""

    def __init__(self, base: Path, config_text: str, root: Path) -> None:
        self.base = base
        self.root = root
        self.smtpd = root / "usr/sbin/smtpd"
        self.config = base / "opensmtpd.conf"
        self.config.write_text(config_text)
        self.logfile = base / "opensmtpd.log"
        self.proc: subprocess.Popen | None = None

    @classmethod
    def prepare(cls, base: Path, config_text: str) -> "OpenSmtpd":
        """Fetch, unpack and check what running needs; raises Unavailable with the reason."""
        if os.geteuid() != 0:
            raise Unavailable("smtpd must start as root (privilege separation, mount namespace)")
        if shutil.which("unshare") is None:
            raise Unavailable("unshare (util-linux) not found")
        root = fetch()
        missing = missing_libraries(root / "usr/sbin/smtpd")
        if missing:
            raise Unavailable(f"libraries missing: {', '.join(missing)} (contrib/dev.sh installs them)")
        ensure_users()
        return cls(base, config_text, root)

    def check_config(self) -> None:
        res = subprocess.run([str(self.smtpd), "-n", "-f", str(self.config)], capture_output=True,
                             text=True, timeout=30)
        if res.returncode != 0:
            raise AssertionError(f"OpenSMTPD refuses the configuration:\n{res.stderr}{res.stdout}")

    def start(self, ports: list[int]) -> "OpenSmtpd":
        self.check_config()
        resolv = self.base / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\n")
        env = {**os.environ, "SMTPD": str(self.smtpd), "CONFIG": str(self.config),
               "PRIVATE_RESOLV": str(resolv)}
        self._log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                      _NAMESPACE_SCRIPT], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not all(_listening(p) for p in ports):
            if self.proc.poll() is not None:
                raise AssertionError(f"OpenSMTPD exited at start:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"OpenSMTPD not listening after {BOOT_TIMEOUT}s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        # smtpd's children share the group (start_new_session): none may outlive the test.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 5
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._log.close()
        assert not _group_alive(pgid), "OpenSMTPD processes left behind"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process remains in the group."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
