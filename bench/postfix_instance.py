"""A private Postfix instance for the benchmarks, run from the unpacked Debian package.

bench/get-postfix-tools.sh unpacks the distribution's `postfix` package (Debian 12:
Postfix 3.7) into bench/.postfix without installing it.  This module runs that tree as
a throw-away instance: its own config_directory, queue_directory, data_directory and
log file under a temporary directory, the master in the foreground (`master -d`) as a
child of the benchmark, listening on 127.0.0.1 at a high port only.  Nothing under
/etc or /var is read or written, except that Postfix's users must exist:

* Postfix runs only as root (the master refuses otherwise);
* it needs its mail_owner (`postfix`) and setgid_group (`postdrop`): `ensure_users()`
  creates them as system accounts (no home, no login shell) when they are missing,
  like the Debian package's postinst would, and says so.  They stay afterwards.

Two setups, both with Postfix's defaults otherwise (fsync of every queue file before
the 250, in_flow_delay, process limits, connection caching):

* ``relay``: nothing is local (empty mydestination), `relayhost = [127.0.0.1]:SINK`
  (bracketed and numeric: no MX or A lookup; `smtp_dns_support_level = disabled`);
* ``maildir``: `example.test` is a virtual mailbox domain, `alice@example.test` is
  delivered by virtual(8) to a Maildir owned by the given uid/gid (the same user the
  pysmtpd side delivers as).

master.cf is the package's master.cf.dist with chroot off (the instance has no chroot
tree) and the `smtp inet` service moved to 127.0.0.1:PORT.
"""
from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MAIL_OWNER = "postfix"
SETGID_GROUP = "postdrop"
MYHOSTNAME = "postfix.bench.test"
BOOT_TIMEOUT = 30.0


class PostfixError(Exception):
    pass


# --------------------------------------------------------------------------- pure parts

def main_cf_text(*, tools: Path, base: Path, mode: str, sink_port: int | None,
                 maildir_user: str, maildir_domain: str, uid: int, gid: int) -> str:
    """main.cf of the private instance (paths under ``base``; programs from ``tools``)."""
    if mode not in ("relay", "maildir"):
        raise ValueError(f"unknown mode {mode!r}")
    if mode == "relay" and sink_port is None:
        raise ValueError("relay needs the sink's port")
    libdir = tools / "usr/lib/postfix"
    lines = [
        "# Private Postfix for bench/bench_compare.py (bench/postfix_instance.py)",
        "compatibility_level = 3.6",
        f"config_directory = {base / 'etc'}",
        f"queue_directory = {base / 'queue'}",
        f"data_directory = {base / 'data'}",
        f"meta_directory = {base / 'etc'}",
        f"command_directory = {tools / 'usr/sbin'}",
        f"daemon_directory = {libdir / 'sbin'}",
        f"shlib_directory = {libdir}",
        # The programs find their shared libraries through LD_LIBRARY_PATH; the master
        # gives its children only the environment listed here.
        "import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C"
        f" POSTLOG_SERVICE POSTLOG_HOSTNAME LD_LIBRARY_PATH={libdir}",
        f"mail_owner = {MAIL_OWNER}",
        f"setgid_group = {SETGID_GROUP}",
        f"maillog_file = {base / 'maillog'}",
        f"maillog_file_prefixes = {base}",
        "inet_interfaces = 127.0.0.1",
        "inet_protocols = ipv4",
        f"myhostname = {MYHOSTNAME}",
        "mydomain = bench.test",
        "myorigin = $myhostname",
        "mynetworks = 127.0.0.0/8",
        "mydestination =",
        "relay_domains =",
        "alias_maps =",
        "alias_database =",
        "biff = no",
        "smtp_dns_support_level = disabled",
        "smtp_host_lookup = native",
    ]
    if mode == "relay":
        lines.append(f"relayhost = [127.0.0.1]:{sink_port}")
    else:
        lines += [
            f"virtual_mailbox_domains = {maildir_domain}",
            f"virtual_mailbox_base = {base / 'vmail'}",
            f"virtual_mailbox_maps = inline:{{ {maildir_user}@{maildir_domain}={maildir_user}/Maildir/ }}",
            f"virtual_uid_maps = static:{uid}",
            f"virtual_gid_maps = static:{gid}",
            f"virtual_minimum_uid = {min(uid, 100)}",
        ]
    return "\n".join(lines) + "\n"


_SERVICE = re.compile(r"^(\S+)(\s+)(inet|unix|unix-dgram|fifo|pass)(\s+)(\S+)(\s+)(\S+)(\s+)(\S+)(\s)")


def master_cf_text(dist: str, port: int) -> str:
    """The package's master.cf.dist with every chroot column set to ``n`` and the
    ``smtp inet`` listener moved to 127.0.0.1:``port``."""
    out = []
    listener = False
    for line in dist.splitlines():
        m = None if line.startswith("#") else _SERVICE.match(line)
        if m:
            name, _, kind = m.group(1), m.group(2), m.group(3)
            chroot_at = m.start(9)
            line = line[:chroot_at] + "n" + line[m.end(9):]
            if name == "smtp" and kind == "inet":
                line = f"127.0.0.1:{port}" + line[len(name):]
                listener = True
        out.append(line)
    if not listener:
        raise PostfixError("master.cf.dist has no `smtp inet` service")
    return "\n".join(out) + "\n"


