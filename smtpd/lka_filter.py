"""The filter protocol of smtpd-filters(7), sans I/O (OpenSMTPD's lka_filter.c).

What lka writes to a filter process (the ``config|`` handshake, ``report|`` events,
``filter|`` requests, data lines) and what it reads back (``register|``,
``filter-result|``, ``filter-dataline|``, ``report|``), byte for byte as OpenSMTPD's
lka, so that existing filters work unchanged.  Versions 0.5 to 0.7 (what a line says
in its second field); they differ, in what lka writes, only where PROTOCOL_DIFFERENCES
says.

``Engine`` keeps the state: each process's registrations, each session's chain, its
pending request (the token) and its data-line stream.  It is fed calls (``begin``,
``protocol``, ``data``, ``report``, ``receive`` with a line a process wrote) and
answers through ``take_output()``: a list of ``Write`` (a line to a process),
``Decision`` (the chain's answer to pony for one phase) and ``DataOut`` (filtered
body lines for pony).  No clock is read here: times are passed in.  The I/O half
(processes, pipes, timeouts, restarts) is smtpd/filter_proc.py.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field

PROTOCOL_VERSIONS = ("0.5", "0.6", "0.7")
DEFAULT_VERSION = "0.7"
# What lka wrote differently by version, from OpenSMTPD's lka_filter.c/lka_report.c of
# 6.7-7.3 (0.6) and 7.8 (0.7): 0.7 announces ``config|protocol|`` and ``config|admd|``,
# puts link-auth's result before the user name, and has the ``report`` decision.
PROTOCOL_DIFFERENCES = {"0.7": ("config-protocol", "link-auth-result-first", "report-decision")}

PHASES = ("connect", "helo", "ehlo", "starttls", "auth", "mail-from", "rcpt-to", "data",
          "data-line", "rset", "quit", "noop", "help", "wiz", "commit")
REPORT_EVENTS = ("link-connect", "link-disconnect", "link-greeting", "link-identify", "link-tls",
                 "link-auth", "tx-reset", "tx-begin", "tx-mail", "tx-rcpt", "tx-envelope",
                 "tx-data", "tx-commit", "tx-rollback", "protocol-client", "protocol-server",
                 "filter-report", "filter-response", "timeout")
DECISIONS = ("proceed", "junk", "reject", "disconnect", "rewrite", "report")
# filter-response's phase names (lka_report_smtp_filter_response)
RESPONSE_PHASE = {"connect": "connected", "starttls": "tls"}


class ProtocolError(Exception):
    """A line a filter should not have written: the process is restarted."""


# --- what a filter writes ---------------------------------------------------------------

@dataclass(slots=True)
class Register:
    stream: str            # "filter" | "report"
    subsystem: str         # "smtp-in" (or smtp-out for reports)
    name: str              # a phase or a report event ("*" for every event)


@dataclass(slots=True)
class RegisterReady:
    pass


@dataclass(slots=True)
class FilterResult:
    session: int
    token: int
    decision: str
    param: str | None


@dataclass(slots=True)
class FilterDataline:
    session: int
    token: int
    line: str


@dataclass(slots=True)
class ReportLine:
    """``report|VERSION|TIME|smtp-in|EVENT|SESSION|...`` written by a filter: forwarded,
    with its time, as a ``filter-report`` event (lka_report_proc)."""
    session: int
    message: str
    time: float = 0.0


def _hex(text: str, what: str, line: str) -> int:
    if not text or len(text) > 16:
        raise ProtocolError(f"invalid {what}: {line}")
    try:
        return int(text, 16)
    except ValueError:
        raise ProtocolError(f"invalid {what}: {line}") from None


def parse_output(line: str):
    """One line a filter wrote (without its newline) -> Register, RegisterReady,
    FilterResult, FilterDataline or ReportLine; ProtocolError for anything else."""
    if line == "register|ready":
        return RegisterReady()
    kind, sep, rest = line.partition("|")
    if not sep:
        raise ProtocolError(f"invalid filter message type: {line}")
    if kind == "register":
        stream, _, hook = rest.partition("|")
        subsystem, _, name = hook.partition("|")
        if stream == "filter":
            if subsystem != "smtp-in":
                raise ProtocolError(f"invalid message direction: {line}")
            if name not in PHASES:
                raise ProtocolError(f"unrecognized filter phase: {line}")
        elif stream == "report":
            if subsystem not in ("smtp-in", "smtp-out"):
                raise ProtocolError(f"invalid message direction: {line}")
            if name != "*" and name not in REPORT_EVENTS:
                raise ProtocolError(f"unrecognized report name: {line}")
        else:
            raise ProtocolError(f"invalid register line: {line}")
        return Register(stream, subsystem, name)
    if kind in ("filter-result", "filter-dataline"):
        sid, sep1, rest = rest.partition("|")
        token, sep2, response = rest.partition("|")
        if not (sep1 and sep2):
            raise ProtocolError(f"missing token: {line}")
        session, tok = _hex(sid, "reqid", line), _hex(token, "token", line)
        if kind == "filter-dataline":
            return FilterDataline(session, tok, response)
        decision, sep3, param = response.partition("|")
        if decision not in DECISIONS:
            raise ProtocolError(f"invalid directive: {line}")
        if decision in ("proceed", "junk"):
            if sep3:
                raise ProtocolError(f"unexpected parameter after {decision}: {line}")
            return FilterResult(session, tok, decision, None)
        if not sep3:
            raise ProtocolError(f"missing parameter: {line}")
        return FilterResult(session, tok, decision, param)
    if kind == "report":
        # report|VERSION|TIME|smtp-in|EVENT|SESSION|MESSAGE... (libopensmtpd's osmtpd_report)
        parts = rest.split("|", 5)
        if len(parts) < 6 or parts[2] != "smtp-in":
            raise ProtocolError(f"invalid report: {line}")
        sec, dot, usec = parts[1].partition(".")
        if not (sec.isdigit() and dot and usec.isdigit() and len(usec) == 6):
            raise ProtocolError(f"invalid report: invalid time: {line}")
        return ReportLine(_hex(parts[4], "reqid", line), f"{parts[3]}|{parts[5]}", int(sec) + int(usec) / 1e6)
    raise ProtocolError(f"invalid filter message type: {line}")


# --- what lka writes --------------------------------------------------------------------

def timestamp(now: float) -> str:
    """OpenSMTPD's ``%lld.%06ld`` of a timeval."""
    usec = int(round(now * 1_000_000))
    return f"{usec // 1_000_000}.{usec % 1_000_000:06d}"


