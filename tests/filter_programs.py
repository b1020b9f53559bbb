"""Real OpenSMTPD filters for the end-to-end tests, and the private DNS they may need.

* ``debian_filter(package, program)``: a filter packaged by Debian (opensmtpd-filter-dkimsign,
  opensmtpd-filter-senderscore...), fetched with ``apt-get download`` and unpacked with
  ``dpkg -x`` into a cache, never installed (installing would pull the opensmtpd daemon).
* ``libopensmtpd_filter(name, source)``: a C filter compiled in the test against Debian's
  libopensmtpd (OpenSMTPD's filter library: its parser of the protocol, its session state).
* ``PrivateDns``: a loopback DNS server on 127.0.0.1:53 and a resolv.conf naming only it, and
  the command prefix that runs a daemon in a private mount namespace where that resolv.conf
  is /etc/resolv.conf.  The daemon's reverse lookups of its clients, its forward
  confirmation and the filters it starts (which inherit the namespace) then ask this
  server and nothing outside the machine.  OpenSMTPD's oracle (tests/oracle/opensmtpd.py)
  already runs with ``nameserver 127.0.0.1``: both daemons see the same answers.

The cache is world-readable (filters run as _smtpd, which cannot enter root's home):
``$PYSMTPD_FILTER_CACHE`` or a directory of the system's temporary directory owned by the
current user and writable by nobody else.  A package that cannot be fetched, a compiler or
library that is missing: ``FilterUnavailable`` with the reason, and the tests fail with it
(contrib/dev.sh installs what they need; CI reaches Debian's registry).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tests.conftest import Daemon
from tests.dns_server import DnsServer
from tests.e2e.sink import Sink
from tests.oracle import opensmtpd

DNS_ADDRESS = "127.0.0.1"         # what the oracle's resolv.conf names, port 53 implied
DNS_BIND_WAIT = 60.0              # another test run may hold the port for a while


class FilterUnavailable(Exception):
    """A filter program cannot be had here; the message says why."""


def private_dns(records: dict[str, dict[str, list[str]]]) -> "PrivateDns":
    """A PrivateDns for a test module.  It needs root: run unprivileged (a developer's
    checkout), the module is skipped with the reason; under CI (which runs as root) and
    for any other cause it fails."""
    if os.geteuid() != 0 and not os.environ.get("CI"):
        import pytest
        pytest.skip("the filter tests need root (port 53 and a mount namespace for the private DNS)")
    try:
        return PrivateDns(records)
    except FilterUnavailable as exc:
        import pytest
        pytest.fail(f"private DNS unavailable: {exc}")


def cache_dir() -> Path:
    configured = os.environ.get("PYSMTPD_FILTER_CACHE")
    path = Path(configured) if configured else Path(tempfile.gettempdir()) / f"pysmtpd-filters-{os.getuid()}"
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise FilterUnavailable(f"{path}: not a directory of ours, or writable by others")
    return path


def debian_filter(package: str, program: str) -> Path:
    """The unpacked ``/usr/libexec/opensmtpd/PROGRAM`` of Debian's ``package``."""
    root = cache_dir() / package
    binary = root / "usr/libexec/opensmtpd" / program
    if not binary.exists():
        _fetch(package, root)
    if not binary.exists():
        raise FilterUnavailable(f"{package} has no usr/libexec/opensmtpd/{program}")
    missing = opensmtpd.missing_libraries(binary)
    if missing:
        raise FilterUnavailable(f"{program}: libraries missing: {', '.join(missing)} "
                                "(contrib/dev.sh install_test_tools installs them)")
    return binary


def _fetch(package: str, root: Path) -> None:
    try:
        opensmtpd.unpack_package(package, root, ".")
    except opensmtpd.Unavailable as exc:
        raise FilterUnavailable(f"{package}: {exc}") from None


