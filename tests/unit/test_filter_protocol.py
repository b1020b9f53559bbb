"""The smtpd-filters(7) protocol, sans I/O (smtpd/lka_filter.py): line formats byte for
byte as OpenSMTPD's lka_filter.c writes them, parsing of what filters write, chains,
tokens, data lines, failures."""
from __future__ import annotations

import pytest

from smtpd.config import Config, Filter, FilterCheck, FilterProc
from smtpd.lka_filter import (
    DataOut, Decision, Engine, Facts, FilterDataline, FilterResult, ProtocolError, Register,
    RegisterReady, ReportLine, Write, checked_reply, filter_line, handshake, parse_output,
    report_line, stuff, timestamp, unstuff,
)

SID = 0x7641df9771b4ed00


def test_handshake_as_lka_proc_config():
    assert handshake("0.7", "7.8.0", 300, "mx.example.org") == [
        "config|smtpd-version|7.8.0", "config|protocol|0.7", "config|smtp-session-timeout|300",
        "config|subsystem|smtp-in", "config|admd|mx.example.org", "config|ready"]
    # 0.6 (OpenSMTPD 6.7-7.3) had neither the protocol nor the admd line
    assert handshake("0.6", "6.8.0", 300, "x") == [
        "config|smtpd-version|6.8.0", "config|smtp-session-timeout|300", "config|subsystem|smtp-in",
        "config|ready"]


def test_timestamp_is_seconds_dot_six_digit_microseconds():
    assert timestamp(1576146008.006099) == "1576146008.006099"
    assert timestamp(1576146008.0) == "1576146008.000000"


def test_report_lines_byte_for_byte():
    # smtpd-filters(7)'s own example
    assert report_line("0.7", 1576146008.006099, "link-connect", SID,
                       ("mail.openbsd.org", "pass", "199.185.178.25:33174", "45.77.67.80:25")) == (
        "report|0.7|1576146008.006099|smtp-in|link-connect|7641df9771b4ed00|mail.openbsd.org|pass|"
        "199.185.178.25:33174|45.77.67.80:25")
    # an event without parameters has no trailing separator
    assert report_line("0.7", 1.5, "link-disconnect", SID, ()) == (
        "report|0.7|1.500000|smtp-in|link-disconnect|7641df9771b4ed00")
    # link-auth: result first since 0.7, user first before
    assert report_line("0.7", 1.0, "link-auth", SID, ("pass", "joe")).endswith("|link-auth|7641df9771b4ed00|pass|joe")
    assert report_line("0.6", 1.0, "link-auth", SID, ("pass", "joe")).endswith("|link-auth|7641df9771b4ed00|joe|pass")
    assert report_line("0.5", 1.0, "tx-mail", SID, ("0000002a", "ok", "a@b")).startswith("report|0.5|")


def test_filter_lines_byte_for_byte():
    assert filter_line("0.7", 1576146008.006099, "connect", SID, 0x1ef1c203cc576e5d, "199.185.178.25",
                       rdns="mail.openbsd.org") == (
        "filter|0.7|1576146008.006099|smtp-in|connect|7641df9771b4ed00|1ef1c203cc576e5d|"
        "mail.openbsd.org|199.185.178.25")
    assert filter_line("0.7", 2.0, "data-line", SID, 1, "a | b") == (
        "filter|0.7|2.000000|smtp-in|data-line|7641df9771b4ed00|0000000000000001|a | b")


def test_parse_what_filters_write():
    assert parse_output("register|ready") == RegisterReady()
    assert parse_output("register|filter|smtp-in|rcpt-to") == Register("filter", "smtp-in", "rcpt-to")
    assert parse_output("register|report|smtp-in|*") == Register("report", "smtp-in", "*")
    assert parse_output("filter-result|7641df9771b4ed00|1ef1c203cc576e5d|proceed") == FilterResult(
        SID, 0x1ef1c203cc576e5d, "proceed", None)
    # the last field may hold "|"
    assert parse_output("filter-result|1|2|reject|550 no | never") == FilterResult(1, 2, "reject", "550 no | never")
    assert parse_output("filter-dataline|1|2|a|b") == FilterDataline(1, 2, "a|b")
    assert parse_output("filter-dataline|1|2|") == FilterDataline(1, 2, "")
    assert parse_output("report|0.7|1576146008.006099|smtp-in|filter-report|1|hello") == ReportLine(
        1, "filter-report|hello", 1576146008.006099)


