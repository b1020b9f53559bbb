"""show stats, monitor, the metrics endpoint and control's permissions, against the
running daemon (permissions with a real non-root user)."""
from __future__ import annotations

import io
import json
import os
import pwd
import queue
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import smtplib

import pytest
import typer
from prometheus_client.parser import text_string_to_metric_families

from common.control_wire import frame, recv_frame
from common.messages import PROTOCOL_VERSION, ClientRequest
from smtpctl import main as smtpctl_main
from tests.conftest import REPO, free_port, wait_for
from tests.e2e.helpers import config, maildir_messages, send

STAT_LINE = re.compile(r"^[a-z0-9._\-]+=-?\d+(\.\d+)?$")


def stats_of(text: str) -> dict[str, str]:
    lines = text.splitlines()
    keys = [line.split("=", 1)[0] for line in lines]
    assert keys == sorted(keys, key=lambda k: k.encode()), "show stats is in strcmp order"
    for line in lines:
        assert STAT_LINE.match(line) or line.startswith("uptime.human="), line
    return dict(line.split("=", 1) for line in lines)


class Monitor:
    """``smtpctl monitor`` in the background, its lines read by a thread."""

    def __init__(self, d) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "smtpctl", "--socket", str(d.socket), "monitor"],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def line(self, timeout: float = 10.0) -> str:
        return self.lines.get(timeout=timeout)

    def row_where(self, predicate, timeout: float = 20.0, summed: bool = False) -> list[int]:
        """The first row (or, ``summed``, the first sum of the rows read from now on)
        that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        total = [0] * 13
        seen = []
        while time.monotonic() < deadline:
            try:
                line = self.line(max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line and line[0] in " 0123456789":
                row = [int(x) for x in line.split()]
                seen.append(row)
                total = [a + b for a, b in zip(total, row)]
                if predicate(total if summed else row):
                    return total if summed else row
        raise AssertionError(f"no monitor row as expected in {seen}")

    def finish(self, timeout: float = 10.0) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.thread.join(5)
        return code, self.proc.stderr.read()


def test_show_stats_monitor_and_metrics(make_daemon, tmp_path):
    port, metrics_port = free_port(), free_port()
    d = make_daemon(config(tmp_path / "d", port, extra=f"metrics listen on 127.0.0.1 port {metrics_port}"),
                    extra_args=["-P", "mda"]).start()
    send(port, "a@remote.test", ["bob@example.test"])

    mon = Monitor(d)
    try:
        assert mon.line() == "--- client ---  -- envelope --   ---- relay/delivery --- ------- misc -------"
        assert mon.line() == "curr conn disc  curr  enq  deq   ok tmpfail prmfail loop expire remove bounce"
        # The first row: totals since start; curr = connects - disconnects, enqueued - dequeued.
        assert [int(x) for x in mon.line().split()] == [0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
        assert d.smtpctl("resume", "mda").stdout == "command succeeded\n"
        # Later rows: increments (one dequeued, one delivered), curr absolute.
        mon.row_where(lambda r: r[3:7] == [0, 0, 1, 1])
        send(port, "a@remote.test", ["bob@example.test"])
        # (its connect and disconnect may fall in two rows)
        mon.row_where(lambda t: t[1] == 1 and t[2] == 1, summed=True)
        mon.proc.send_signal(signal.SIGINT)
        code, err = mon.finish()
        assert (code, err) == (0, ""), err                  # Ctrl-C: quiet, no traceback
    finally:
        if mon.proc.poll() is None:
            mon.proc.kill()
            mon.proc.wait()
    wait_for(lambda: len(maildir_messages(tmp_path / "d", "bob")) == 2, 20, "deliveries")
    wait_for(lambda: "scheduler.envelope=0" in d.smtpctl("show", "stats").stdout, 20, "the queue to empty")

    stats = stats_of(d.smtpctl("show", "stats").stdout)
    expected = {
        "control.session": "1",            # this smtpctl
        "smtp.session": "0", "smtp.session.inet4": "2",
        "scheduler.envelope": "0", "scheduler.envelope.incoming": "0",
        "scheduler.envelope.inflight": "0", "scheduler.delivery.ok": "2",
        "mda.envelope": "0", "mda.pending": "0", "mda.running": "0", "mda.user": "0",
    }
    assert {k: stats.get(k) for k in expected} == expected
    assert 0 <= int(stats["uptime"]) < 600 and stats["uptime.human"].endswith("s")
    # Keys exist once touched: nothing was relayed, no bounce made, no TLS.
    assert not [k for k in stats if k.startswith(("mta.", "smtp.tls", "smtp.smtps", "queue.bounce"))]

    # The same counters in the Prometheus text format.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    families = {fam.name: fam for fam in text_string_to_metric_families(text)}
    metrics = {s.name: s.value for fam in families.values() for s in fam.samples if not s.labels}
    # Totals since the start are counters (the parser names the family without
    # "_total"), values that go up and down gauges.
    totals = {"queue.bounce", "scheduler.delivery.ok", "scheduler.delivery.tempfail",
              "scheduler.delivery.permfail", "scheduler.delivery.loop", "scheduler.envelope.expired",
              "scheduler.envelope.removed", "smtp.session.inet4", "smtp.session.inet6", "smtp.session.local"}
    for key, value in stats.items():
        if key in ("uptime", "uptime.human", "control.session"):
            continue
        name = "smtpd_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
        kind = "counter" if key in totals else "gauge"
        assert families[name].type == kind, (key, families[name].type)
        sample = name + "_total" if kind == "counter" else name
        assert metrics.get(sample) == float(value), (key, sample, metrics.get(sample))
    assert {"scheduler.delivery.ok", "smtp.session.inet4"} <= set(stats)      # both kinds seen
    assert "# HELP smtpd_scheduler_delivery_ok_total OpenSMTPD statistic scheduler.delivery.ok" in text
    assert 0 <= metrics["smtpd_uptime_seconds"] < 600
    # Process metrics: one series per process, as /proc shows them.
    pids = {title.removeprefix("smtpd: ").strip("[]").replace("priv", "parent"): pid
            for title, pid in d.children().items()}
    assert set(pids) == {"parent", "control", "lka", "queue", "scheduler", "pony"}, pids
    # a local delivery worker forked by the parent carries the parent's title: name it by pid
    pids["parent"] = d.proc.pid
    usage = {(fam.name, s.labels["process"]): s.value for fam in families.values() for s in fam.samples
             if s.labels}
    assert families["smtpd_process_cpu_seconds"].type == "counter"
    assert families["smtpd_process_resident_memory_bytes"].type == "gauge"
    assert families["smtpd_process_open_fds"].type == "gauge"
    for proc, pid in pids.items():
        rss = int(re.search(r"VmRSS:\s+(\d+) kB", open(f"/proc/{pid}/status").read())[1]) * 1024
        assert 0.5 * rss < usage["smtpd_process_resident_memory_bytes", proc] < 2 * rss, proc
        # at most what /proc says now; a child forked by the zygote may not have used a
        # clock tick yet (it imported nothing itself), the parent has
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        now = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        assert 0 <= usage["smtpd_process_cpu_seconds", proc] <= now, (proc, now)
        assert proc != "parent" or usage["smtpd_process_cpu_seconds", proc] > 0
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        assert abs(usage["smtpd_process_open_fds", proc] - fds) <= 3, (proc, fds)
    # What a Prometheus server asks for (negotiated by the library, served after the drop).
    prometheus_accept = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                         "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    req = urllib.request.Request(f"http://127.0.0.1:{metrics_port}/metrics",
                                 headers={"Accept": prometheus_accept})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        body = resp.read().decode()
    assert body.endswith("# EOF\n") and "smtpd_scheduler_delivery_ok_total 2" in body
    assert "# TYPE smtpd_scheduler_delivery_ok counter" in body
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/other", timeout=10)
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{metrics_port}/metrics",
                                                      data=b"x", method="POST"), timeout=10)
    assert err.value.code == 405

    # monitor ends, with an error, when the daemon goes away.
    mon = Monitor(d)
    try:
        mon.line(), mon.line(), mon.line()
        d.stop()
        code, err = mon.finish(15)
        assert code == 1 and err.startswith("smtpctl: ") and "Traceback" not in err, err
    finally:
        if mon.proc.poll() is None:
            mon.proc.kill()
            mon.proc.wait()


def test_metrics_off_by_default_and_not_moved_by_a_reload(make_daemon, tmp_path):
    d = make_daemon(config(tmp_path / "d", free_port())).start()
    assert "metrics on" not in d.log_since_start()
    assert "control.session=1" in d.smtpctl("show", "stats").stdout
    # Its socket is bound before the privilege drop: a reload refuses to change it.
    metrics_port = free_port()
    d.config.write_text(d.config.read_text() + f"metrics listen on 127.0.0.1 port {metrics_port}\n")
    res = d.smtpctl("reload", check=False)
    assert res.returncode == 1
    assert 'control: a change to "metrics listen on" needs a restart' in res.stdout, res.stdout
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
    assert "control.session=1" in d.smtpctl("show", "stats").stdout


def _as_user(uid: int, gid: int, work, timeout: float = 60):
    """``work()`` run as ``uid`` in a forked child, its JSON-able result returned.  A fork
    rather than an exec: the venv's interpreter may be unreadable to that user."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: never returns
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.write(w, json.dumps({"result": work()}).encode())
        except BaseException as exc:   # noqa: BLE001 - reported to the parent
            os.write(w, json.dumps({"error": repr(exc)}).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], 1.0)
            if ready:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                data += chunk
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    result = json.loads(data)
    assert "result" in result, result
    return result["result"]


