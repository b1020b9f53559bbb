"""smtpd's command line, as smtpd(8): -h, --help, -n, -d, -F, -v, -f, -D."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, free_port
from tests.e2e.helpers import config

USAGE = "usage: smtpd [-dFhnv] [-D macro=value] [-f file] [-P system] [-T trace]"


def smtpd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smtpd", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=30)


def test_h_prints_version_and_usage_and_exits_1_as_opensmtpd():
    res = smtpd("-h")
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.startswith("version: pysmtpd ") and USAGE in res.stderr


def test_long_help_lists_the_options():
    res = smtpd("--help")
    assert res.returncode == 0 and USAGE in res.stdout
    for flag in ("-d ", "-F ", "-f file", "-n ", "-v ", "-D macro=value", "-P system", "-T trace"):
        assert flag in res.stdout, flag


def test_unknown_option_or_argument_is_a_usage_error():
    for args in (["-Q"], ["stray"]):
        res = smtpd(*args)
        assert res.returncode == 1 and USAGE in res.stderr, args


def test_n_checks_with_macros_and_warns_like_opensmtpd(tmp_path):
    conf = tmp_path / "smtpd.conf"
    conf.write_text("port = 2525\n" + config(tmp_path, 0).replace("port 0", "port $port"))
    res = smtpd("-n", "-f", str(conf), "-D", "port=2526", "-D", "nonsense", "-T", "nosuchflag")
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines()[-1] == "configuration OK"
    assert "warn: could not parse macro definition nonsense" in res.stderr
    assert 'warn: unknown trace flag "nosuchflag"' in res.stderr
    # -D overrides the file's macro: an undefined one is an error naming file:line.
    conf.write_text(config(tmp_path, 0).replace("port 0", "port $undefined"))
    res = smtpd("-n", "-f", str(conf))
    assert res.returncode == 1 and f"{conf}:2: macro 'undefined' not defined" in res.stderr
    assert smtpd("-n", "-f", str(conf), "-D", "undefined=25").returncode == 0


def test_missing_config_file(tmp_path):
    res = smtpd("-n", "-f", str(tmp_path / "nope.conf"))
    assert res.returncode == 1 and "nope.conf: No such file or directory" in res.stderr
    # Starting the daemon on it: EX_CONFIG (78), which the unit does not restart on.
    res = smtpd("-d", "-f", str(tmp_path / "nope.conf"), "--spool", str(tmp_path / "s"),
                "--socket", str(tmp_path / "sock"))
    assert res.returncode == 78


def test_d_logs_to_stderr_and_v_adds_debug_lines(make_daemon, tmp_path):
    d = make_daemon(config(tmp_path / "d", free_port())).start("-v")
    log = d.wait_log("done loading queue into scheduler")
    assert "debug: queue:" in log                         # -v: debug lines shown
    d2 = make_daemon(config(tmp_path / "e", free_port()), subdir="e").start()
    assert "debug:" not in d2.log_since_start()


def test_without_d_or_F_it_daemonizes_and_logs_to_syslog(syslog_socket, tmp_path):
    import os
    import signal

    from tests.conftest import wait_for
    port = free_port()
    conf = tmp_path / "smtpd.conf"
    conf.write_text(config(tmp_path, port))
    sock = tmp_path / "ctl.sock"
    res = smtpd("-f", str(conf), "--spool", str(tmp_path / "spool"), "--socket", str(sock),
                "--syslog-socket", syslog_socket.address)
    assert res.returncode == 0 and res.stderr == ""        # the foreground process returns
    pid = 0
    try:
        syslog_socket.wait("ready:")
        pid = next(p for _, _, p, m in syslog_socket.records() if "ready:" in m)
        assert os.getsid(pid) != os.getsid(0)               # detached: a session of its own
        stop = subprocess.run([sys.executable, "-m", "smtpctl", "--socket", str(sock), "stop"],
                              cwd=REPO, capture_output=True, text=True, timeout=30)
        assert stop.stdout.strip() == "command succeeded"
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the daemon to exit")
        syslog_socket.wait("Exiting")
    finally:
        if pid and os.path.exists(f"/proc/{pid}"):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
