"""The pure parts of bench/bench_compare.py and bench/postfix_instance.py: the private
Postfix's configuration, the /proc arithmetic, and the side-by-side table."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import bench_compare as bc  # noqa: E402
import postfix_instance as pi  # noqa: E402

# Lines in the shape of Debian 12's /usr/share/postfix/master.cf.dist.
MASTER_DIST = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
#               (yes)   (yes)   (no)    (never) (100)
smtp      inet  n       -       y       -       -       smtpd
#smtp      inet  n       -       y       -       1       postscreen
pickup    unix  n       -       y       60      1       pickup
qmgr      unix  n       -       n       300     1       qmgr
relay     unix  -       -       y       -       -       smtp
        -o syslog_name=postfix/$service_name
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def test_master_cf_moves_the_listener_and_turns_chroot_off():
    text = pi.master_cf_text(MASTER_DIST, 25999)
    services = {l.split()[0]: l.split() for l in text.splitlines()
                if l and not l[0].isspace() and not l.startswith("#")}
    assert set(services) == {"127.0.0.1:25999", "pickup", "qmgr", "relay", "postlog"}
    assert services["127.0.0.1:25999"][1:] == ["inet", "n", "-", "n", "-", "-", "smtpd"]
    assert services["pickup"][5:] == ["60", "1", "pickup"]
    assert all(fields[4] == "n" for fields in services.values())
    # Comments and continuation lines are kept as they are.
    assert "#smtp      inet  n       -       y       -       1       postscreen" in text
    assert "        -o syslog_name=postfix/$service_name" in text


def test_master_cf_without_a_listener_is_refused():
    with pytest.raises(pi.PostfixError):
        pi.master_cf_text("pickup    unix  n       -       y       60      1       pickup\n", 25)


def _settings(text: str) -> dict[str, str]:
    return dict(line.split(" = ", 1) if " = " in line else (line.rstrip(" ="), "")
                for line in text.splitlines() if line and not line.startswith("#"))


def test_main_cf_relay_goes_to_the_sink_without_lookups(tmp_path):
    tools = tmp_path / "tools"
    s = _settings(pi.main_cf_text(tools=tools, base=tmp_path, mode="relay", sink_port=4321,
                                  maildir_user="alice", maildir_domain="example.test",
                                  uid=65534, gid=65534))
    assert s["relayhost"] == "[127.0.0.1]:4321"
    assert s["mydestination"] == "" and s["relay_domains"] == ""
    assert s["smtp_dns_support_level"] == "disabled"
    assert s["inet_interfaces"] == "127.0.0.1"
    assert s["queue_directory"] == str(tmp_path / "queue")
    assert s["daemon_directory"] == str(tools / "usr/lib/postfix/sbin")
    assert f"LD_LIBRARY_PATH={tools / 'usr/lib/postfix'}" in s["import_environment"]
    assert s["maillog_file"].startswith(s["maillog_file_prefixes"])
    assert not any(k.startswith("virtual_") for k in s)
    # fsync and the other defaults are Postfix's own: not overridden.
    assert not any("fsync" in k or "flow" in k for k in s)


def test_main_cf_maildir_is_a_virtual_mailbox(tmp_path):
    s = _settings(pi.main_cf_text(tools=tmp_path, base=tmp_path, mode="maildir", sink_port=None,
                                  maildir_user="bob", maildir_domain="d.test", uid=1234, gid=99))
    assert s["virtual_mailbox_domains"] == "d.test"
    assert s["virtual_mailbox_maps"] == "inline:{ bob@d.test=bob/Maildir/ }"
    assert s["virtual_uid_maps"] == "static:1234" and s["virtual_gid_maps"] == "static:99"
    assert "relayhost" not in s


def test_main_cf_refuses_bad_modes(tmp_path):
    with pytest.raises(ValueError):
        pi.main_cf_text(tools=tmp_path, base=tmp_path, mode="mbox", sink_port=1,
                        maildir_user="a", maildir_domain="d", uid=1, gid=1)
    with pytest.raises(ValueError):
        pi.main_cf_text(tools=tmp_path, base=tmp_path, mode="relay", sink_port=None,
                        maildir_user="a", maildir_domain="d", uid=1, gid=1)


def test_queue_directories_come_from_postfix_files():
    text = """\
