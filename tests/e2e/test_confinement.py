"""Confinement of the children, read from the kernel (/proc/PID/{root,status}) of a
booted daemon: no code imported from the start directory or $PYTHONPATH (issue 13,
point 1), chroot, no-new-privs and no capability (point 2).  docs/security.md says
what each process can still do."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from common import ipc
from tests.conftest import REPO, Daemon, free_port, wait_for
from tests.e2e.helpers import config, maildir_messages, send
from tests.e2e.ops_helpers import SyslogSocket
from tests.e2e.sink import Sink

CHILDREN = ("control", "lka", "queue", "scheduler", "pony")
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="confinement is for a daemon started as root; CI runs as root")
SMTPD_SCRIPT = REPO / ".venv" / "bin" / "smtpd"          # the console script, as installed

# Modules the daemon imports (dependencies, and one of the standard library): a copy
# planted where an attacker can write leaves a marker naming the importer, then hands
# over to the real module, so a daemon that imported it would still run (and be caught).
PLANTED = ("setproctitle", "zmq", "msgspec", "uvloop", "aiosmtpd", "dns", "argparse")
SHIM = '''\
import importlib, os, sys
with open(os.path.join({markers!r}, "{label}-" + __name__ + "-" + str(os.getpid())), "w") as _f:
    _f.write(" ".join(sys.argv))
_mine = os.path.realpath(os.path.dirname(__file__))
_saved = sys.path[:]
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != _mine]
del sys.modules[__name__]
try:
    _real = importlib.import_module(__name__)
finally:
    sys.path[:] = _saved
sys.modules[__name__] = _real
'''


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def test_the_queue_binds_every_channel_it_has():
    """The queue is chrooted to the spool, where the runtime directory is out of
    sight: it may only bind (a bound path is resolved once, before the chroot), never
    connect (ZeroMQ resolves the path again at each reconnection)."""
    assert [pair for pair in ipc.PAIRS if pair[1] == "queue"] == []
    assert len([pair for pair in ipc.PAIRS if pair[0] == "queue"]) == 5


@ROOT_ONLY
def test_every_child_is_confined_and_mail_flows_across_reload(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port))
    d.start()
    procs = d.children()
    assert set(procs) == {"smtpd: [priv]", *(f"smtpd: {c}" for c in CHILDREN)}, procs
    parent = proc_status(procs["smtpd: [priv]"])
    assert os.readlink(f"/proc/{procs['smtpd: [priv]']}/root") == "/" and parent["Uid"].split() == ["0"] * 4

    rundir = Path(os.readlink(f"/proc/{procs['smtpd: control']}/root"))
    expected_root = {"control": rundir, "scheduler": rundir, "pony": rundir,
                     "queue": d.spool, "lka": Path("/")}
    for name in CHILDREN:
        pid = procs[f"smtpd: {name}"]
        status = proc_status(pid)
        user = pwd.getpwnam("_smtpq" if name == "queue" else "_smtpd")
        assert Path(os.readlink(f"/proc/{pid}/root")) == expected_root[name], name
        assert status["Uid"].split() == [str(user.pw_uid)] * 4, (name, status["Uid"])
        assert status["Gid"].split() == [str(user.pw_gid)] * 4, (name, status["Gid"])
        assert status["Groups"] == "", (name, status["Groups"])
        assert status["NoNewPrivs"] == "1", name
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, (name, caps, status[caps])

    # The shared chroot is the runtime directory: root's, and nothing in it but the
    # channels, one directory per pair of processes, and pony's empty scratch directory
    # for the key copies of a reload (smtpd/tls.py), that only pony's user may enter.
    st = rundir.stat()
    assert rundir.parent in (Path("/run"), Path("/run/smtpd")) and st.st_uid == 0 and st.st_mode & 0o7777 == 0o711
    assert sorted(os.listdir(rundir)) == sorted([f"{a}-{b}" for a, b in ipc.PAIRS] + ["pony-tls"])
    scratch = (rundir / "pony-tls").lstat()
    assert (scratch.st_uid, scratch.st_mode & 0o7777) == (pwd.getpwnam("_smtpd").pw_uid, 0o700)
    assert os.listdir(rundir / "pony-tls") == []
    for entry in rundir.iterdir():
        if entry.name != "pony-tls":
            assert os.listdir(entry) == ["sock"], entry

    # Every channel works from inside the chroots, before and after a reload (the
    # children keep their sockets; nothing is reopened by path).
    send(port, "sender@remote.test", ["alice@example.test"])
    wait_for(lambda: len(maildir_messages(tmp_path / "d", "alice")) == 1, 20, "delivery before reload")
    assert d.smtpctl("reload").stdout.strip() == "command succeeded"
    send(port, "sender@remote.test", ["bob@example.test"])
    wait_for(lambda: maildir_messages(tmp_path / "d", "bob"), 20, "delivery after reload")
    assert "scheduler.delivery.ok=2" in d.smtpctl("show", "stats").stdout
    now = d.children()                              # no child was lost or replaced
    assert all(now[f"smtpd: {c}"] == procs[f"smtpd: {c}"] for c in CHILDREN), (now, procs)


@ROOT_ONLY
def test_relay_by_name_from_the_chrooted_mta(make_daemon, tmp_path):
    """pony, chrooted, has no /etc/hosts, resolv.conf or NSS modules: a relay named by
    host name is resolved by lka (not chrooted) and pony connects to the address."""
    sink_port, port = free_port(), free_port()
    sink = Sink(sink_port).start()
    try:
        d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://localhost:{sink_port}")).start()
        assert os.readlink(f"/proc/{d.children()['smtpd: pony']}/root") != "/"
        send(port, "me@local.test", ["x@remote.test"])
        wait_for(lambda: sink.transactions, 20, "the sink to receive the message")
        assert sink.transactions[0].rcpt_tos == ["x@remote.test"]
        assert "host=localhost" in d.wait_log('result="Ok"')
    finally:
        sink.stop()


@ROOT_ONLY
def test_without_cap_setpcap_the_children_refuse_to_run_unconfined(tmp_path):
    """The control of the bounding-set check: root without CAP_SETPCAP (after exec, its
    permitted set is its bounding set) cannot empty the children's, and says so."""
    (tmp_path / "d").mkdir()
    d = Daemon(tmp_path / "d", config(tmp_path / "d", free_port()),
               prefix=["setpriv", "--bounding-set=-setpcap", "--"])
    try:
        d.start(wait=False)
        assert d.proc.wait(30) == 1
        assert "cannot empty the capability bounding set (it needs CAP_SETPCAP" in d.log(), d.log()
        assert "warn: lost child:" in d.log()
    finally:
        d.stop()
        assert not d.children(), "processes left behind"