@pytest.mark.parametrize("line", [
    "", "hello", "register|filter|smtp-in|nosuchphase", "register|report|smtp-in|nosuchevent",
    "register|filter|smtp-out|connect", "filter-result|zz|2|proceed", "filter-result|1|proceed",
    "filter-result|1|2|maybe", "filter-result|1|2|reject", "filter-result|1|2|proceed|extra",
    "filter-result|11112222333344445|2|proceed", "report|0.7|12|smtp-in|x|1|y",
])
def test_garbage_is_a_protocol_error(line):
    with pytest.raises(ProtocolError):
        parse_output(line)


def test_reject_texts_are_checked_as_smtp_session_does():
    assert checked_reply("reject", "550 5.7.1 no") == ("reject", "550 5.7.1 no")
    # never a 2xx; the 421 that replaces it disconnects, as any 421
    assert checked_reply("reject", "250 fine") == ("disconnect", "421 Internal server error")
    assert checked_reply("reject", "55 x") == ("disconnect", "421 Internal server error")
    assert checked_reply("reject", "421 4.7.0 go away") == ("disconnect", "421 4.7.0 go away")
    assert checked_reply("disconnect", "554 bye") == ("disconnect", "554 bye")


def test_dot_stuffing_both_ways():
    assert stuff([b".hidden", b"plain", b".", b"caf\xc3\xa9 \xff"]) == ["..hidden", "plain", "..", "café \udcff"]
    assert unstuff(["..hidden", "plain", "café \udcff"]) == b".hidden\nplain\ncaf\xc3\xa9 \xff\n"


# --- the engine ---------------------------------------------------------------------------

def config_with(*filters: Filter, procs=("a", "b")) -> Config:
    c = Config(file="x", hostname="mx.test")
    for p in procs:
        c.filter_procs[p] = FilterProc(name=p, command="x")
    for f in filters:
        c.filters[f.name] = f
    return c


def ready(engine: Engine, proc: str, *lines: str) -> None:
    for line in lines:
        engine.receive(proc, line)
    engine.receive(proc, "register|ready")


def writes(out, proc=None):
    return [w.line for w in out if isinstance(w, Write) and (proc is None or w.proc == proc)]


def token_of(line: str) -> str:
    return line.split("|")[6]


def chain_engine(builtin=None, extra=()):
    c = config_with(Filter("fa", "proc", proc="a"), Filter("fb", "proc", proc="b"), *extra,
                    Filter("ch", "chain", chain=["fa", "fb", *[f.name for f in extra]]))
    e = Engine(c, builtin)
    ready(e, "a", "register|filter|smtp-in|rcpt-to", "register|filter|smtp-in|data-line",
          "register|report|smtp-in|tx-rcpt")
    ready(e, "b", "register|filter|smtp-in|rcpt-to", "register|report|smtp-in|*")
    e.begin(SID, "ch", Facts(rdns="r.test", src="192.0.2.1:1", dest="192.0.2.2:25"))
    return e


def test_chain_asks_each_filter_in_turn_and_proceeds():
    e = chain_engine()
    assert e.registered("ch") == ({"rcpt-to", "data-line"}, set(e.procs["b"].events))
    e.protocol(SID, 10.0, "rcpt-to", "joe@x.test")
    out = e.take_output()
    [line] = writes(out, "a")
    assert line.startswith("filter|0.7|10.000000|smtp-in|rcpt-to|7641df9771b4ed00|") and line.endswith("|joe@x.test")
    e.receive("a", f"filter-result|{SID:016x}|{token_of(line)}|proceed")
    [line_b] = writes(e.take_output(), "b")
    assert token_of(line_b) != token_of(line)
    e.receive("b", f"filter-result|{SID:016x}|{token_of(line_b)}|proceed")
    assert e.take_output() == [Decision(SID, "rcpt-to", "proceed", None, [])]


def test_reject_stops_the_chain_and_a_2xx_is_never_sent():
    e = chain_engine()
    e.protocol(SID, 1.0, "rcpt-to", "joe@x.test")
    [line] = writes(e.take_output())
    e.receive("a", f"filter-result|{SID:016x}|{token_of(line)}|reject|250 sure")
    assert e.take_output() == [Decision(SID, "rcpt-to", "disconnect", "421 Internal server error", [])]


