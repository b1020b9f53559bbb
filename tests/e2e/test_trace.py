"""smtpctl trace/untrace, log verbose/brief, profile/unprofile against the running daemon.

Each switch is flipped at run time (no -T at start) and judged by what the daemon
writes to its log afterwards."""
from __future__ import annotations

import re

from tests.conftest import free_port, wait_for
from tests.e2e.helpers import config, maildir_messages, send
from tests.e2e.sink import Sink

MPROC = re.compile(r"^mproc: (\w+) -> (\w+) : (\d+) (\w+)((?: \w+=[0-9a-f]+)*)$")
PROCS = ("control", "parent", "lka", "queue", "scheduler", "pony")


def mproc_lines(text: str) -> list[tuple[str, str, int, str, dict[str, str]]]:
    out = []
    for line in text.splitlines():
        if line.startswith("mproc:"):
            m = MPROC.match(line)
            assert m, f"malformed trace mproc line: {line!r}"
            ids = dict(part.split("=") for part in m.group(5).split())
            out.append((m.group(1), m.group(2), int(m.group(3)), m.group(4), ids))
    return out


def settled(d, deliveries: int) -> None:
    """Wait until ``deliveries`` deliveries are logged and the scheduler has forgotten
    them (the last message of the path), so that an absence in the log means something."""
    wait_for(lambda: d.log_since_start().count("result=Ok") >= deliveries, 20, f"{deliveries} deliveries")
    wait_for(lambda: d.queue_lines() == [], 20, "the queue to be empty")


def test_trace_mproc_shows_the_whole_path_of_one_message(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port)).start()
    assert "mproc:" not in d.log_since_start()          # off by default
    assert d.smtpctl("trace", "mproc").stdout == "command succeeded\n"
    start = len(d.log())
    reply = send(port, "a@remote.test", ["bob@example.test"])
    msgid = reply.split()[1]
    wait_for(lambda: maildir_messages(tmp_path / "d", "bob"), 20, "delivery")
    d.wait_log("queue_delivered_batch")
    lines = mproc_lines(d.log()[start:])
    evpid = re.search(r"smtp envelope evpid=([0-9a-f]{16})", d.log()[start:]).group(1)
    assert evpid[:8] == msgid

    def find(sender, receiver, name, key, value, after=-1):
        hits = [i for i, (s, r, size, n, ids) in enumerate(lines)
                if (s, r, n) == (sender, receiver, name) and ids.get(key) == value and i > after]
        assert hits, f"no {sender} -> {receiver} {name} {key}={value} in:\n" + "\n".join(map(str, lines))
        assert len(hits) == 1, f"one line per message, got {len(hits)} for {name}"
        return hits[0]

    # pony -> queue -> scheduler -> queue -> pony, and the result back the same way.
    # The queue announces a group commit's envelopes in one message, and the scheduler
    # its orders of one pass in one message: their lines name every envelope they carry.
    create = find("pony", "queue", "smtp_message_commit", "msgid", msgid)
    commit = find("queue", "scheduler", "queue_commit_batch", "evpid", evpid, create)
    assert lines[commit][4]["msgid"] == msgid
    order = find("scheduler", "queue", "sched_orders", "evpid", evpid, commit)
    deliver = find("queue", "pony", "queue_deliver", "evpid", evpid, order)
    result = find("pony", "queue", "delivery_result", "evpid", evpid, deliver)
    find("queue", "scheduler", "queue_delivered_batch", "evpid", evpid, result)
    # Every line names both ends and a size; pony's names the SMTP session it works for.
    assert all(s in PROCS and r in PROCS and s != r and size > 0 for s, r, size, _, _ in lines)
    session = lines[create][4]["session"]
    assert re.search(rf"^{session} smtp connected ", d.log()[start:], re.M)
    # The commit's reply goes back with the request's reqid.
    reqid = lines[create][4]["reqid"]
    assert any(n == "smtp_message_commit_reply" and ids.get("reqid") == reqid
               for s, r, _, n, ids in lines if (s, r) == ("queue", "pony"))

    assert d.smtpctl("untrace", "mproc").stdout == "command succeeded\n"
    start = len(d.log())
    send(port, "a@remote.test", ["bob@example.test"])
    settled(d, 2)
    assert "mproc:" not in d.log()[start:]


