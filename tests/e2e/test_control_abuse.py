"""A local user flooding the control socket, against the real daemon: the log grows
by a bounded number of lines (smtpd/control.py ClientLogLimiter), the text the user
sent is escaped in it, and root's smtpctl is still served."""
from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from common.control_wire import frame
from common.messages import PROTOCOL_VERSION, ClientRequest
from smtpd.control import CLIENT_LOG_BURST, MAX_CONNECTIONS_PER_UID
from tests.conftest import free_port
from tests.e2e.helpers import config
from tests.e2e.test_stats import _as_user

FLOOD_SECONDS = 3.0
FORGED = "show queue\nFAKE: root logged in\x1b[2J\r"


def _flood(sock: str, seconds: float):
    """As the other user: for ``seconds``, refused requests, garbage frames and more
    connections than control allows at once.  Returns what control answered."""
    request = frame(ClientRequest(version=PROTOCOL_VERSION, command="show queue"))
    forged = frame(ClientRequest(version=PROTOCOL_VERSION, command=FORGED))
    garbage = b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1"

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(sock)
        return s

    def work():
        counts = {"refused": 0, "garbage": 0, "over_cap": 0}
        with connect() as s:
            s.sendall(forged)
            counts["refused"] += bool(s.recv(65536))
        held = [connect() for _ in range(MAX_CONNECTIONS_PER_UID)]
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                with connect() as s:                    # over the cap: closed unanswered
                    counts["over_cap"] += s.recv(4) == b""
                held[0].sendall(request)
                counts["refused"] += bool(held[0].recv(65536))
                old = held.pop(1)                       # a bad frame: that client is dropped
                old.sendall(garbage)
                counts["garbage"] += old.recv(4) == b""
                old.close()
                held.append(connect())
        finally:
            for s in held:
                s.close()
        return counts
    return work


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (CI runs as root)")
def test_flooding_the_control_socket_cannot_flood_the_log(make_daemon, tmp_path):
    sockdir = Path(tempfile.mkdtemp(prefix="pysmtpd-ctl-"))
    try:
        os.chmod(sockdir, 0o711)                    # nobody may reach the socket
        d = make_daemon(config(tmp_path / "d", free_port()))
        d.socket = sockdir / "ctl.sock"
        d.start()
        before = d.log_since_start().splitlines()
        nobody = pwd.getpwnam("nobody")
        counts = _as_user(nobody.pw_uid, nobody.pw_gid, _flood(str(d.socket), FLOOD_SECONDS))
        attempts = sum(counts.values())
        # a real flood: many times what may reach the log
        assert counts["refused"] > 3 * CLIENT_LOG_BURST and counts["garbage"] > CLIENT_LOG_BURST, counts

        time.sleep(0.5)                             # whatever the flood made control log
        added = d.log_since_start().splitlines()[len(before):]
        about_nobody = [line for line in added if f"uid {nobody.pw_uid}" in line]
        assert len(about_nobody) == CLIENT_LOG_BURST, added
        assert len(added) <= CLIENT_LOG_BURST + 3, added    # (room for lines of other causes)
        # the forged command came first: escaped, it is one line and forges none
        assert about_nobody[0] == (f"warn: control: show queue\\nFAKE: root logged in\\^[[2J\\r "
                                   f"refused to uid {nobody.pw_uid}: need root privileges")
        assert not any(line.startswith("FAKE") for line in d.log().splitlines())

        # root is still served, and the daemon runs on
        assert d.smtpctl("show", "status").stdout.startswith("MDA running")
        assert d.proc.poll() is None

        # at stop, what was left out is summed up in one line
        d.stop()
        summaries = re.findall(rf"warn: control: (\d+) more lines about clients of uid "
                               rf"{nobody.pw_uid} left out of the log in \d+s", d.log_since_start())
        assert len(summaries) == 1
        # each attempt was one line to log (control logs before it answers or closes)
        assert int(summaries[0]) == attempts - CLIENT_LOG_BURST
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