def test_a_wrong_token_or_another_filters_answer_is_a_protocol_error():
    e = chain_engine()
    e.protocol(SID, 1.0, "rcpt-to", "joe@x.test")
    [line] = writes(e.take_output())
    with pytest.raises(ProtocolError):
        e.receive("a", f"filter-result|{SID:016x}|{int(token_of(line), 16) ^ 1:016x}|proceed")
    with pytest.raises(ProtocolError):
        e.receive("b", f"filter-result|{SID:016x}|{token_of(line)}|proceed")
    with pytest.raises(ProtocolError):      # data-line answer outside the data phase
        e.receive("a", f"filter-dataline|{SID:016x}|{token_of(line)}|x")


def test_an_answer_for_an_ended_session_is_ignored():
    e = chain_engine()
    e.protocol(SID, 1.0, "rcpt-to", "joe@x.test")
    [line] = writes(e.take_output())
    e.end(SID)
    e.receive("a", f"filter-result|{SID:016x}|{token_of(line)}|proceed")
    assert e.take_output() == []


def test_reports_go_only_to_registered_processes_of_the_session():
    e = chain_engine()
    e.report(SID, 5.0, "tx-rcpt", ("0000002a", "ok", "joe@x.test"))
    out = e.take_output()
    assert writes(out, "a") == writes(out, "b") == [
        "report|0.7|5.000000|smtp-in|tx-rcpt|7641df9771b4ed00|0000002a|ok|joe@x.test"]
    e.report(SID, 5.0, "link-greeting", ("mx.test",))
    out = e.take_output()
    assert writes(out, "a") == [] and len(writes(out, "b")) == 1
    e.report(0x1234, 5.0, "link-greeting", ("mx.test",))       # not a filtered session
    assert e.take_output() == []


def test_report_written_by_a_filter_is_forwarded_as_filter_report():
    e = chain_engine()
    e.receive("a", f"report|0.7|1576146008.006099|smtp-in|filter-report|{SID:016x}|spam score 5")
    [line] = writes(e.take_output(), "b")
    assert line.split("|")[4:] == ["filter-report", f"{SID:016x}", "proc", "a", "filter-report", "spam score 5"]


def test_data_lines_stream_through_the_chain_and_may_be_rewritten_added_or_dropped():
    e = chain_engine()
    assert e.data_begin(SID)
    e.data(SID, 1.0, ["Subject: x", "", "..dot", "."])
    lines = "\n".join(writes(e.take_output(), "a")).split("\n")       # one write for the batch
    assert [ln.split("|", 7)[7] for ln in lines] == ["Subject: x", "", "..dot", "."]
    tok = token_of(lines[0])
    for text in ("X-Added: 1", "Subject: x", "", "."):       # ..dot dropped, a header added
        e.receive("a", f"filter-dataline|{SID:016x}|{tok}|{text}")
    out = e.take_output()
    assert [o for o in out if isinstance(o, DataOut)] == [    # gathered: one per read batch
        DataOut(SID, ["X-Added: 1", "Subject: x", "", "."], done=True)]
    with pytest.raises(ProtocolError):          # a filter-result in the data-line phase
        e.receive("a", f"filter-result|{SID:016x}|{tok}|proceed")


def test_a_lost_process_fails_the_waiting_session_and_the_others_later():
    e = chain_engine()
    other = 0x99
    e.begin(other, "ch", Facts())
    e.protocol(SID, 1.0, "rcpt-to", "joe@x.test")
    e.take_output()
    e.proc_lost("a")
    assert e.take_output() == [Decision(SID, "rcpt-to", "tempfail")]
    e.protocol(other, 1.0, "rcpt-to", "joe@x.test")
    assert e.take_output() == [Decision(other, "rcpt-to", "tempfail")]
    # a restarted process serves new sessions once it has registered again
    e.proc_started("a", 2)
    assert e.begin(0x77, "ch", Facts()).broken
    ready(e, "a", "register|filter|smtp-in|rcpt-to")
    assert not e.begin(0x78, "ch", Facts()).broken


def test_data_stream_fails_when_its_process_is_lost():
    e = chain_engine()
    e.data_begin(SID)
    e.data(SID, 1.0, ["a"])
    e.take_output()
    e.proc_lost("a")
    assert e.take_output() == [DataOut(SID, [], done=True, failed=True)]


def test_messages_before_register_ready_or_registers_after_are_errors():
    c = config_with(Filter("fa", "proc", proc="a"))
    e = Engine(c)
    with pytest.raises(ProtocolError):
        e.receive("a", "filter-result|1|2|proceed")
    e.receive("a", "register|ready")
    with pytest.raises(ProtocolError):
        e.receive("a", "register|filter|smtp-in|helo")