def libopensmtpd_filter(name: str, source: str) -> Path:
    """``source`` compiled with ``cc ... -lopensmtpd`` (cached by its hash)."""
    if shutil.which("cc") is None:
        raise FilterUnavailable("no C compiler (contrib/dev.sh installs gcc)")
    if not Path("/usr/include/opensmtpd.h").exists():
        raise FilterUnavailable("opensmtpd.h missing (contrib/dev.sh installs libopensmtpd-dev)")
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    binary = cache_dir() / f"{name}-{digest}"
    if binary.exists():
        return binary
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache_dir()))
    try:
        (work / f"{name}.c").write_text(source)
        res = subprocess.run(["cc", "-O1", "-Wall", "-o", name, f"{name}.c", "-lopensmtpd"],
                             cwd=work, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise FilterUnavailable(f"building {name} failed:\n{res.stderr}")
        (work / name).chmod(0o755)
        os.replace(work / name, binary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return binary


class PrivateDns:
    """A DNS server answering ``records`` on 127.0.0.1:53, and the resolv.conf naming it.

    Needs root (port 53, the mount namespace).  Use as a context manager; ``prefix`` is
    what tests/conftest.py's Daemon puts before its command."""

    def __init__(self, records: dict[str, dict[str, list[str]]]) -> None:
        if os.geteuid() != 0:
            raise FilterUnavailable("a private resolver needs root (port 53, a mount namespace)")
        if shutil.which("unshare") is None:
            raise FilterUnavailable("unshare (util-linux) not found")
        self.server = DnsServer(records)
        self.server.udp.close()
        self.server.udp = _bind_dns_port()
        self.server.port = 53
        self.directory = shared_dir("pysmtpd-filter-dns-")
        self.resolv = self.directory / "resolv.conf"
        self.resolv.write_text(f"nameserver {DNS_ADDRESS}\noptions timeout:2 attempts:1\n")
        self.resolv.chmod(0o644)

    @property
    def queries(self) -> list[tuple[str, str]]:
        return self.server.queries

    @property
    def prefix(self) -> list[str]:
        script = ('set -e; target=$(readlink -f /etc/resolv.conf || echo /etc/resolv.conf); '
                  '[ -e "$target" ] || : > "$target"; mount --bind "$0" "$target"; exec "$@"')
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(self.resolv)]

    def __enter__(self) -> "PrivateDns":
        self.server.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.server.__exit__(*exc)
        shutil.rmtree(self.directory, ignore_errors=True)


def _bind_dns_port() -> socket.socket:
    deadline = time.monotonic() + DNS_BIND_WAIT
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((DNS_ADDRESS, 53))
            return sock
        except OSError as exc:
            sock.close()
            if time.monotonic() > deadline:
                raise FilterUnavailable(f"{DNS_ADDRESS}:53 stays busy: {exc}") from None
            time.sleep(0.5)


# --- the two servers the filter tests run against -------------------------------------------

SERVERS = ("pysmtpd", "opensmtpd")


@dataclass
class Server:
    """A running pysmtpd (in the private DNS's namespace) or OpenSMTPD 6.8 (the oracle, whose
    own namespace names 127.0.0.1 as its resolver), same configuration, relaying what it
    accepts to ``sink`` (the oracle, unpacked, cannot deliver locally: its mail.maildir is
    not where its binary looks)."""
    kind: str
    ports: dict[str, int]
    sink: Sink
    log: Callable[[], str]
    _stop: Callable[[], None]

    def delivered(self, subject: str, timeout: float = 30.0) -> bytes:
        """The one message relayed with ``Subject: subject``, as the sink received it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [t.data for t in self.sink.transactions if f"Subject: {subject}".encode() in t.data]
            if found:
                assert len(found) == 1, f"{self.kind}: {subject!r} relayed {len(found)} times"
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"{self.kind}: no message {subject!r} relayed:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        try:
            self._stop()
        finally:
            self.sink.stop()


def relay_config(sink_port: int) -> str:
    """Every example.test recipient relayed to the sink."""
    return (f'action "relay" relay host "smtp://127.0.0.1:{sink_port}"\n'
            'match from any for domain "example.test" action "relay"\n')


def start_server(kind: str, base: Path, config_text: str, ports: dict[str, int],
                 dns: PrivateDns, sink: Sink) -> Server:
    """Boot ``kind`` with ``config_text`` (which relays to ``sink``, started here); the
    oracle's unavailability skips (or fails under CI) as in the fidelity tests."""
    sink.start()
    if kind == "pysmtpd":
        daemon = Daemon(base, config_text, prefix=dns.prefix)

        def stop_daemon() -> None:
            daemon.stop()
            assert not daemon.children(), "processes left behind"
        server = Server(kind, ports, sink, daemon.log, stop_daemon)
        try:
            daemon.start()
        except BaseException:
            server.stop()
            raise
        return server
    try:
        oracle = opensmtpd.OpenSmtpd.prepare(base, config_text)
    except opensmtpd.Unavailable as exc:
        sink.stop()
        opensmtpd.unavailable(str(exc))
    server = Server(kind, ports, sink, oracle.log, oracle.stop)
    try:
        oracle.start(list(ports.values()))
    except BaseException:
        server.stop()
        raise
    return server


def shared_dir(prefix: str) -> Path:
    """A directory the filters' user can read (pytest's temporary tree is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path
