"""Every local delivery method end to end: mbox, maildir junk, mda (its environment,
its exit statuses, a wrapper) and lmtp over unix and TCP sockets, each message
reaching the delivery worker as a descriptor the queue opened."""
from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for
from tests.e2e.helpers import send, userbase


def home(base: Path, user: str = "alice") -> Path:
    return (base / "home" / user).resolve()


def owned_dir(path: Path, like: Path) -> Path:
    """A directory the delivery user (the owner of ``like``) can write."""
    path.mkdir(parents=True, exist_ok=True)
    st = like.stat()
    os.chown(path, st.st_uid, st.st_gid)
    return path


def conf(base: Path, port: int, action: str, extra: str = "") -> str:
    users = userbase(base)
    return "\n".join([
        f"listen on 127.0.0.1 port {port}",
        f"table users {users}",
        extra,
        f'action "local" {action} userbase <users>',
        'match from any for domain "example.test" action "local"',
    ]) + "\n"


def test_mbox_delivery_from_line_quoting_and_locks(make_daemon, tmp_path):
    port = free_port()
    base = tmp_path / "d"
    conf_text = conf(base, port, "mbox")        # userbase made first: the homes exist
    spool = owned_dir(home(base) / "mail", home(base))
    conf_text = conf_text.replace("mbox userbase", f'mbox "{spool}" userbase')
    d = make_daemon(conf_text).start()
    send(port, "bob@remote.test", ["alice@example.test"],
         "Subject: one\n\nFrom the start of a line\nnot From here\n")
    send(port, "", ["alice@example.test"], "Subject: two\n\nsecond\n")
    d.wait_log("result=Ok")
    wait_for(lambda: d.log_since_start().count("result=Ok") == 2, 20, "both deliveries")
    box = (spool / "alice").read_bytes().decode()
    messages = re.split(r"(?m)^(?=From )", box)
    messages = [m for m in messages if m]
    assert len(messages) == 2, box
    assert re.match(r"From bob@remote\.test \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\n", messages[0])
    assert "Return-Path: <bob@remote.test>\nDelivered-To: alice@example.test\n" in messages[0]
    assert "\n\n>From the start of a line\nnot From here\n\n" in messages[0]
    assert messages[1].startswith("From MAILER-DAEMON ") and messages[1].endswith("second\n\n")
    st = (spool / "alice").stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == home(base).stat().st_uid
    assert not (spool / "alice.lock").exists()              # the dot-lock was let go


def test_maildir_junk_folder(make_daemon, tmp_path):
    port = free_port()
    base = tmp_path / "d"
    d = make_daemon(conf(base, port, 'maildir "~/Maildir" junk')).start()
    send(port, "s@remote.test", ["alice@example.test"], "Subject: spam\nX-Spam: yes\n\nbuy\n")
    send(port, "s@remote.test", ["alice@example.test"], "Subject: ham\n\nhello\n")
    wait_for(lambda: d.log_since_start().count("result=Ok") == 2, 20, "both deliveries")
    junk = list((home(base) / "Maildir" / ".Junk" / "new").iterdir())
    inbox = list((home(base) / "Maildir" / "new").iterdir())
    assert len(junk) == 1 and b"Subject: spam" in junk[0].read_bytes()
    assert len(inbox) == 1 and b"Subject: ham" in inbox[0].read_bytes()


def test_mda_environment_and_message(make_daemon, tmp_path):
    port = free_port()
    base = tmp_path / "d"
    cmd = 'cat > "$HOME/mda.msg"; env > "$HOME/mda.env"; pwd > "$HOME/mda.pwd"'
    d = make_daemon(conf(base, port, f"mda '{cmd}'")).start()
    send(port, "bob@remote.test", ["alice+tag@example.test"], "Subject: piped\n\nbody\n")
    d.wait_log("result=Ok")
    h = home(base)
    msg = (h / "mda.msg").read_text()
    assert msg.startswith("Return-Path: <bob@remote.test>\nDelivered-To: alice+tag@example.test\n")
    assert msg.endswith("Subject: piped\n\nbody\n")
    env = dict(line.split("=", 1) for line in (h / "mda.env").read_text().splitlines() if "=" in line)
    for shell_own in ("PWD", "SHLVL", "_", "OLDPWD"):
        env.pop(shell_own, None)
    assert env == {
        "PATH": "/usr/bin:/bin:/usr/sbin:/sbin:/usr/local/bin", "DOMAIN": "example.test",
        "HOME": str(h), "ORIGINAL_RECIPIENT": "alice+tag@example.test",
        "RECIPIENT": "alice+tag@example.test", "SHELL": "/bin/sh", "LOCAL": "alice+tag",
        "LOGNAME": "alice", "USER": "alice", "SENDER": "bob@remote.test", "EXTENSION": "tag",
    }
    assert (h / "mda.pwd").read_text().strip() == str(h)
    if os.getuid() == 0:                       # run as the user, unable to regain anything
        assert (h / "mda.msg").stat().st_uid == h.stat().st_uid != 0