def _smtpctl_runs(sock: str, commands: list[list[str]]):
    """What smtpctl prints and exits with for each command: [(words, exit, out, err)]."""
    def work():
        results = []
        for words in commands:
            out, err, code = io.StringIO(), io.StringIO(), 0
            with redirect_stdout(out), redirect_stderr(err):
                try:
                    smtpctl_main.run(words, sock, False)
                except typer.Exit as exc:
                    code = exc.exit_code
                except SystemExit as exc:
                    code = exc.code
            results.append([words, code, out.getvalue(), err.getvalue()])
        return results
    return work


def _raw_requests(sock: str, commands: list[str]):
    """Frames written by hand, one connection, several requests: control's answers."""
    def work():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(20)
        s.connect(sock)
        answers = []
        for command in commands:
            s.sendall(frame(ClientRequest(version=PROTOCOL_VERSION, command=command, args={"id": 0})))
            reply = recv_frame(s)
            answers.append([command, reply.ok, reply.text])
        s.close()
        return answers
    return work


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (CI runs as root)")
def test_non_root_user_is_refused_everything(make_daemon, tmp_path):
    sockdir = Path(tempfile.mkdtemp(prefix="pysmtpd-ctl-"))
    try:
        os.chmod(sockdir, 0o711)                   # nobody may reach the socket, not list the dir
        port = free_port()
        d = make_daemon(config(tmp_path / "d", port), extra_args=["-P", "mda"])
        d.socket = sockdir / "ctl.sock"
        d.start()
        assert os.stat(d.socket).st_mode & 0o777 == 0o666      # as OpenSMTPD: access is per command
        send(port, "a@remote.test", ["bob@example.test"])
        before = d.smtpctl("show", "status").stdout
        assert len(d.queue_lines()) == 1
        smtpctl_main.run(["show", "status"], str(d.socket), False)   # root may; loads smtpctl's code

        nobody = pwd.getpwnam("nobody")
        commands = [["show", "status"], ["show", "stats"], ["show", "queue"], ["monitor"],
                    ["trace", "mproc"], ["untrace", "all"], ["log", "verbose"], ["profile", "imsg"],
                    ["pause", "smtp"], ["resume", "mda"], ["schedule", "all"], ["remove", "all"],
                    ["stop"]]
        results = _as_user(nobody.pw_uid, nobody.pw_gid, _smtpctl_runs(str(d.socket), commands))
        assert len(results) == len(commands)
        for words, code, out, err in results:
            assert (code, out, err) == (1, "", "smtpctl: need root privileges\n"), words
        # Frames forged by hand (not smtpctl's client) are refused by control just the same.
        forged = ["stop", "remove", "list", "show queue", "log verbose", "monitor"]
        answers = _as_user(nobody.pw_uid, nobody.pw_gid, _raw_requests(str(d.socket), forged))
        assert answers == [[c, False, "need root privileges"] for c in forged]
        log = d.log_since_start()
        assert f"warn: control: show stats refused to uid {nobody.pw_uid}: need root privileges" in log
        assert f"stop refused to uid {nobody.pw_uid}" in log
        # Nothing changed: still running, same status, the mail still queued, no tracing.
        assert d.proc.poll() is None
        assert d.smtpctl("show", "status").stdout == before
        assert len(d.queue_lines()) == 1
        assert "tracing mask" not in d.log_since_start() and "mproc:" not in d.log_since_start()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def test_control_connections_per_user_are_limited(make_daemon, tmp_path):
    d = make_daemon(config(tmp_path / "d", free_port())).start()
    held = []
    try:
        for _ in range(32):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(d.socket))
            held.append(s)
        over = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        over.settimeout(10)
        over.connect(str(d.socket))
        over.sendall(frame(ClientRequest(version=PROTOCOL_VERSION, command="show status")))
        try:
            assert over.recv(4) == b""             # closed without an answer
        except ConnectionResetError:
            pass
        over.close()
        d.wait_log("warn: too many connections to control socket from user with uid")
        # The held connections still work, several requests each.
        held[0].sendall(frame(ClientRequest(version=PROTOCOL_VERSION, command="show status")))
        assert recv_frame(held[0]).ok
        held[0].sendall(frame(ClientRequest(version=PROTOCOL_VERSION, command="show stats")))
        assert recv_frame(held[0]).data["control.session"] == 32
    finally:
        for s in held:
            s.close()
    wait_for(lambda: d.smtpctl("show", "status", check=False).returncode == 0, 10, "control to accept again")


