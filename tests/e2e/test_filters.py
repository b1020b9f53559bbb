"""Filters against the real daemon (issue 9): filters written here in Python and in
/bin/sh speak smtpd-filters(7) with pysmtpd, and what they decide shows in the replies
and in the delivered message; a filter that crashes, hangs or writes garbage costs its
sessions a 4xx, is restarted, and the daemon keeps serving."""
from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for
from tests.e2e.helpers import config, maildir_messages, send, unprivileged_daemon

PYTHON = "/usr/bin/python3"     # the filters run as _smtpd when root: a Python it can run

# A filter in Python, by what the recipient's local part asks for:
#   bob@     rejected at rcpt-to with the filter's text
#   crash@   the filter exits          hang@    it stops answering
#   garbage@ it writes a line outside the protocol
# data lines: a header added after Received, "hello" rewritten to "HELLO", lines with
# "DROPME" dropped.  It also says on stderr who it runs as, with an escape character.
PY_FILTER = r'''
import os, sys, time
def out(line):
    sys.stdout.write(line + "\n"); sys.stdout.flush()
sys.stderr.write("started uid=%d \x1b[31m\n" % os.getuid()); sys.stderr.flush()
for line in sys.stdin:
    line = line.rstrip("\n")
    if line == "config|ready":
        for phase in ("rcpt-to", "data-line"):
            out("register|filter|smtp-in|" + phase)
        out("register|report|smtp-in|tx-commit")
        out("register|ready")
        continue
    f = line.split("|")
    if f[0] == "report":
        sys.stderr.write("report %s\n" % f[4]); sys.stderr.flush()
        continue
    if f[0] != "filter":
        continue
    sid, tok = f[5], f[6]
    if f[4] == "rcpt-to":
        rcpt = f[7]
        if rcpt.startswith("bob@"):
            out("filter-result|%s|%s|reject|550 5.7.1 bob may not receive mail here" % (sid, tok))
        elif rcpt.startswith("crash@"):
            sys.exit(3)
        elif rcpt.startswith("hang@"):
            time.sleep(3600)
        elif rcpt.startswith("garbage@"):
            out("this is not the protocol")
        else:
            out("filter-result|%s|%s|proceed" % (sid, tok))
    elif f[4] == "data-line":
        data = "|".join(f[7:])
        if "DROPME" in data:
            continue
        out("filter-dataline|%s|%s|%s" % (sid, tok, data.replace("hello", "HELLO")))
        if data.startswith("Received:"):
            out("filter-dataline|%s|%s|X-Filtered-By: python" % (sid, tok))
'''

# A filter in /bin/sh: junk at mail-from for senders of spam.test, disconnect at helo
# for a client that says "evil", proceed otherwise.
SH_FILTER = r'''#!/bin/sh
while IFS= read -r line; do
    case "$line" in
    config\|ready)
        echo "register|filter|smtp-in|helo"
        echo "register|filter|smtp-in|ehlo"
        echo "register|filter|smtp-in|mail-from"
        echo "register|ready"
        ;;
    filter\|*)
        phase=$(echo "$line" | cut -d'|' -f5)
        sid=$(echo "$line" | cut -d'|' -f6)
        tok=$(echo "$line" | cut -d'|' -f7)
        arg=$(echo "$line" | cut -d'|' -f8-)
        case "$phase:$arg" in
        helo:evil*|ehlo:evil*) echo "filter-result|$sid|$tok|disconnect|554 5.7.1 go away, evil" ;;
        mail-from:*@spam.test) echo "filter-result|$sid|$tok|junk" ;;
        *) echo "filter-result|$sid|$tok|proceed" ;;
        esac
        ;;
    esac
done
'''