@ROOT_ONLY
@pytest.mark.skipif(not Path("/usr/share/zoneinfo/Asia/Kolkata").exists(), reason="needs tzdata")
def test_chrooted_children_log_in_local_time(tmp_path):
    """The time zone is loaded before the chroot: syslog timestamps of the chrooted
    children are local time (a zone 5:30 from UTC, so a fall back to UTC shows)."""
    syslog = SyslogSocket(str(tmp_path / "log"))
    (tmp_path / "d").mkdir()
    d = Daemon(tmp_path / "d", config(tmp_path / "d", free_port()))
    try:
        d.proc = subprocess.Popen(
            [sys.executable, "-m", "smtpd", "-F", "-T", "mproc", "-f", str(d.config), "--spool", str(d.spool),
             "--socket", str(d.socket), "--syslog-socket", syslog.address],
            cwd=REPO, env=dict(os.environ, TZ="Asia/Kolkata"), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        syslog.wait("ready:")
        procs = d.children()
        chrooted = {procs[f"smtpd: {n}"] for n in ("control", "scheduler", "pony", "queue")}
        assert all(os.readlink(f"/proc/{pid}/root") != "/" for pid in chrooted)
        stamps = {stamp for _, stamp, pid, msg in syslog.records() if pid in chrooted and msg.startswith("mproc:")}
        assert stamps, syslog.messages()
        now = datetime.now(ZoneInfo("Asia/Kolkata")).replace(tzinfo=None)
        for stamp in stamps:
            logged = datetime.strptime(f"{now.year} {stamp}", "%Y %b %d %H:%M:%S")
            assert abs(logged - now) < timedelta(minutes=2), (stamp, now)
        utc = datetime.now(timezone.utc).replace(tzinfo=None)
        assert abs(now - utc) > timedelta(hours=5)
    finally:
        d.stop()
        syslog.close()
        assert not d.children(), "processes left behind"


# -- no code from where the daemon is started (issue 13, point 1) -----------------------------

class PlantedDaemon(Daemon):
    """A daemon started from ``cwd`` with ``env``, through ``entry`` (the console
    script or ``python -m smtpd``).  Its processes are found from the socket it
    listens on (a daemonized parent leaves the test's process group, and the titles
    overwrite the environment /proc would show)."""

    def __init__(self, base: Path, config_text: str, port: int, cwd: Path, env: dict[str, str],
                 entry: list[str], flags: list[str], prefix: list[str] | None = None) -> None:
        super().__init__(base, config_text, prefix=prefix)
        self.port, self.cwd, self.env, self.entry, self.flags = port, cwd, env, entry, flags

    def command(self, *args: str) -> list[str]:
        return [*self.prefix, *self.entry, *self.flags, "-f", str(self.config),
                "--spool", str(self.spool), "--socket", str(self.socket), *args]

    def start(self, *args: str, wait: bool = True) -> "PlantedDaemon":
        self._log = open(self.logfile, "ab")
        self.log_offset = self.logfile.stat().st_size
        self.proc = subprocess.Popen(self.command(*args), cwd=self.cwd, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: len(self.children()) == 6, 30, "six processes")
        wait_for(lambda: self.smtpctl("show", "status", check=False).returncode == 0, 30, "control")
        return self

    def children(self) -> dict[str, int]:
        """{title: pid}: the parent holding the listening socket, and its children."""
        inode = listening_inode(self.port)
        procs = {}
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit():
                    stat = (entry / "stat").read_text()
                    title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
                    procs[int(entry.name)] = (title, int(stat.rsplit(")", 1)[1].split()[1]))
            except (OSError, ValueError, IndexError):
                continue
        parents = [pid for pid, (title, _) in procs.items()
                   if title == "smtpd: [priv]" and inode is not None and holds(pid, inode)]
        if len(parents) != 1:
            return {}
        out = {"smtpd: [priv]": parents[0]}
        out.update({title: pid for pid, (title, ppid) in procs.items()
                    if ppid == parents[0] and title.startswith("smtpd: ") and title != "smtpd: [priv]"})
        return out

    def stop(self, timeout: float = 5.0) -> int | None:
        pids = list(self.children().values())
        if pids:
            self.smtpctl("stop", check=False, timeout=20)
            try:
                wait_for(lambda: not self.children(), 10, "the daemon to stop")
            finally:
                for pid in self.children().values():
                    os.kill(pid, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(5)
        return None


def listening_inode(port: int) -> str | None:
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
                return fields[9]
    return None


def holds(pid: int, inode: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                return True
        except OSError:
            continue
    return False


def plant(where: Path, label: str, markers: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    for name in PLANTED:
        (where / f"{name}.py").write_text(SHIM.format(markers=str(markers), label=label))


def markers_of(markers: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in markers.iterdir()}


@pytest.fixture
def planted():
    """A start directory and a $PYTHONPATH directory full of planted modules, readable
    by nobody (for the unprivileged run), and the directory their markers go to."""
    top = Path(tempfile.mkdtemp(prefix="pysmtpd-planted-"))
    os.chmod(top, 0o755)
    markers = top / "markers"
    markers.mkdir()
    os.chmod(markers, 0o777)
    plant(top / "start", "cwd", markers)
    plant(top / "pythonpath", "pythonpath", markers)
    # The plants are live: a plain interpreter started there imports them.
    env = dict(os.environ, PYTHONPATH=str(top / "pythonpath"))
    subprocess.run([sys.executable, "-c", "import setproctitle, zmq"], cwd=top / "start", env=env, check=True)
    subprocess.run([sys.executable, "-c", "import msgspec"], cwd=top, env=env, check=True)
    seen = markers_of(markers)
    assert {n.rsplit("-", 1)[0] for n in seen} >= {"cwd-setproctitle", "cwd-zmq", "pythonpath-msgspec"}, seen
    for p in markers.iterdir():
        p.unlink()
    yield top
    homes = top / "base" / "home"
    if homes.is_symlink():
        shutil.rmtree(homes.resolve(), ignore_errors=True)
    shutil.rmtree(top, ignore_errors=True)


def nobody_prefix() -> list[str]:
    nobody = pwd.getpwnam("nobody")
    # As in test_daemon.py: the one capability kept lets nobody read the interpreter,
    # which lives under /root on the test machines.
    return ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]


MODES = {
    # name: (entry, flags, as nobody)
    "console-script-foreground-root": ([str(SMTPD_SCRIPT)], ["-d"], False),
    "python-m-foreground-root": ([sys.executable, "-m", "smtpd"], ["-d"], False),
    "console-script-unprivileged": ([str(SMTPD_SCRIPT)], ["-d"], True),
    "console-script-daemon": ([str(SMTPD_SCRIPT)], [], False),
}


@ROOT_ONLY
@pytest.mark.parametrize("mode", sorted(MODES))
def test_no_module_is_imported_from_the_start_directory_or_pythonpath(planted, mode):
    entry, flags, as_nobody = MODES[mode]
    base = planted / "base"
    base.mkdir()
    port = free_port()
    text = config(base, port)
    if as_nobody:
        nobody = pwd.getpwnam("nobody")
        for path in (base, *base.rglob("*")):
            os.lchown(path, nobody.pw_uid, nobody.pw_gid)
    env = dict(os.environ, PYTHONPATH=str(planted / "pythonpath"),
               SMTPD_SYSLOG_SOCKET=str(planted / "no-syslog-here"))
    d = PlantedDaemon(base, text, port, cwd=planted / "start", env=env, entry=entry, flags=flags,
                      prefix=nobody_prefix() if as_nobody else None)
    if as_nobody:
        os.chown(d.config, pwd.getpwnam("nobody").pw_uid, -1)
    try:
        d.start()
        procs = d.children()
        assert set(procs) == {"smtpd: [priv]", *(f"smtpd: {c}" for c in CHILDREN)}, procs
        for title, pid in procs.items():
            status = proc_status(pid)
            assert title == "smtpd: [priv]" or status["NoNewPrivs"] == "1", title
        send(port, "sender@remote.test", ["alice@example.test"])
        wait_for(lambda: maildir_messages(base, "alice"), 20, "delivery")
    finally:
        d.stop()
        assert not d.children(), "processes left behind"
    seen = markers_of(planted / "markers")
    # Nothing from the start directory, in any mode (python -m: smtpd/__main__.py drops it).
    assert not [n for n in seen if n.startswith("cwd-")], seen
    # $PYTHONPATH is the caller's choice for the parent (its own interpreter); no child
    # reads it.  Each marker holds the importer's argv: children run with -x NAME.
    assert not [n for n, argv in seen.items() if " -x " in argv], seen
    assert seen, "the parent honours $PYTHONPATH: the plants were live for it"