def _timed_data(s: smtplib.SMTP, body: bytes) -> tuple[int, float]:
    """DATA, then the body and its final dot: the reply's code and the seconds from
    sending the dot to reading the reply."""
    code, _ = s.docmd("DATA")
    assert code == 354, code
    started = time.monotonic()
    s.send(body + b".\r\n")
    code, _ = s.getreply()
    return code, time.monotonic() - started


def test_commit_latency_keys(make_daemon, tmp_path):
    """smtp.commit.latency.* (a pysmtpd addition): pony's histogram of the time from
    the final dot to the reply written, 250 or a refusal alike."""
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port, extra="smtp max-message-size 2000")).start()
    assert "smtp.commit.latency" not in d.smtpctl("show", "stats").stdout    # nothing measured yet
    client_seconds = []
    codes = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        for body in [b"Subject: t\r\n\r\nhello\r\n"] * 3 + [b"Subject: big\r\n\r\n" + b"x" * 3000 + b"\r\n"]:
            assert s.mail("a@remote.test")[0] == 250
            assert s.rcpt("bob@example.test")[0] == 250
            code, seconds = _timed_data(s, body)
            codes.append(code)
            client_seconds.append(seconds)
    assert codes == [250, 250, 250, 554]          # the last one too big (R_TOO_BIG)
    wait_for(lambda: len(maildir_messages(tmp_path / "d", "bob")) == 3, 20, "deliveries")
    stats = stats_of(d.smtpctl("show", "stats").stdout)
    latency = {k.removeprefix("smtp.commit.latency."): float(v) for k, v in stats.items()
               if k.startswith("smtp.commit.latency.")}
    assert set(latency) == {"count", "p50_ms", "p90_ms", "p99_ms", "max_ms"}
    assert latency["count"] == 4 and stats["smtp.commit.latency.count"] == "4"
    # the server's interval lies within the client's (the dot sent .. the reply read)
    assert 0 < latency["max_ms"] <= max(client_seconds) * 1000 + 0.05, (latency, client_seconds)
    # percentiles are bucket bounds: ordered, and the p99 of 4 is the bucket of the maximum
    assert 0 < latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"]
    assert latency["max_ms"] <= latency["p99_ms"] <= latency["max_ms"] + 1, latency