def test_trace_every_subsystem_and_bad_keywords(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    sink = Sink(sink_port).start()
    try:
        d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}")).start()
        for word in ("imsg", "io", "smtp", "filters", "mta", "bounce", "scheduler", "expand",
                     "lookup", "stat", "rules"):
            assert d.smtpctl("trace", word).stdout == "command succeeded\n", word
        start = len(d.log())
        send(port, "a@remote.test", ["alice@example.test"])      # local delivery
        send(port, "me@local.test", ["x@remote.test"])           # relayed to the sink
        wait_for(lambda: sink.transactions, 20, "relay")
        wait_for(lambda: maildir_messages(tmp_path / "d", "alice"), 20, "delivery")
        d.wait_log('result="Ok"')
        log = d.log()[start:]
        expected = [
            r"^imsg: queue <- pony: smtp_message_create \(len=\d+\)",
            r"^smtp: [0-9a-f]{16}: <<< mail FROM:<a@remote\.test>",   # as smtplib sends it
            r"^smtp: [0-9a-f]{16}: >>> 250 2\.0\.0 [0-9a-f]{8} Message accepted for delivery",
            r"^smtp: [0-9a-f]{16}: <<< \[EOM\]",
            r"^smtp: [0-9a-f]{16}: IO_DATAIN \d+ bytes",
            r"^mta: [0-9a-f]{16}: >>> MAIL FROM:<me@local\.test>",
            r"^mta: [0-9a-f]{16}: <<< 250 ",
            r"^mta: [0-9a-f]{16}: >>> \[\.\.\.\d+ bytes\.\.\.\]",
            r"^mta: [0-9a-f]{16}: IO_DATAOUT \d+ bytes",
            r"^scheduler: inserting evp:[0-9a-f]{16}",
            r"^scheduler: committing msg:[0-9a-f]{8}",
            r"^scheduler: deleting evp:[0-9a-f]{16} \(ok\)",
            r'^rules: rule #1 matched: match from any for domain <[^>]+> action "local"',
            r"^expand: lka_expand: address: alice@example\.test \[depth=0\]",
            r'^lookup: lookup "alice" as userinfo in table static:users -> "',
            r"^stat: increment: smtp\.session: 0 -> 1",
        ]
        for pattern in expected:
            assert re.search(pattern, log, re.M), f"{pattern} not in the log:\n{log[-4000:]}"
        assert "<<< Subject: test" not in log          # message content stays out of the log

        assert d.smtpctl("untrace", "all").stdout == "command succeeded\n"
        start = len(d.log())
        send(port, "a@remote.test", ["alice@example.test"])
        settled(d, 2)
        quiet = d.log()[start:]
        assert not re.search(r"^(imsg|smtp|mta|scheduler|rules|expand|lookup|stat|mproc): ", quiet, re.M), quiet

        bad = d.smtpctl("trace", "everything", check=False)
        assert (bad.returncode, bad.stdout, bad.stderr) == (1, "", "smtpctl: invalid trace keyword: everything\n")
        bad = d.smtpctl("untrace", "tables", check=False)     # smtpd -T only, as in OpenSMTPD
        assert bad.returncode == 1 and bad.stderr == "smtpctl: invalid trace keyword: tables\n"
    finally:
        sink.stop()


def test_log_verbose_and_brief_in_every_process(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port)).start()
    assert d.smtpctl("trace", "mproc").stdout == "command succeeded\n"
    start = len(d.log())
    assert d.smtpctl("log", "verbose").stdout == "command succeeded\n"
    log = d.log()[start:]
    for proc in PROCS:
        assert f"debug: {proc}: verbose logging on" in log, proc
    start = len(d.log())
    send(port, "a@remote.test", ["bob@example.test"])
    d.wait_log("result=Ok")
    log = d.log()[start:]
    assert re.search(r"^debug: scheduler: evp:[0-9a-f]{16} scheduled \(mda\)$", log, re.M), log
    assert "mproc:" not in log           # log verbose sets the mask to debug only, as OpenSMTPD

    assert d.smtpctl("log", "brief").stdout == "command succeeded\n"
    start = len(d.log())
    send(port, "a@remote.test", ["bob@example.test"])
    settled(d, 2)
    assert "debug:" not in d.log()[start:]


