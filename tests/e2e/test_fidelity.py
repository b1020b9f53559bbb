"""Fidelity to OpenSMTPD: every transcript of tests/oracle/transcripts.py played against the real
OpenSMTPD (Debian's 6.8, unpacked and booted by tests/oracle/opensmtpd.py) and the real pysmtpd,
both on the same site (tests/oracle/environment.py); their replies, the connection's end and
the smtp log lines must be equal, except the differences listed with their reason in
docs/smtp-fidelity.md. A difference not listed fails; so does a listed one that is gone (the
list stays true: whoever fixes one removes its line).

Each daemon boots once for the module. Inside TLS the oracle's binary cannot answer (OpenSSL 3
breaks its handshake): that part comes from its source (tests/oracle/opensmtpd_source.py).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.oracle import opensmtpd
from tests.oracle.environment import HOSTNAME, make_site
from tests.oracle.record import record
from tests.oracle.transcripts import TRANSCRIPTS, Result, play_all

REPO = Path(__file__).resolve().parents[2]
DIFFERENCES = REPO / "docs/smtp-fidelity.md"
STATUSES = ("chosen", "to fix by the new core", "to fix by TLS/AUTH")


def listed_differences() -> dict[tuple[str, str], str]:
    """{(transcript, place): status} from the table of docs/smtp-fidelity.md."""
    out = {}
    for line in DIFFERENCES.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 4 or cells[0] in ("transcript", "") \
                or set(cells[0]) <= set("-: "):
            continue
        name, place, status, reason = cells
        name, place = name.strip("`"), place.strip("`")
        assert status in STATUSES, f"docs/smtp-fidelity.md: unknown status {status!r} for {name}"
        assert reason, f"docs/smtp-fidelity.md: {name} {place}: a difference needs its reason"
        out[(name, place)] = status
    return out


# --- normalisations: what differs by nature, not by behaviour (each one in docs/smtp-fidelity.md)
_PRODUCT = re.compile(r"^(\S+ ESMTP) (OpenSMTPD|pysmtpd)$")
_MSGID = re.compile(r"\b[0-9a-f]{8}\b")
_EVPID = re.compile(r"\b[0-9a-f]{16}\b")


def normal_reply(reply) -> tuple:
    lines = [_PRODUCT.sub(r"\1 <product>", text) for text in reply.lines]
    if reply.code == 250 and len(lines) > 1 and "pleased to meet you" in lines[0]:
        lines = [text for text in lines if text != "PIPELINING"]     # chosen: we advertise it
    if reply.code == 250 and lines and lines[0].endswith("Message accepted for delivery"):
        lines = [_MSGID.sub("<msgid>", text) for text in lines]
    return (reply.code, reply.enhanced, tuple(lines))


def normal_log(line: str) -> str:
    if line.startswith("smtp tls ciphers="):
        return "smtp tls ciphers=<ciphers>"
    if line.startswith(("smtp message ", "smtp envelope ")):
        line = _EVPID.sub("<evpid>", _MSGID.sub("<msgid>", line))
        return re.sub(r"size=\d+", "size=<size>", line)
    return line


def places_differing(ours: Result, theirs: Result) -> dict[str, tuple]:
    """{place: (ours, theirs)}: place is the exchange's index (0 the greeting), "end" or "log"."""
    out = {}
    for i in range(max(len(ours.exchanges), len(theirs.exchanges))):
        a = _exchange(ours, i)
        b = _exchange(theirs, i)
        if a != b:
            out[str(i)] = (a, b)
    if ours.end != theirs.end:
        out["end"] = (ours.end, theirs.end)
    a_log, b_log = [normal_log(l) for l in ours.log], [normal_log(l) for l in theirs.log]
    if a_log != b_log:
        out["log"] = (a_log, b_log)
    return out


def _exchange(result: Result, i: int):
    if i >= len(result.exchanges):
        return None
    ex = result.exchanges[i]
    event = "tls failed" if ex.event.startswith("tls failed") else ex.event
    return ([normal_reply(r) for r in ex.replies], event)


# --- the two daemons, booted once each --------------------------------------------------------

@pytest.fixture(scope="module")
def opensmtpd_results(tmp_path_factory) -> dict[str, Result]:
    try:
        _version, results = record(tmp_path_factory.mktemp("opensmtpd"))
    except opensmtpd.Unavailable as exc:
        opensmtpd.unavailable(str(exc))
    return {name: result for name, (result, _source) in results.items()}


@pytest.fixture(scope="module")
def pysmtpd_results(tmp_path_factory, privsep_users) -> dict[str, Result]:
    base = tmp_path_factory.mktemp("pysmtpd")
    site = make_site(base)
    daemon = Daemon(base, site.config_text)
    try:
        daemon.start()
        return play_all(site.ports, cafile=str(site.cafile), hostname=HOSTNAME,
                        log_source=daemon.log_since_start)
    finally:
        daemon.stop()
        site.remove_homes()
        assert not daemon.children(), "processes left behind"


def show(value) -> str:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], list):
        replies, event = value
        lines = [f"{code} {enh} {' | '.join(text)}".replace("  ", " ") for code, enh, text in replies]
        return "; ".join(lines) + (f" [{event}]" if event else "")
    return repr(value)


@pytest.mark.parametrize("name", [t.name for t in TRANSCRIPTS])
def test_replies_as_opensmtpd(name, opensmtpd_results, pysmtpd_results):
    listed = listed_differences()
    differing = places_differing(pysmtpd_results[name], opensmtpd_results[name])
    allowed = {place for (tr, place) in listed if tr == name}
    unlisted = {p: v for p, v in differing.items() if p not in allowed and "*" not in allowed}
    stale = sorted(p for p in allowed if p != "*" and p not in differing)
    if "*" in allowed and not differing:
        stale.append("*")
    report = [f"{name}: step {p}:\n  pysmtpd:   {show(a)}\n  OpenSMTPD: {show(b)}"
              for p, (a, b) in unlisted.items()]
    assert not report, ("differences from OpenSMTPD not listed in docs/smtp-fidelity.md:\n"
                        + "\n".join(report))
    assert not stale, (f"{name}: listed in docs/smtp-fidelity.md as differing at {stale}, but "
                       "pysmtpd now answers as OpenSMTPD there: remove those lines")


def test_differences_name_real_transcripts():
    names = {t.name for t in TRANSCRIPTS}
    unknown = sorted({tr for (tr, _place) in listed_differences()} - names)
    assert not unknown, f"docs/smtp-fidelity.md lists unknown transcripts: {unknown}"


def test_recorded_replies_are_opensmtpd_s(opensmtpd_results):
    """docs/opensmtpd-replies.md and its JSON are what the daemon answers today (else rerun
    ``python -m tests.oracle.record``): the other helpers read them as the truth."""
    recorded = json.loads((REPO / "tests/oracle/opensmtpd_replies.json").read_text())["transcripts"]
    assert sorted(recorded) == sorted(opensmtpd_results), "transcripts added or removed: re-record"
    stale = {name: sorted(places_differing(Result.from_json(data), opensmtpd_results[name]))
             for name, data in recorded.items()}
    stale = {name: places for name, places in stale.items() if places}
    assert not stale, f"recorded replies differ from the live OpenSMTPD at {stale}: re-record"