def test_junk_at_commit_is_refused():
    e = chain_engine()
    e.procs["a"].phases.add("commit")
    e.protocol(SID, 1.0, "commit", "")
    [line] = writes(e.take_output())
    with pytest.raises(ProtocolError):
        e.receive("a", f"filter-result|{SID:016x}|{token_of(line)}|junk")


def test_builtin_filters_are_asked_through_the_evaluate_call():
    seen = []

    def evaluate(spec, phase, facts, param):
        seen.append((spec.name, phase, facts.rdns, param))
        return True
    rej = Filter("norc", "builtin", phase="rcpt-to", check=FilterCheck("rdns"), action="reject",
                 action_text="550 no rDNS")
    c = config_with(rej, Filter("ch", "chain", chain=["norc"]), procs=())
    e = Engine(c, evaluate)
    e.begin(SID, "ch", Facts(rdns="r.test"))
    e.protocol(SID, 1.0, "helo", "x")           # not its phase
    assert e.take_output() == [Decision(SID, "helo", "proceed", None, [])]
    e.protocol(SID, 1.0, "rcpt-to", "joe@x.test")
    assert e.take_output() == [Decision(SID, "rcpt-to", "reject", "550 no rDNS", [])]
    assert seen == [("norc", "rcpt-to", "r.test", "joe@x.test")]


def test_data_lines_echoed_with_other_hex_case_take_the_parsing_path():
    e = chain_engine()
    e.data_begin(SID)
    e.data(SID, 1.0, ["a", "."])
    tok = token_of(writes(e.take_output(), "a")[0].split("\n")[0])
    e.receive("a", f"filter-dataline|{SID:016X}|{tok.upper()}|a")
    e.receive("a", f"filter-dataline|{SID:016x}|{tok}|.")
    assert [o for o in e.take_output() if isinstance(o, DataOut)] == [DataOut(SID, ["a", "."], done=True)]


def test_fcrdns_word_of_the_link_connect_report():
    """smtp_session.c's forward confirmation as lka_filter.c words it, with OpenSMTPD's
    resolver's errors: pass; fail (no such name, no address, none is the client's, and a
    lookup that failed: libasr folds SERVFAIL and timeouts into EAI_NODATA); error (a name
    that cannot be asked about, a failure of the system itself)."""
    import asyncio
    import socket

    from smtpd.filter_proc import fcrdns_result

    def entry(addr):
        return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, 0))
    assert fcrdns_result("192.0.2.1", [entry("192.0.2.9"), entry("192.0.2.1")]) == "pass"
    assert fcrdns_result("192.0.2.1", [entry("192.0.2.9")]) == "fail"
    assert fcrdns_result("192.0.2.1", []) == "fail"
    for code in (socket.EAI_NONAME, socket.EAI_NODATA, socket.EAI_AGAIN, socket.EAI_FAIL):
        assert fcrdns_result("192.0.2.1", socket.gaierror(code, "lookup failed")) == "fail", code
    assert fcrdns_result("192.0.2.1", asyncio.TimeoutError()) == "fail"
    assert fcrdns_result("192.0.2.1", socket.gaierror(socket.EAI_SYSTEM, "System error")) == "error"
    assert fcrdns_result("192.0.2.1", socket.gaierror(socket.EAI_MEMORY, "Memory allocation failure")) == "error"
    assert fcrdns_result("192.0.2.1", UnicodeError("label too long")) == "error"


def test_forward_confirmation_of_local_and_nameless_clients():
    """Without DNS: a local client passes (OpenSMTPD's local enqueue sets fcrdns); no reverse
    name fails and asks nothing; localhost, from /etc/hosts, gives back 127.0.0.1 only."""
    import asyncio

    from smtpd.filter_proc import forward_confirmed
    assert asyncio.run(forward_confirmed("localhost", "unix:local")) == "pass"
    assert asyncio.run(forward_confirmed("<unknown>", "192.0.2.1:25")) == "fail"
    assert asyncio.run(forward_confirmed("", "192.0.2.1:25")) == "fail"
    assert asyncio.run(forward_confirmed("localhost", "127.0.0.1:4242")) == "pass"
    assert asyncio.run(forward_confirmed("localhost", "192.0.2.1:4242")) == "fail"