def handshake(version: str, smtpd_version: str, session_timeout: int, admd: str,
              subsystems: tuple[str, ...] = ("smtp-in",)) -> list[str]:
    """lka_proc_config: the lines before the filter registers."""
    lines = [f"config|smtpd-version|{smtpd_version}"]
    if "config-protocol" in PROTOCOL_DIFFERENCES.get(version, ()):
        lines.append(f"config|protocol|{version}")
    lines.append(f"config|smtp-session-timeout|{session_timeout}")
    lines += [f"config|subsystem|{s}" for s in subsystems]
    if "config-protocol" in PROTOCOL_DIFFERENCES.get(version, ()):
        lines.append(f"config|admd|{admd}")
    lines.append("config|ready")
    return lines


def report_line(version: str, now: float, event: str, session: int, params: tuple[str, ...],
                subsystem: str = "smtp-in") -> str:
    """report_smtp_broadcast: ``report|V|T|smtp-in|EVENT|SESSION[|PARAMS]``."""
    if event == "link-auth" and "link-auth-result-first" not in PROTOCOL_DIFFERENCES.get(version, ()):
        params = tuple(reversed(params))        # 0.6 and before: user|result
    head = f"report|{version}|{timestamp(now)}|{subsystem}|{event}|{session:016x}"
    return head + "".join("|" + p for p in params)