def test_mda_confinement(make_daemon, tmp_path):
    """The command runs with no-new-privs and (as root) an empty bounding set."""
    port = free_port()
    base = tmp_path / "d"
    d = make_daemon(conf(base, port, """mda 'grep -E "^(NoNewPrivs|CapBnd|CapEff|Uid)" /proc/self/status > "$HOME/status"'""")).start()
    send(port, "bob@remote.test", ["alice@example.test"])
    d.wait_log("result=Ok")
    status = dict(re.split(r":\s*", line, maxsplit=1) for line in (home(base) / "status").read_text().splitlines())
    assert status["NoNewPrivs"] == "1"
    assert status["CapEff"] == "0000000000000000"
    if os.getuid() == 0:
        assert status["CapBnd"] == "0000000000000000"
        assert status["Uid"].split()[0] == str(home(base).stat().st_uid) != "0"


@pytest.mark.parametrize("code,result,text", [
    (75, "result=TempFail", "Error (temporary failure: try later)"),
    (71, "result=TempFail", "Error (system resource problem: try later)"),
    (67, "result=PermFail", "Error (user unknown: try later)"),
    (1, "result=PermFail", "Error (try later)"),
])
def test_mda_exit_status(make_daemon, tmp_path, code, result, text):
    port = free_port()
    base = tmp_path / "d"
    d = make_daemon(conf(base, port, f"mda 'cat >/dev/null; echo try later; exit {code}'")).start()
    send(port, "bob@remote.test", ["alice@example.test"])
    log = d.wait_log(result)
    assert f"stat={text}" in log
    if result == "result=TempFail":
        assert len(d.queue_lines()) == 1          # kept for a retry
    else:
        wait_for(lambda: "bounce" in d.log_since_start() or not d.queue_lines(), 20, "the failure processed")


def test_mda_wrapper(make_daemon, tmp_path):
    port = free_port()
    base = tmp_path / "d"
    wrapper = 'mda wrapper "w" "echo wrapped > $HOME/wrapped; %{mda}"'
    d = make_daemon(conf(base, port, "mda 'cat > $HOME/wrapped.msg' wrapper w", extra=wrapper)).start()
    send(port, "bob@remote.test", ["alice@example.test"], "Subject: w\n\nthrough the wrapper\n")
    d.wait_log("result=Ok")
    assert (home(base) / "wrapped").read_text() == "wrapped\n"
    assert (home(base) / "wrapped.msg").read_text().endswith("through the wrapper\n")