# comment: $queue_directory/x:d:root:-:755
$config_directory:d:root:-:755:u
$data_directory:d:$mail_owner:-:700:uc
$queue_directory:d:root:-:755:uc
$queue_directory/maildrop:d:$mail_owner:$setgid_group:730:uc
$queue_directory/pid:d:root:-:755:uc
$command_directory/postdrop:f:root:$setgid_group:2755:u
"""
    assert pi.queue_directories(text) == [
        ("$data_directory", "$mail_owner", "-", 0o700),
        ("$queue_directory", "root", "-", 0o755),
        ("$queue_directory/maildrop", "$mail_owner", "$setgid_group", 0o730),
        ("$queue_directory/pid", "root", "-", 0o755),
    ]


def test_tree_cpu_counts_live_processes_and_what_they_reaped():
    def fields(state: str, utime: int, stime: int, cutime: int, cstime: int) -> list[bytes]:
        f = [state.encode(), b"1", b"1", b"1"] + [b"0"] * 7
        return f + [str(x).encode() for x in (utime, stime, cutime, cstime)] + [b"0"] * 5
    members = [(10, fields("S", 5, 3, 40, 2)),    # master: reaped children in cutime/cstime
               (11, fields("R", 7, 1, 0, 0)),
               (12, fields("Z", 2, 2, 0, 0))]     # exited, not yet reaped: its own line
    assert bc.tree_cpu_ticks(members) == 5 + 3 + 40 + 2 + 7 + 1 + 2 + 2


def test_session_members_finds_this_process():
    members = dict(bc.session_members(os.getsid(0)))
    assert os.getpid() in members
    assert bc.tree_cpu_ticks([(os.getpid(), members[os.getpid()])]) >= 0


def _run(daemon, mode, repeat, delivered_per_s, **kw):
    r = {"daemon": daemon, "mode": mode, "repeat": repeat, "n": 100, "sessions": 10, "accepted": 100,
         "delivered": 100, "accepted_per_s": delivered_per_s + 10, "delivered_per_s": delivered_per_s,
         "cpu_ms_per_message": 2.0, "peak_pss_mib": 40.0, "timed_out": False, "error": None}
    r.update(kw)
    return r


def test_ratios_pair_runs_of_the_same_repeat():
    runs = [_run("postfix", "relay", 0, 400.0), _run("pysmtpd", "relay", 0, 200.0),
            _run("postfix", "relay", 1, 500.0), _run("pysmtpd", "relay", 1, 300.0),
            _run("postfix", "maildir", 0, 300.0)]
    assert bc.ratios(runs, "relay") == [0.5, 0.6]
    assert bc.ratios(runs, "maildir") == []


def test_spread():
    assert bc.spread([None, None]) == "n/a"
    assert bc.spread([454.2, 480.4, None]) == "454-480"
    assert bc.spread([3.04, 3.01], 1) == "3.0"
    assert bc.spread([4.5]) == "4.5"


def test_table_rows_ranges_ratio_and_incomplete_runs():
    runs = [_run("postfix", "relay", 0, 400.0), _run("pysmtpd", "relay", 0, 200.0, peak_pss_mib=140.4),
            _run("postfix", "relay", 1, 500.0), _run("pysmtpd", "relay", 1, 300.0, peak_pss_mib=150.0),
            _run("postfix", "maildir", 0, 300.0),
            _run("pysmtpd", "maildir", 0, 150.0, delivered=90, timed_out=True, cpu_ms_per_message=None)]
    lines = bc.table(runs).splitlines()
    assert lines[0].startswith("| | accepted msg/s | delivered msg/s")
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]]
            for l in lines[2:] if l.startswith("| ")}
    assert rows["Postfix, relay to smtp-sink"] == ["410-510", "400-500", "2.0 ms", "40 MB", "1"]
    assert rows["pysmtpd, relay to smtp-sink"] == ["210-310", "200-300", "2.0 ms", "140-150 MB", "0.50-0.60"]
    assert rows["pysmtpd, local Maildir *"] == ["160", "150", "n/a", "40 MB", "0.50"]
    assert list(rows)[:2] == ["Postfix, relay to smtp-sink", "pysmtpd, relay to smtp-sink"]
    assert lines[-1] == "* pysmtpd, local Maildir, run 1: accepted 100/100, delivered 90, timed out"


def test_complete():
    assert bc.complete(_run("postfix", "relay", 0, 1.0))
    assert not bc.complete(_run("postfix", "relay", 0, 1.0, delivered=99))
    assert not bc.complete(_run("postfix", "relay", 0, 1.0, error="x"))


def test_log_warnings():
    log = ("postfix/smtpd[1]: connect from localhost\n"
           "postfix/smtp[2]: warning: no route\nsmtpd: ERROR something\n")
    assert bc.log_warnings(log) == 2


def test_asyncio_runs_stay_out_of_the_table_and_ratios():
    lat = {"count": 100, "p50": 11.5, "p90": 17.7, "p99": 25.3, "max": 40.0}
    runs = [_run("postfix", "relay", 0, 400.0), _run("pysmtpd", "relay", 0, 200.0),
            _run("pysmtpd", "relay", 0, 150.0, client="asyncio", commit_latency_ms=lat)]
    assert bc.ratios(runs, "relay") == [0.5]
    rows = [l for l in bc.table(runs).splitlines() if l.startswith("| pysmtpd")]
    assert len(rows) == 1 and "| 200 |" in rows[0]


def test_latency_lines_server_side_and_client_side():
    server = {"count": 100, "p50": 3.1, "p90": 6.0, "p99": 18.2, "max": 30.5}
    client = {"count": 100, "p50": 11.5, "p90": 17.7, "p99": 25.3, "max": 40.0}
    nothing = {"count": None, "p50": None, "p90": None, "p99": None, "max": None}
    runs = [_run("postfix", "maildir", 0, 400.0),
            _run("pysmtpd", "maildir", 0, 200.0, server_commit_latency_ms=server),
            _run("pysmtpd", "maildir", 0, 150.0, client="asyncio", commit_latency_ms=client,
                 server_commit_latency_ms=nothing),
            _run("pysmtpd", "relay", 0, 300.0, server_commit_latency_ms=nothing)]
    assert bc.latency_lines(runs) == [
        "pysmtpd relay, run 1, commit latency under smtp-source, server side (smtpctl show stats):"
        " not reported",
        "pysmtpd maildir, run 1, commit latency under smtp-source, server side (smtpctl show stats):"
        " p50 3.1 p90 6.0 p99 18.2 max 30.5 ms (n=100)",
        "pysmtpd maildir, run 1, commit latency under bench_mail's asyncio client (pipelining;"
        " 100 messages, 10 sessions): client side p50 11.5 p90 17.7 p99 25.3 max 40.0 ms (n=100),"
        " server side not reported",
    ]


def test_the_daemons_take_turns_at_going_first():
    """Repeat 0: Postfix then pysmtpd; repeat 1: pysmtpd then Postfix; the asyncio
    client's run of pysmtpd last in each, and only when asked for and pysmtpd runs."""
    both = ["postfix", "pysmtpd"]
    assert bc.run_plan(both, 0, False) == [("postfix", "smtp-source"), ("pysmtpd", "smtp-source")]
    assert bc.run_plan(both, 1, True) == [("pysmtpd", "smtp-source"), ("postfix", "smtp-source"),
                                          ("pysmtpd", "asyncio")]
    assert bc.run_plan(both, 2, True)[0] == ("postfix", "smtp-source")
    assert bc.run_plan(["postfix"], 1, True) == [("postfix", "smtp-source")]


def test_stolen_cpu_from_proc_stat_and_the_runs_it_points_out():
    import meters
    before = meters.machine_cpu_ticks("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 1 2 3\n")
    assert before == (35, 1000)
    after = meters.machine_cpu_ticks("cpu  200 0 100 900 10 0 10 80 7 0\n")
    assert after == (80, 1300)                   # guest time is inside user: not added
    assert meters.steal_share(before, after) == 0.15
    assert meters.steal_share(after, after) is None
    with pytest.raises(ValueError):
        meters.machine_cpu_ticks("intr 1 2 3\n")
    runs = [{"daemon": "pysmtpd", "mode": "maildir", "repeat": 0, "steal_share": 0.12},
            {"daemon": "postfix", "mode": "maildir", "repeat": 0, "steal_share": 0.01},
            {"daemon": "pysmtpd", "mode": "maildir", "repeat": 0, "client": "asyncio", "steal_share": 0.2}]
    assert bc.steal_lines(runs) == [
        "pysmtpd maildir, run 1: 12 % of the CPU time stolen by the hypervisor during the load"]
