"""Fixtures of the operations tests (systemd, syslog, reload)."""
from __future__ import annotations

import pytest

from tests.e2e.ops_helpers import NotifySocket, SyslogSocket, ops_daemon_factory


@pytest.fixture
def ops_daemon(tmp_path):
    """Like make_daemon, with OpsDaemon (flags, environment, socket activation)."""
    started: list = []
    yield ops_daemon_factory(tmp_path, started)
    for d in started:
        d.stop()
        assert not d.children(), "processes left behind"


@pytest.fixture
def notify_socket(tmp_path):
    sock = NotifySocket(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


@pytest.fixture
def syslog_socket(tmp_path):
    sock = SyslogSocket(str(tmp_path / "log"))
    yield sock
    sock.close()