def test_undefined_wrapper_is_a_configuration_error(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(conf(tmp_path / "d", port, "mda 'cat' wrapper nope"))
    d.start(wait=False)
    wait_for(lambda: d.proc.poll() is not None, 30, "smtpd to refuse the configuration")
    assert 'undefined mda wrapper "nope"' in d.log()


class LmtpServer:
    """A small LMTP server: one reply per recipient after DATA, chosen by local part
    (``temp*`` 451, ``perm*`` 550, anything else 250)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(10)
                try:
                    self._session(conn.makefile("rb"), conn)
                except OSError:
                    pass

    def _session(self, rfile, conn) -> None:
        conn.sendall(b"220 lmtp.test LMTP ready\r\n")
        sender, rcpts = "", []
        for _ in range(100):
            line = rfile.readline()
            if not line:
                return
            cmd = line.decode().strip()
            verb = cmd.split(" ", 1)[0].upper()
            if verb == "LHLO":
                conn.sendall(b"250-lmtp.test\r\n250 PIPELINING\r\n")
            elif verb == "MAIL":
                sender, rcpts = cmd[10:].strip("<>"), []
                conn.sendall(b"250 ok\r\n")
            elif verb == "RCPT":
                rcpts.append(cmd[8:].strip("<>"))
                conn.sendall(b"250 ok\r\n")
            elif verb == "DATA":
                conn.sendall(b"354 go\r\n")
                data = b""
                while True:
                    chunk = rfile.readline()
                    if chunk in (b".\r\n", b""):
                        break
                    data += chunk
                self.messages.append((sender, rcpts, data))
                for rcpt in rcpts:
                    if rcpt.startswith("temp"):
                        conn.sendall(f"451 4.2.0 <{rcpt}> mailbox busy\r\n".encode())
                    elif rcpt.startswith("perm"):
                        conn.sendall(f"550 5.1.1 <{rcpt}> no such mailbox\r\n".encode())
                    else:
                        conn.sendall(f"250 2.0.0 <{rcpt}> delivered\r\n".encode())
            elif verb == "QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"250 ok\r\n")

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def lmtp_unix():
    root = Path(tempfile.mkdtemp(prefix="pysmtpd-lmtp-"))
    os.chmod(root, 0o755)                      # the delivery user connects
    path = root / "lmtp.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o666)
    server = LmtpServer(sock)
    yield server, str(path)
    server.stop()
    path.unlink(missing_ok=True)
    root.rmdir()


@pytest.fixture
def lmtp_tcp():
    port = free_port()
    sock = socket.create_server(("127.0.0.1", port))
    server = LmtpServer(sock)
    yield server, f"127.0.0.1:{port}"
    server.stop()


def test_lmtp_unix_socket(make_daemon, tmp_path, lmtp_unix):
    server, path = lmtp_unix
    port = free_port()
    base = tmp_path / "d"
    users = userbase(base, users=("alice", "tempuser", "permuser"))
    d = make_daemon("\n".join([
        f"listen on 127.0.0.1 port {port}", f"table users {users}",
        f'action "local" lmtp "{path}" userbase <users>',
        'match from any for domain "example.test" action "local"']) + "\n").start()
    send(port, "bob@remote.test", ["alice@example.test", "tempuser@example.test", "permuser@example.test"],
         "Subject: lmtp\n\n.dot\nbody\n")
    wait_for(lambda: len(re.findall(r"result=(Ok|TempFail|PermFail)", d.log_since_start())) >= 3, 30,
             "three results")
    log = d.log_since_start()
    assert re.search(r"to=<alice@example.test> .*result=Ok stat=Delivered", log)
    assert re.search(r"to=<tempuser@example.test> .*result=TempFail stat=451 4.2.0", log)
    assert re.search(r"to=<permuser@example.test> .*result=PermFail stat=550 5.1.1", log)
    # one transaction per envelope: each its own RCPT, each answered by its own reply
    assert sorted(r for _, rcpts, _ in server.messages for r in rcpts) == [
        "alice@example.test", "permuser@example.test", "tempuser@example.test"]
    sender, _, data = server.messages[0]
    assert sender == "bob@remote.test"
    assert data.startswith(b"Return-Path: <bob@remote.test>\r\nDelivered-To: ")
    assert b"\r\n..dot\r\nbody\r\n" in data                   # dot-stuffed on the wire


def test_lmtp_tcp_rcpt_to(make_daemon, tmp_path, lmtp_tcp):
    server, dest = lmtp_tcp
    port = free_port()
    base = tmp_path / "d"
    users = userbase(base)
    d = make_daemon("\n".join([
        f"listen on 127.0.0.1 port {port}", f"table users {users}",
        'table al { postmaster = "alice" }',
        f'action "local" lmtp "{dest}" rcpt-to alias <al> userbase <users>',
        'match from any for domain "example.test" action "local"']) + "\n").start()
    send(port, "bob@remote.test", ["postmaster@example.test"])
    d.wait_log("result=Ok")
    # rcpt-to: RCPT TO is the original recipient, not the expanded alice@example.test
    assert server.messages[0][1] == ["postmaster@example.test"]


def test_lmtp_server_down_is_a_tempfail(make_daemon, tmp_path):
    port, dead = free_port(), free_port()
    d = make_daemon(conf(tmp_path / "d", port, f'lmtp "127.0.0.1:{dead}"')).start()
    send(port, "bob@remote.test", ["alice@example.test"])
    log = d.wait_log("result=TempFail")
    assert "cannot connect to 127.0.0.1" in log


def test_alias_pipe_and_file_targets(make_daemon, tmp_path):
    """``|command`` and ``/file`` in an aliases table: run and written as smtpd's own
    user (``_smtpd`` as root), the file appended mbox-style."""
    out = Path(tempfile.mkdtemp(prefix="pysmtpd-alias-"))
    os.chmod(out, 0o1777)                        # smtpd's user writes here
    try:
        port = free_port()
        base = tmp_path / "d"
        users = userbase(base)
        d = make_daemon("\n".join([
            f"listen on 127.0.0.1 port {port}", f"table users {users}",
            f'table aliases {{ piped = "|cat > {out}/piped; id -un >> {out}/piped", '
            f'filed = "{out}/copy.mbox" }}',
            'action "local" maildir alias <aliases> userbase <users>',
            'match from any for domain "example.test" action "local"']) + "\n").start()
        send(port, "bob@remote.test", ["piped@example.test", "filed@example.test"],
             "Subject: alias\n\nFrom the alias\n")
        wait_for(lambda: d.log_since_start().count("result=Ok") == 2, 30, "both deliveries")
        runner = "_smtpd" if os.getuid() == 0 else __import__("pwd").getpwuid(os.getuid()).pw_name
        piped = (out / "piped").read_text()
        assert piped.startswith("Return-Path: <bob@remote.test>\nDelivered-To: piped@example.test\n")
        assert piped.endswith(f"Subject: alias\n\nFrom the alias\n{runner}\n")
        box = (out / "copy.mbox").read_text()
        assert box.startswith("From bob@remote.test ") and box.endswith("\n\n>From the alias\n\n")
    finally:
        shutil.rmtree(out, ignore_errors=True)