def test_profile_imsg_and_queue(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port)).start()
    assert d.smtpctl("profile", "imsg").stdout == "command succeeded\n"
    assert d.smtpctl("profile", "queue").stdout == "command succeeded\n"
    start = len(d.log())
    send(port, "a@remote.test", ["bob@example.test"])
    d.wait_log("result=Ok")
    d.wait_log("profile-queue: queue_envelope_delete")    # the removal follows the result
    log = d.log()[start:]
    # profile-imsg: <process> <peer> <message> <size> <seconds.nanoseconds>
    assert re.search(r"^profile-imsg: queue pony smtp_message_commit \d+ \d+\.\d{9}$", log, re.M), log
    assert re.search(r"^profile-imsg: scheduler queue queue_commit_batch \d+ \d+\.\d{9}$", log, re.M)
    for op in ("queue_message_create", "queue_envelope_create", "queue_message_commit",
               "queue_envelope_load", "queue_message_fd_r", "queue_envelope_delete"):
        assert re.search(rf"^profile-queue: {op} \d+\.\d{{9}}$", log, re.M), f"{op}:\n{log}"

    assert d.smtpctl("unprofile", "imsg").stdout == "command succeeded\n"
    assert d.smtpctl("unprofile", "queue").stdout == "command succeeded\n"
    start = len(d.log())
    send(port, "a@remote.test", ["bob@example.test"])
    settled(d, 2)
    assert "profile-" not in d.log()[start:]
    bad = d.smtpctl("profile", "disk", check=False)
    assert (bad.returncode, bad.stderr) == (1, "smtpctl: invalid profile keyword: disk\n")


def test_smtpd_dash_T_at_start(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port),
                    extra_args=["-T", "mproc", "-T", "profile-imsg", "-T", "profstat",
                                "-T", "nonsense"]).start()
    boot = d.log_since_start()
    assert 'warn: unknown trace flag "nonsense"' in boot
    assert re.search(r"^mproc: parent -> scheduler : \d+ conf_end$", boot, re.M), boot
    send(port, "a@remote.test", ["bob@example.test"])
    log = d.wait_log("result=Ok")
    assert re.search(r"^profile-imsg: queue pony smtp_message_commit \d+ \d+\.\d{9}$", log, re.M)
    # -T profstat: the handler times are kept as stats too (seconds.microseconds).
    stats = d.smtpctl("show", "stats").stdout
    assert re.search(r"^profiling\.imsg\.queue\.pony\.smtp_message_commit=\d+\.\d+$", stats, re.M), stats
    # control started with the same masks: untrace/unprofile clear them everywhere.
    assert d.smtpctl("untrace", "mproc").stdout == "command succeeded\n"
    assert d.smtpctl("unprofile", "imsg").stdout == "command succeeded\n"
    start = len(d.log())
    send(port, "a@remote.test", ["bob@example.test"])
    settled(d, 2)
    assert "mproc:" not in d.log()[start:] and "profile-imsg" not in d.log()[start:]


def test_trace_lines_reach_syslog_at_debug_priority(ops_daemon, syslog_socket, tmp_path):
    port = free_port()
    d = ops_daemon(config(tmp_path / "d", port), flags=("-F", "--syslog-socket", syslog_socket.address))
    d.start(ready=lambda: any("ready:" in m for m in syslog_socket.messages()))
    assert d.smtpctl("trace", "mproc").stdout == "command succeeded\n"
    send(port, "a@remote.test", ["bob@example.test"])
    syslog_socket.wait("queue_delivered_batch")
    LOG_MAIL_DEBUG = 2 * 8 + 7
    traced = [(pri, msg) for pri, _, _, msg in syslog_socket.records() if msg.startswith("mproc: ")]
    assert traced and all(pri == LOG_MAIL_DEBUG for pri, _ in traced), traced[:3]
    # ... written although debug logging is off (log brief): no "debug:" line went out.
    assert not [m for m in syslog_socket.messages() if m.startswith("debug:")]