def filter_line(version: str, now: float, phase: str, session: int, token: int, param: str,
                rdns: str = "") -> str:
    """filter_protocol_query / filter_data_query."""
    head = f"filter|{version}|{timestamp(now)}|smtp-in|{phase}|{session:016x}|{token:016x}|"
    return head + (f"{rdns}|{param}" if phase == "connect" else param)


def valid_reply(text: str) -> bool:
    """util.c valid_smtp_response: ``[2-5][0-9][0-9] `` and something after it."""
    return (len(text) >= 5 and text[0] in "2345" and text[1].isdigit() and text[2].isdigit()
            and text[3] == " ")


def checked_reply(decision: str, text: str) -> tuple[str, str]:
    """What smtp_session.c does with a reject/disconnect text: anything but a valid
    4xx/5xx becomes ``421 Internal server error``, and a 421 disconnects."""
    if not valid_reply(text) or text[0] not in "45":
        text = "421 Internal server error"
    if text.startswith("421"):
        decision = "disconnect"
    return decision, text


# --- the engine ---------------------------------------------------------------------------

@dataclass(slots=True)
class Write:
    """Lines to a process (more than one, newline-separated, for a batch of data lines)."""
    proc: str
    line: str


@dataclass(slots=True)
class Decision:
    """The chain's answer for one phase: proceed, junk, reject, disconnect, rewrite
    (``param`` the new parameter, or the reply text), or tempfail (a filter failed)."""
    session: int
    phase: str
    decision: str
    param: str | None = None
    reports: list[str] = field(default_factory=list)    # report texts of builtin filters


@dataclass(slots=True)
class DataOut:
    session: int
    lines: list[str]
    done: bool = False
    failed: bool = False


@dataclass
class ProcState:
    name: str
    version: str = DEFAULT_VERSION
    ready: bool = False
    phases: set[str] = field(default_factory=set)
    events: set[str] = field(default_factory=set)
    generation: int = 0


@dataclass
class Member:
    name: str
    kind: str              # "proc" | "builtin"
    proc: str | None = None
    spec: object = None    # config.Filter of a builtin


@dataclass
class Facts:
    """What builtin filters look at (lka_filter.c's struct filter_session)."""
    rdns: str = ""
    fcrdns: bool = False
    src: str = ""          # the client's address, without port ("local" for a local client)
    dest: str = ""
    helo: str = ""
    username: str | None = None
    mail_from: str | None = None


@dataclass
class FSession:
    id: int
    filter: str
    members: list[Member]
    facts: Facts
    generations: dict[str, int]
    phase: str = ""
    param: str = ""
    time: float = 0.0      # when pony asked: the time of the chain's further requests
    token: int = 0
    index: int = -1        # the chain entry the pending request is at
    entries: list[Member] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)
    data_tokens: list[int] = field(default_factory=list)
    data_entries: list[Member] = field(default_factory=list)
    data_done: bool = False
    broken: bool = False