def queue_directories(postfix_files: str) -> list[tuple[str, str, str, int]]:
    """(path template, owner, group, mode) of the directories postfix-files lists under
    $queue_directory and $data_directory (what `postfix check` would create)."""
    out = []
    for line in postfix_files.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        fields = line.split(":")
        if len(fields) < 5 or fields[1] != "d":
            continue
        if not fields[0].startswith(("$queue_directory", "$data_directory")):
            continue
        out.append((fields[0], fields[2], fields[3], int(fields[4], 8)))
    return out


# --------------------------------------------------------------------------- users

def ensure_users() -> list[str]:
    """Create Postfix's mail_owner user and setgid group when missing (root only).
    Returns what was created."""
    if os.geteuid() != 0:
        raise PostfixError("a private Postfix needs root (its master refuses to run otherwise)")
    created = []
    try:
        grp.getgrnam(SETGID_GROUP)
    except KeyError:
        _run(["groupadd", "--system", SETGID_GROUP])
        created.append(f"group {SETGID_GROUP}")
    try:
        pwd.getpwnam(MAIL_OWNER)
    except KeyError:
        _run(["useradd", "--system", "--user-group", "--no-create-home",
              "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", MAIL_OWNER])
        created.append(f"user {MAIL_OWNER}")
    return created


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise PostfixError(f"{' '.join(cmd)}: {res.stderr.strip()}")


# --------------------------------------------------------------------------- instance

class PostfixInstance:
    """One private Postfix under ``base`` (which must exist and be reachable by the
    Maildir user), listening on 127.0.0.1:``port``."""

    def __init__(self, tools: Path, base: Path, port: int, mode: str, *,
                 sink_port: int | None = None, maildir_user: str = "alice",
                 maildir_domain: str = "example.test", uid: int = 65534, gid: int = 65534) -> None:
        self.tools = tools
        self.base = base
        self.port = port
        self.mode = mode
        self.sink_port = sink_port
        self.maildir_user = maildir_user
        self.maildir_domain = maildir_domain
        self.uid, self.gid = uid, gid
        self.proc: subprocess.Popen | None = None
        self.env = dict(os.environ, LD_LIBRARY_PATH=str(tools / "usr/lib/postfix"),
                        MAIL_CONFIG=str(base / "etc"))

    @property
    def maildir_new(self) -> Path:
        return self.base / "vmail" / self.maildir_user / "Maildir" / "new"

    @property
    def logfile(self) -> Path:
        return self.base / "maillog"

    def setup(self) -> None:
        meta = self.tools / "etc/postfix"
        etc = self.base / "etc"
        etc.mkdir(parents=True)
        postfix_files = (meta / "postfix-files").read_text()
        shutil.copy(meta / "postfix-files", etc / "postfix-files")
        shutil.copy(self.tools / "usr/share/postfix/dynamicmaps.cf", etc / "dynamicmaps.cf")
        (etc / "main.cf").write_text(main_cf_text(
            tools=self.tools, base=self.base, mode=self.mode, sink_port=self.sink_port,
            maildir_user=self.maildir_user, maildir_domain=self.maildir_domain,
            uid=self.uid, gid=self.gid))
        (etc / "master.cf").write_text(master_cf_text(
            (self.tools / "usr/share/postfix/master.cf.dist").read_text(), self.port))
        owner = pwd.getpwnam(MAIL_OWNER)
        setgid_gid = grp.getgrnam(SETGID_GROUP).gr_gid
        for template, user, group, mode in queue_directories(postfix_files):
            path = Path(template.replace("$queue_directory", str(self.base / "queue"))
                        .replace("$data_directory", str(self.base / "data")))
            path.mkdir(parents=True, exist_ok=True)
            uid = owner.pw_uid if user == "$mail_owner" else 0
            gid = setgid_gid if group == "$setgid_group" else (owner.pw_gid if user == "$mail_owner" else 0)
            os.chown(path, uid, gid)
            os.chmod(path, mode)
        if self.mode == "maildir":
            home = self.base / "vmail" / self.maildir_user / "Maildir"
            home.mkdir(parents=True)
            os.chmod(self.base / "vmail", 0o755)
            for d in (home.parent, home):
                os.chown(d, self.uid, self.gid)

    def start(self) -> None:
        """`master -d` in its own session; returns once the listener answers 220."""
        master = self.tools / "usr/lib/postfix/sbin/master"
        with open(self.base / "master.out", "ab") as out:
            self.proc = subprocess.Popen([str(master), "-d", "-c", str(self.base / "etc")],
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PostfixError(f"postfix master exited ({self.proc.returncode}):\n{self.log_tail()}")
            if self._banner():
                return
            time.sleep(0.1)
        raise PostfixError(f"postfix did not answer on port {self.port}:\n{self.log_tail()}")

    def _banner(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                ok = s.recv(512).startswith(b"220")
                s.sendall(b"QUIT\r\n")
                return ok
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        text = ""
        for name in ("master.out", "maillog"):
            try:
                text += (self.base / name).read_text(errors="replace")
            except OSError:
                pass
        return text

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the master (it signals its process group and exits), then SIGKILL
        whatever of its session is left, by PID."""
        if self.proc is None:
            return
        sid = self.proc.pid
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        deadline = time.monotonic() + grace
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in session_pids(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state is [0], session [3])."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def session_members(sid: int) -> list[tuple[int, list[bytes]]]:
    """(pid, stat fields) of every process of session ``sid``, zombies included."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields is not None and int(fields[3]) == sid:
                out.append((int(entry.name), fields))
    return out


def session_pids(sid: int) -> list[int]:
    """PIDs of the live (not zombie) processes of session ``sid``."""
    return [pid for pid, fields in session_members(sid) if fields[0] != b"Z"]
