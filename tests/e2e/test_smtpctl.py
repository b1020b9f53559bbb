"""smtpctl against the running daemon (and against none)."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, free_port
from tests.e2e.helpers import config, send


def test_show_status_and_pause_resume_smtp(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port)).start()
    assert d.smtpctl("show", "status").stdout == "MDA running\nMTA running\nSMTP running\n"
    assert d.smtpctl("pause", "smtp").stdout.strip() == "command succeeded"
    assert "SMTP paused" in d.smtpctl("sh", "statu").stdout
    again = d.smtpctl("pause", "smtp", check=False)
    assert again.returncode != 0 and "command failed" in again.stdout + again.stderr
    assert d.smtpctl("resume", "smtp").stdout.strip() == "command succeeded"
    send(port, "a@remote.test", ["bob@example.test"])


def test_abbreviations_and_errors(make_daemon, tmp_path):
    d = make_daemon(config(tmp_path / "d", free_port()), extra_args=["-P", "mda"]).start()
    send(int(d.config.read_text().split("port ")[1].split()[0]), "a@remote.test", ["bob@example.test"])
    full = d.smtpctl("show", "queue").stdout

    def steady(listing: str) -> list[list[str]]:
        # runtime (nexttry - now) moves with the clock between two listings
        return [line.split("|")[:12] + line.split("|")[13:] for line in listing.splitlines()]

    assert steady(d.smtpctl("sh", "q").stdout) == steady(full) and full.count("\n") == 1
    mailq = subprocess.run([sys.executable, "-c", "import sys; sys.argv[0]='mailq'; from smtpctl.main import main; main()",
                            "--socket", str(d.socket)], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert mailq.returncode == 0 and steady(mailq.stdout) == steady(full)
    amb = d.smtpctl("sh", "st", check=False)
    assert amb.returncode == 255
    assert amb.stderr.startswith("possibilities are:\n") and "show stats" in amb.stderr and "show status" in amb.stderr
    bad = d.smtpctl("frobnicate", check=False)
    assert bad.returncode == 255 and "possibilities are:" in bad.stderr
    evpid = full.split("|")[0]
    # as OpenSMTPD's smtpctl: the count, even for one evpid (do_remove)
    assert d.smtpctl("remove", evpid).stdout.strip() == "1 envelope removed"
    assert d.queue_lines() == []
    assert d.smtpctl("remove", "all").stdout.strip() == "0 envelope removed"


def test_daemon_not_running(tmp_path):
    res = subprocess.run([sys.executable, "-m", "smtpctl", "--socket", str(tmp_path / "none.sock"),
                          "show", "status"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert res.stderr == "smtpctl: smtpd doesn't seem to be running\n"