class Engine:
    """Every filter session of lka (see the module docstring)."""

    def __init__(self, config, builtin=None) -> None:
        self.config = config
        self.builtin = builtin          # (spec, phase, facts, param) -> matched: smtpd/filter_builtin.py
        self.procs: dict[str, ProcState] = {
            name: ProcState(name, p.protocol)
            for name, p in config.filter_procs.items()}
        self.sessions: dict[int, FSession] = {}
        self._out: list = []
        # filter-dataline lines read, per (session, next chain index): fed on in one batch
        self._lines_read: dict[tuple[int, int], list[str]] = {}
        # "SESSION|TOKEN|" of each data-line stream -> (session, next chain index, process)
        self._streams: dict[str, tuple[int, int, str]] = {}

    def take_output(self) -> list:
        if self._lines_read:
            batches, self._lines_read = self._lines_read, {}
            for (sid, index), lines in batches.items():
                fs = self.sessions.get(sid)
                if fs is not None and not fs.data_done:
                    self._feed(fs, fs.time, index, lines)
        out, self._out = self._out, []
        return out

    # -- processes ----------------------------------------------------------------------

    def proc_started(self, name: str, generation: int) -> None:
        """A (new) process of ``name`` runs: it registers again from scratch."""
        state = self.procs[name]
        state.ready, state.phases, state.events, state.generation = False, set(), set(), generation

    def proc_lost(self, name: str) -> None:
        """The process is gone (crashed, killed after a hang or garbage): every session it
        serves fails, now if waiting on it, at its next phase otherwise."""
        state = self.procs[name]
        state.ready = False
        for fs in list(self.sessions.values()):
            if name not in fs.generations:
                continue
            fs.broken = True
            self._fail_pending(fs)

    def _fail_pending(self, fs: FSession) -> None:
        if fs.phase == "data-line" and not fs.data_done:
            fs.data_done = True
            self._out.append(DataOut(fs.id, [], done=True, failed=True))
        elif fs.phase and fs.phase != "data-line" and fs.index >= 0:
            fs.index = -1
            self._out.append(Decision(fs.id, fs.phase, "tempfail"))

    def receive(self, proc: str, line: str) -> None:
        """A line ``proc`` wrote; ProtocolError if it is not one it may write now."""
        if line.startswith("filter-dataline|"):
            # the hot path (a message's every line): "SESSION|TOKEN|" exactly as we wrote it
            stream = self._streams.get(line[16:50])
            if stream is not None and stream[2] == proc:
                fs = self.sessions.get(stream[0])
                if fs is not None and fs.phase == "data-line" and not fs.data_done:
                    key = (stream[0], stream[1])
                    batch = self._lines_read.get(key)
                    if batch is None:
                        self._lines_read[key] = [line[50:]]
                    else:
                        batch.append(line[50:])
                    return
        msg = parse_output(line)
        state = self.procs[proc]
        if isinstance(msg, RegisterReady):
            state.ready = True
            return
        if isinstance(msg, Register):
            if state.ready:
                raise ProtocolError(f"register after register|ready: {line}")
            if msg.stream == "filter":
                state.phases.add(msg.name)
            elif msg.subsystem == "smtp-in":
                state.events.update(REPORT_EVENTS if msg.name == "*" else (msg.name,))
            return
        if not state.ready:
            raise ProtocolError(f"non-register message before register|ready: {line}")
        if isinstance(msg, ReportLine):
            fs = self.sessions.get(msg.session)
            if fs is not None:
                self._report_filter(fs, msg.time, "proc", proc, msg.message)
            return
        fs = self.sessions.get(msg.session)
        if fs is None:
            return                       # the session ended meanwhile (lka: "can legitimately disappear")
        if isinstance(msg, FilterDataline):
            self._dataline_from(fs, proc, msg)
            return
        self._result_from(fs, proc, msg)

    # -- sessions -----------------------------------------------------------------------

    def members(self, filter_name: str) -> list[Member]:
        flt = self.config.filters[filter_name]
        specs = [self.config.filters[m] for m in flt.chain] if flt.kind == "chain" else [flt]
        return [Member(s.name, s.kind, s.proc, s if s.kind == "builtin" else None) for s in specs]

    def begin(self, session: int, filter_name: str, facts: Facts) -> FSession:
        members = self.members(filter_name)
        gens = {m.proc: self.procs[m.proc].generation for m in members if m.proc}
        fs = FSession(session, filter_name, members, facts, gens)
        fs.broken = any(not self.procs[p].ready for p in gens)
        self.sessions[session] = fs
        return fs

    def end(self, session: int) -> None:
        fs = self.sessions.pop(session, None)
        if fs is not None:
            self._forget_streams(fs)

    def _forget_streams(self, fs: FSession) -> None:
        for token in fs.data_tokens:
            self._streams.pop(f"{fs.id:016x}|{token:016x}|", None)

    def registered(self, filter_name: str) -> tuple[set[str], set[str]]:
        """(phases, report events) the chain of ``filter_name`` asks for: pony skips the
        others (no round trip for a phase no filter looks at)."""
        phases: set[str] = set()
        events: set[str] = set()
        for m in self.members(filter_name):
            if m.kind == "builtin":
                phases.add(m.spec.phase)
            elif m.proc:
                st = self.procs[m.proc]
                phases |= st.phases
                events |= st.events
        return phases, events

    def _entries(self, fs: FSession, phase: str) -> list[Member]:
        out = []
        for m in fs.members:
            if m.kind == "builtin":
                if m.spec.phase == phase:
                    out.append(m)
            elif phase in self.procs[m.proc].phases:
                out.append(m)
        return out

    # -- reports ------------------------------------------------------------------------

    def report(self, session: int, now: float, event: str, params: tuple[str, ...]) -> None:
        fs = self.sessions.get(session)
        if fs is None:
            return
        if event == "link-auth" and params[0] == "pass":
            fs.facts.username = params[1]
        elif event == "link-identify":
            fs.facts.helo = params[1]
        self._broadcast(fs, now, event, params)

    def _broadcast(self, fs: FSession, now: float, event: str, params: tuple[str, ...]) -> None:
        for proc in fs.generations:
            st = self.procs[proc]
            if event in st.events and st.ready and st.generation == fs.generations[proc]:
                self._out.append(Write(proc, report_line(st.version, now, event, fs.id, params)))

    def _report_filter(self, fs: FSession, now: float, kind: str, name: str, message: str) -> None:
        self._broadcast(fs, now, "filter-report", (kind, name, message))

    # -- filter requests ----------------------------------------------------------------

    def protocol(self, session: int, now: float, phase: str, param: str) -> None:
        """pony asks the chain about ``phase``; a Decision comes out, now or once the
        filters have answered."""
        fs = self.sessions.get(session)
        if fs is None:
            self._out.append(Decision(session, phase, "tempfail"))
            return
        if fs.broken:
            self._out.append(Decision(session, phase, "tempfail"))
            return
        if phase in ("helo", "ehlo"):
            fs.facts.helo = param
        elif phase == "mail-from":
            fs.facts.mail_from = param
        fs.phase, fs.param, fs.reports, fs.time = phase, param, [], now
        fs.entries = self._entries(fs, phase)
        self._next(fs, now, 0)

    def _next(self, fs: FSession, now: float, index: int) -> None:
        while index < len(fs.entries):
            m = fs.entries[index]
            if m.kind == "proc":
                st = self.procs[m.proc]
                fs.index = index
                fs.token = secrets.randbits(64) or 1
                self._out.append(Write(m.proc, filter_line(
                    st.version, now, fs.phase, fs.id, fs.token, fs.param, fs.facts.rdns)))
                return
            spec = m.spec
            matched = bool(self.builtin(spec, fs.phase, fs.facts, fs.param)) if self.builtin else False
            if matched:
                if spec.action in ("rewrite", "disconnect", "reject", "junk"):
                    self._decide(fs, spec.action, spec.action_text or None)
                    return
                if spec.action == "report":
                    fs.reports.append(spec.action_text)
                    self._report_filter(fs, now, "builtin", spec.name, spec.action_text)
                elif spec.action == "bypass":
                    self._decide(fs, "proceed", None)
                    return
            index += 1
        self._decide(fs, "proceed", None)

    def _decide(self, fs: FSession, decision: str, param: str | None) -> None:
        if decision in ("reject", "disconnect"):
            decision, param = checked_reply(decision, param or "")
        fs.index = -1
        self._out.append(Decision(fs.id, fs.phase, decision, param, fs.reports))

    def _result_from(self, fs: FSession, proc: str, msg: FilterResult) -> None:
        if fs.phase == "data-line":
            raise ProtocolError("filter-result in data-line phase")
        if fs.index < 0 or msg.token != fs.token or fs.entries[fs.index].proc != proc:
            raise ProtocolError(f"misbehaving filter: no request {msg.token:016x} pending")
        if msg.decision == "junk" and fs.phase == "commit":
            raise ProtocolError("filter-result junk after DATA")
        if msg.decision == "proceed":
            self._next(fs, fs.time, fs.index + 1)
        elif msg.decision == "report":
            self._report_filter(fs, fs.time, "proc", proc, msg.param or "")
            self._next(fs, fs.time, fs.index + 1)
        else:
            self._decide(fs, msg.decision, msg.param)

    # -- data lines ----------------------------------------------------------------------

    def data_begin(self, session: int) -> bool:
        """Start a message's data-line stream; False when no filter of the chain wants
        data lines (pony then writes the body to the queue itself)."""
        fs = self.sessions.get(session)
        if fs is None:
            return False
        fs.data_entries = self._entries(fs, "data-line")
        fs.data_entries = [m for m in fs.data_entries if m.kind == "proc"]
        self._forget_streams(fs)
        fs.data_tokens = [secrets.randbits(64) or 1 for _ in fs.data_entries]
        for index, (m, token) in enumerate(zip(fs.data_entries, fs.data_tokens)):
            self._streams[f"{fs.id:016x}|{token:016x}|"] = (fs.id, index + 1, m.proc)
        fs.phase, fs.index, fs.data_done = "data-line", -1, False
        if fs.broken:
            fs.data_done = True
            self._out.append(DataOut(fs.id, [], done=True, failed=True))
        return bool(fs.data_entries)

    def data(self, session: int, now: float, lines: list[str]) -> None:
        """Raw (dot-stuffed) body lines from pony; "." ends the message."""
        fs = self.sessions.get(session)
        if fs is None or fs.data_done:
            return
        fs.time = now
        self._feed(fs, now, 0, lines)

    def _feed(self, fs: FSession, now: float, index: int, lines: list[str]) -> None:
        if index >= len(fs.data_entries):
            done = bool(lines) and lines[-1] == "."
            if done:
                fs.data_done = True
            self._out.append(DataOut(fs.id, lines, done=done))
            return
        m = fs.data_entries[index]
        st = self.procs[m.proc]
        # one Write of many lines: one time stamp per batch (they came together)
        prefix = filter_line(st.version, now, "data-line", fs.id, fs.data_tokens[index], "")
        self._out.append(Write(m.proc, "\n".join([prefix + line for line in lines])))

    def _dataline_from(self, fs: FSession, proc: str, msg: FilterDataline) -> None:
        if fs.phase != "data-line":
            raise ProtocolError("filter-dataline out of data-line phase")
        try:
            index = fs.data_tokens.index(msg.token)
        except ValueError:
            raise ProtocolError(f"misbehaving filter: unknown token {msg.token:016x}") from None
        if fs.data_entries[index].proc != proc:
            raise ProtocolError("misbehaving filter: another filter's token")
        if fs.data_done:
            return
        batch = self._lines_read.get((fs.id, index + 1))
        if batch is None:
            self._lines_read[(fs.id, index + 1)] = [msg.line]
        else:
            batch.append(msg.line)


def stuff(body_lines: list[bytes]) -> list[str]:
    """Body lines (unstuffed, as the core hands them) to data-line parameters: the raw,
    dot-escaped DATA input of smtpd-filters(7)."""
    out = []
    for raw in body_lines:
        line = raw.decode("utf-8", "surrogateescape")
        out.append("." + line if line.startswith(".") else line)
    return out


def unstuff(lines: list[str]) -> bytes:
    """Filter output lines (dot-escaped, without the final ".") back to body bytes."""
    parts = []
    for line in lines:
        if line.startswith("."):
            line = line[1:]
        parts.append(line.encode("utf-8", "surrogateescape") + b"\n")
    return b"".join(parts)