@pytest.fixture
def scripts():
    """A directory the filters' user can read (pytest's own is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="pysmtpd-filters-"))
    os.chmod(path, 0o755)
    (path / "pyfilter.py").write_text(PY_FILTER)
    (path / "shfilter.sh").write_text(SH_FILTER)
    for f in path.iterdir():
        os.chmod(f, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def filtered_config(tmp_path, port: int, filters: str, name: str, extra: str = "") -> str:
    text = config(tmp_path / "d", port, extra=extra)
    return filters + text.replace(f"listen on 127.0.0.1 port {port}\n",
                                  f"listen on 127.0.0.1 port {port} filter {name}\n")


def stats(d) -> dict[str, str]:
    out = d.smtpctl("show", "stats").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def body_of(tmp_path, user: str, index: int = -1) -> str:
    wait_for(lambda: maildir_messages(tmp_path / "d", user), 20, f"mail for {user}")
    return maildir_messages(tmp_path / "d", user)[index].decode()


def test_python_filter_rewrites_adds_drops_lines_and_rejects_at_rcpt(make_daemon, tmp_path, scripts):
    port = free_port()
    d = make_daemon(filtered_config(tmp_path, port, f'filter py proc-exec "{PYTHON} {scripts}/pyfilter.py"\n',
                                    "py")).start()
    d.wait_log("info: filter py: ready")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("sender@remote.test")
        code, text = s.rcpt("bob@example.test")
        assert (code, text) == (550, b"5.7.1 bob may not receive mail here")
        assert s.rcpt("alice@example.test")[0] == 250
        code, _ = s.data(b"Subject: filtered\r\n\r\nhello world\r\nDROPME please\r\n.a dotted line\r\n")  # smtplib dot-stuffs it
        assert code == 250
    msg = body_of(tmp_path, "alice")
    headers, _, body = msg.partition("\n\n")
    lines = headers.splitlines()
    received = next(i for i, ln in enumerate(lines) if ln.startswith("Received:"))
    assert "X-Filtered-By: python" in lines[received + 1:]   # added after the Received field
    assert body == "HELLO world\n.a dotted line\n"              # rewritten, dropped, dots intact
    log = d.log_since_start()
    assert 'TO:<bob@example.test>" result="550 5.7.1 bob may not receive mail here"' in log
    d.wait_log("warn: filter py: report tx-commit")              # report events reach it
    # its stderr is logged, escaped; it does not run as root
    line = next(ln for ln in log.splitlines() if "warn: filter py: started uid=" in ln)
    assert "\x1b" not in line and "\\^[[31m" in line
    uid = int(line.split("uid=")[1].split()[0])
    assert uid != 0
    if os.geteuid() == 0:
        assert uid == pwd.getpwnam("_smtpd").pw_uid
    st = stats(d)
    assert st["filter.py.running"] == "1" and int(st["filter.py.requests"]) >= 2
    assert st["filter.py.reject"] == "1" and st["filter.py.proceed"] == "1"
    assert "Filter py running" in d.smtpctl("show", "status").stdout.splitlines()


def test_shell_filter_junks_and_disconnects(make_daemon, tmp_path, scripts):
    port = free_port()
    d = make_daemon(filtered_config(tmp_path, port, f'filter sh proc-exec "/bin/sh {scripts}/shfilter.sh"\n',
                                    "sh")).start()
    d.wait_log("info: filter sh: ready")
    send(port, "ham@remote.test", ["alice@example.test"], "Subject: ham\n\nham\n")
    send(port, "spammer@spam.test", ["alice@example.test"], "Subject: spam\n\nbuy\n")
    wait_for(lambda: len(maildir_messages(tmp_path / "d", "alice")) == 2, 20, "two messages")
    by_subject = {("spam" if "Subject: spam" in m.decode() else "ham"): m.decode()
                  for m in maildir_messages(tmp_path / "d", "alice")}
    spam_headers = by_subject["spam"].partition("\n\n")[0].splitlines()
    assert "X-Spam: Yes" in spam_headers
    assert spam_headers.index("X-Spam: Yes") < next(i for i, h in enumerate(spam_headers) if h.startswith("Received:"))
    assert "X-Spam" not in by_subject["ham"]
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        code, text = s.ehlo("evil.test")
        assert (code, text) == (554, b"5.7.1 go away, evil")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            s.noop()
    send(port, "ham@remote.test", ["alice@example.test"])        # still serving


def failing_daemon(make_daemon, tmp_path, scripts, port, extra: str = ""):
    text = filtered_config(tmp_path, port, f'filter py proc-exec "{PYTHON} {scripts}/pyfilter.py"\n', "py",
                           extra="smtp limit filter-timeout 3s\n" + extra)
    d = make_daemon(text).start()
    d.wait_log("info: filter py: ready")
    return d


@pytest.mark.parametrize("how, cause", [
    ("crash", "exited"), ("hang", "no answer in 3s"), ("garbage", "protocol error"),
])
def test_failing_filter_gives_4xx_keeps_what_was_committed_and_is_restarted(
        make_daemon, tmp_path, scripts, how, cause):
    port = free_port()
    d = failing_daemon(make_daemon, tmp_path, scripts, port)
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo("client.test")
        # a message committed before the failure stays queued and is delivered
        s.mail("a@remote.test")
        assert s.rcpt("alice@example.test")[0] == 250
        assert s.data(b"Subject: before\r\n\r\nbefore the failure\r\n")[0] == 250
        s.mail("a@remote.test")
        code, text = s.rcpt(f"{how}@example.test")
        assert (code, text) == (451, b"4.3.0 Temporary failure"), (code, text)
    if how == "hang":
        assert time.monotonic() - started >= 2.5
    assert "before the failure" in body_of(tmp_path, "alice")
    log = d.wait_log("info: filter py: ready", 30)
    assert f"warn: filter py: {cause}" in log and "restarting it" in log
    wait_for(lambda: d.log_since_start().count("info: filter py: ready") >= 2, 30, "the filter back")
    send(port, "a@remote.test", ["alice@example.test"], "Subject: after\n\nafter the restart\n")
    wait_for(lambda: any(b"after the restart" in m for m in maildir_messages(tmp_path / "d", "alice")),
             20, "mail after the restart")
    st = stats(d)
    assert int(st["filter.py.restarts"]) >= 1 and int(st["filter.py.failures"]) >= 1
    assert d.proc.poll() is None


def test_filter_that_never_registers_gives_421_and_the_daemon_serves_the_others(make_daemon, tmp_path, scripts):
    port, other = free_port(), free_port()
    (scripts / "mute.sh").write_text("#!/bin/sh\nexec sleep 3600\n")
    os.chmod(scripts / "mute.sh", 0o755)
    text = filtered_config(tmp_path, port, f'filter mute proc-exec "/bin/sh {scripts}/mute.sh"\n', "mute",
                           extra=f"smtp limit filter-timeout 2s\nlisten on 127.0.0.1 port {other}")
    d = make_daemon(text).start()
    with smtplib.SMTP("127.0.0.1", other, timeout=30) as s:     # an unfiltered listener serves
        assert s.ehlo("x")[0] == 250
    with pytest.raises(smtplib.SMTPConnectError) as err:
        smtplib.SMTP("127.0.0.1", port, timeout=30)
    assert err.value.smtp_code == 421
    log = d.log_since_start()
    assert "warn: filter: not ready after start: mute" in log
    assert "Filter mute starting" in d.smtpctl("show", "status").stdout.splitlines()


# Registers every report event and echoes each line to stderr (so to the log); rewrites
# the sender at mail-from.
REPORTER = r'''
import sys
def out(line):
    sys.stdout.write(line + "\n"); sys.stdout.flush()
for line in sys.stdin:
    line = line.rstrip("\n")
    if line == "config|ready":
        out("register|report|smtp-in|*")
        out("register|filter|smtp-in|mail-from")
        out("register|ready")
    elif line.startswith("report|"):
        sys.stderr.write(line + "\n"); sys.stderr.flush()
    elif line.startswith("filter|"):
        f = line.split("|")
        out("filter-result|%s|%s|rewrite|<rewritten@remote.test>" % (f[5], f[6]))
'''


@pytest.mark.parametrize("version", ["0.7", "0.6", "0.5"])
def test_builtin_and_proc_filters_in_a_chain_with_every_report_event(make_daemon, tmp_path, scripts, version):
    (scripts / "reporter.py").write_text(REPORTER)
    port = free_port()
    filters = ('filter closed phase rcpt-to match rcpt-to { "carol@example.test" } reject "550 5.7.1 carol is closed"\n'
               f'filter rep proc-exec "{PYTHON} {scripts}/reporter.py" protocol {version}\n'
               "filter both chain { closed, rep }\n")
    d = make_daemon(filtered_config(tmp_path, port, filters, "both")).start()
    d.wait_log("info: filter rep: ready")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.mail("original@remote.test")[0] == 250
        assert s.rcpt("carol@example.test") == (550, b"5.7.1 carol is closed")
        assert s.rcpt("alice@example.test")[0] == 250
        assert s.data(b"Subject: chain\r\n\r\nhi\r\n")[0] == 250
    msg = body_of(tmp_path, "alice")
    assert msg.startswith("Return-Path: <rewritten@remote.test>\n")
    log = d.wait_log("|link-disconnect|")
    reports = [ln.split("warn: filter rep: ", 1)[1] for ln in log.splitlines() if "warn: filter rep: report|" in ln]
    events = {r.split("|")[4]: r.split("|")[5:] for r in reports}
    sid = events["link-connect"][0]
    assert all(r.startswith(f"report|{version}|") and r.split("|")[3] == "smtp-in" for r in reports)
    host = log.split("smtp connected address=127.0.0.1 host=", 1)[1].split()[0]
    assert events["link-connect"][1] == host
    # 127.0.0.1 is localhost in /etc/hosts, which gives it back: pass; no name at all: fail
    assert events["link-connect"][2] == {"localhost": "pass", "<unknown>": "fail"}[host]
    assert events["link-connect"][3].startswith("127.0.0.1:") and events["link-connect"][4] == f"127.0.0.1:{port}"
    assert events["link-identify"] == [sid, "EHLO", "client.test"]
    msgid = events["tx-begin"][1]
    assert events["tx-mail"] == [sid, msgid, "ok", "rewritten@remote.test"]
    rcpts = [r.split("|")[6:] for r in reports if r.split("|")[4] == "tx-rcpt"]
    assert rcpts == [[msgid, "permfail", "carol@example.test"], [msgid, "ok", "alice@example.test"]]
    assert events["tx-envelope"][1] == msgid and len(events["tx-envelope"][2]) == 16
    assert events["tx-data"] == [sid, msgid, "ok"]
    assert events["tx-commit"][:2] == [sid, msgid] and int(events["tx-commit"][2]) > 0
    assert ["protocol-client", "ehlo client.test"] in [r.split("|")[4:7:2] for r in reports]   # as smtplib sent it
    assert any(r.split("|")[4] == "protocol-server" and r.endswith("|250 2.0.0 Ok") for r in reports)
    responses = [r.split("|")[6:] for r in reports if r.split("|")[4] == "filter-response"]
    assert responses == [["mail-from", "rewrite", "<rewritten@remote.test>"],
                         ["rcpt-to", "reject", "550 5.7.1 carol is closed"], ["rcpt-to", "proceed"]]
    assert events["link-disconnect"] == [sid]


def test_a_refused_message_still_ends_the_data_line_stream(make_daemon, tmp_path, scripts):
    """Too big for max-message-size: 554, and the filter still gets its final dot, so it
    is not taken for hung (filter-timeout 3s) and the next message goes through it."""
    port = free_port()
    d = failing_daemon(make_daemon, tmp_path, scripts, port, extra="smtp max-message-size 4k")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("a@remote.test")
        s.rcpt("alice@example.test")
        code, _ = s.data(b"Subject: big\r\n\r\n" + b"x" * 100 + b"\r\n" * 200 + b"y" * 8000 + b"\r\n")
        assert code == 554
        time.sleep(4.5)                     # past the filter timeout
        s.mail("a@remote.test")
        s.rcpt("alice@example.test")
        assert s.data(b"Subject: small\r\n\r\nhello\r\n")[0] == 250
    assert "HELLO" in body_of(tmp_path, "alice")
    assert "restarting it" not in d.log_since_start()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start the daemon as another user")
def test_filters_in_unprivileged_mode_run_as_the_daemons_user(scripts):
    """Started by a normal user (nobody), the filter runs as that user and works the same."""
    def make_config(base, port):
        text = config(base / "mail", port)
        return (f'filter py proc-exec "{PYTHON} {scripts}/pyfilter.py"\n'
                + text.replace(f"port {port}\n", f"port {port} filter py\n"))
    with unprivileged_daemon(make_config) as (d, base, port):
        d.wait_log("info: filter py: ready")
        send(port, "a@remote.test", ["alice@example.test"], "Subject: unpriv\n\nhello\n")
        wait_for(lambda: maildir_messages(base / "mail", "alice"), 20, "delivery")
        msg = maildir_messages(base / "mail", "alice")[0].decode()
        assert "X-Filtered-By: python" in msg and "HELLO" in msg
        uid = pwd.getpwnam("nobody").pw_uid
        assert f"warn: filter py: started uid={uid} " in d.log_since_start()
