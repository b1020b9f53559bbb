"""smtpctl's output formats, byte for byte as OpenSMTPD's smtpctl.c.

Every function here is pure and returns text without the trailing newline
(one string per output line); the caller prints them.

* ``show queue``  -> ``format_queue_line`` (``show_queue_envelope``), and the
  pysmtpd addition ``format_queue_json`` for ``show queue --json``
* ``show status`` -> ``format_status``
* ``show stats``  -> ``format_stats`` (``do_show_stats``)
* bulk envelope commands / ``discover`` -> ``format_bulk_result``
* ``monitor``     -> ``monitor_header`` and ``format_monitor_row``
* ``srv_check_result`` -> ``command_result``
"""
from __future__ import annotations

import functools
import ipaddress
import json
import math
from typing import Any, Mapping

from common.durations import duration_to_text
from common.vis import strnvis   # smtpctl.c: strnvis(errline, e->errorline, sizeof errline, 0)

__all__ = [
    "strnvis",
    "queue_fields",
    "format_queue_line",
    "format_queue_json",
    "format_status",
    "format_stats",
    "format_stat_value",
    "format_bulk_result",
    "MONITOR_HEADER",
    "monitor_header",
    "format_monitor_row",
    "command_result",
    "SMTPD_MDA_PAUSED",
    "SMTPD_MTA_PAUSED",
    "SMTPD_SMTP_PAUSED",
]

_U64 = 1 << 64


def _zu(value: int) -> int:
    """printf ``%zu`` of a (possibly negative) value: size_t wrap-around."""
    return int(value) % _U64


def _zd(value: int) -> int:
    """printf ``%zd``: a signed 64-bit value."""
    v = int(value) % _U64
    return v - _U64 if v >= 1 << 63 else v


# --- show queue ------------------------------------------------------------

_FLAG_ORDER = ("bounce", "auth", "internal", "suspend", "hold")
_FLAG_ALIASES = {
    "bounce": "bounce",
    "authenticated": "auth",
    "auth": "auth",
    "internal": "internal",
    "suspend": "suspend",
    "suspended": "suspend",
    "hold": "hold",
    "held": "hold",
}


@functools.lru_cache(maxsize=4096)
def _src(sockaddr: Any) -> str:
    # cached: a big queue repeats a few client addresses, and parsing each
    # was 40 % of the formatting of a `show queue` line
    s = "" if sockaddr is None else str(sockaddr)
    if s in ("local", "inet4", "inet6"):
        return s
    if s.startswith("["):
        return "inet6"
    try:
        ip = ipaddress.ip_address(s.split("%", 1)[0])
    except ValueError:
        return "?"
    return "inet4" if ip.version == 4 else "inet6"


def _agent(kind: Any) -> str:
    return kind if kind in ("mda", "mta", "bounce") else "?"


def _flags(e: Mapping[str, Any]) -> list[str]:
    present: set[str] = set()
    for f in e.get("flags") or ():
        name = _FLAG_ALIASES.get(f)
        if name is None:
            evpid = int(e.get("evpid", 0))
            raise ValueError(f"{evpid:016x}: unexpected flags {f!r}")
        present.add(name)
    if e.get("suspended"):
        present.add("suspend")
    if e.get("held"):
        present.add("hold")
    return [f for f in _FLAG_ORDER if f in present]


def _mailaddr(addr: Any) -> str:
    """``%s@%s`` of user and domain: ``""`` -> ``@``, ``user`` -> ``user@``."""
    s = "" if addr is None else str(addr)
    return s if "@" in s else s + "@"


def _runstate(e: Mapping[str, Any]) -> tuple[str, int | None]:
    state = e.get("runstate") or "offline"
    runtime = e.get("runtime")
    if state in ("pending", "inflight"):
        return state, (None if runtime is None else _zd(runtime))
    if state in ("offline", "invalid"):
        return state, None
    raise ValueError(f"unknown runstate {state!r}")


def queue_fields(e: Mapping[str, Any]) -> dict[str, Any]:
    """The 14 values of a ``show queue`` line (runstate and runtime apart),
    normalised: ``evpid`` as 16 hex digits, ``flags`` a list in print order,
    addresses in ``user@domain`` form, ``errorline`` raw (not vis-encoded)."""
    state, runtime = _runstate(e)
    return {
        "evpid": f"{int(e['evpid']):016x}",
        "src": _src(e.get("sockaddr")),
        "agent": _agent(e.get("type")),
        "flags": _flags(e),
        "sender": _mailaddr(e.get("sender")),
        "rcpt": _mailaddr(e.get("rcpt")),
        "dest": _mailaddr(e.get("dest")),
        "ctime": _zu(e.get("ctime", 0)),
        "expire": _zu(e.get("expire", 0)),
        "lasttry": _zu(e.get("lasttry", 0)),
        "retry": _zu(e.get("retry", 0)),
        "runstate": state,
        "runtime": runtime,
        "errorline": str(e.get("errorline") or ""),
    }


def format_queue_line(e: Mapping[str, Any]) -> str:
    """One ``show queue`` / ``mailq`` line (``show_queue_envelope``).

    ``evpid|src|agent|flags|sender|rcpt|dest|ctime|expire|lasttry|retry|runstate|runtime|errorline``
    """
    f = queue_fields(e)
    runtime = "" if f["runtime"] is None else str(f["runtime"])
    return "|".join((
        f["evpid"], f["src"], f["agent"], ",".join(f["flags"]),
        f["sender"], f["rcpt"], f["dest"],
        str(f["ctime"]), str(f["expire"]), str(f["lasttry"]), str(f["retry"]),
        f["runstate"], runtime, strnvis(f["errorline"]),
    ))


def format_queue_entry(entry: Any) -> str:
    """``format_queue_line`` of a QueueListEntry as it comes from the daemon, without
    the intermediate dict for the common line (no flag): a 100,000-envelope queue
    prints in about half the time.  Lines with flags take the general path."""
    env = entry.envelope
    if env.flags or entry.suspended or entry.held:
        return format_queue_line(entry_fields(entry))
    state, runtime = _runstate({"runstate": entry.runstate, "runtime": entry.runtime})
    return (f"{entry.evpid:016x}|{_src(env.sockaddr)}|{_agent(env.type)}||{_mailaddr(env.sender)}|"
            f"{_mailaddr(env.rcpt)}|{_mailaddr(env.dest)}|{_zu(env.ctime)}|{_zu(entry.expire)}|"
            f"{_zu(env.last_try)}|{_zu(env.retry)}|{state}|{'' if runtime is None else runtime}|"
            f"{strnvis(env.errorline or '')}")


def entry_fields(entry: Any) -> dict:
    """The mapping ``queue_fields`` reads, from a QueueListEntry."""
    env = entry.envelope
    return {
        "evpid": entry.evpid, "sockaddr": env.sockaddr, "type": env.type, "flags": env.flags,
        "suspended": entry.suspended, "held": entry.held, "sender": env.sender, "rcpt": env.rcpt,
        "dest": env.dest, "ctime": env.ctime, "expire": entry.expire, "lasttry": env.last_try,
        "retry": env.retry, "runstate": entry.runstate, "runtime": entry.runtime,
        "errorline": env.errorline,
    }


def format_queue_json(e: Mapping[str, Any]) -> str:
    """``show queue --json`` (pysmtpd): one compact JSON object per envelope.

    Keys, in this order: evpid (16-hex string), src, agent, flags (list, in
    the same fixed order as the text form), sender, rcpt, dest (as printed in
    the text form, so ``@`` for the null sender), ctime, expire, lasttry,
    retry (numbers), runstate (string), runtime (number or null), errorline
    (the raw string; JSON does the escaping).
    """
    return json.dumps(queue_fields(e), separators=(",", ":"))


# --- show status -----------------------------------------------------------

SMTPD_MDA_PAUSED = 0x2
SMTPD_MTA_PAUSED = 0x4
SMTPD_SMTP_PAUSED = 0x8

_STATUS = (("mda", "MDA", SMTPD_MDA_PAUSED), ("mta", "MTA", SMTPD_MTA_PAUSED),
           ("smtp", "SMTP", SMTPD_SMTP_PAUSED))


def _paused(flags: Mapping[str, Any], key: str) -> bool:
    for k in (key, key.upper(), f"{key}_paused"):
        if k in flags:
            v = flags[k]
            if isinstance(v, str):
                if v not in ("paused", "running"):
                    raise ValueError(f"bad status for {key}: {v!r}")
                return v == "paused"
            return bool(v)
    return False


def format_status(flags: Mapping[str, Any] | int) -> list[str]:
    """``MDA running|paused``, ``MTA ...``, ``SMTP ...``.

    ``flags`` is either smtpd's sc_flags bitmask (0x2 MDA, 0x4 MTA, 0x8 SMTP
    paused) or a mapping with keys ``mda``/``mta``/``smtp`` (also accepted:
    ``MDA`` or ``mda_paused``) whose values are True when paused, or the
    strings ``"paused"``/``"running"``.  A missing key means running.
    """
    if isinstance(flags, int):
        return [f"{label} {'paused' if flags & bit else 'running'}"
                for _, label, bit in _STATUS]
    lines = [f"{label} {'paused' if _paused(flags, key) else 'running'}"
             for key, label, _ in _STATUS]
    # pysmtpd: one line per filter process (docs/filters.md), as "Filter NAME STATE"
    filters = flags.get("filters")
    if isinstance(filters, Mapping):
        lines += [f"Filter {name} {state}" for name, state in sorted(filters.items())]
    return lines


# --- show stats ------------------------------------------------------------


def format_stat_value(value: int | float) -> str:
    """Counters (``int``) print ``%zd``; a ``float`` is a struct timeval,
    printed as OpenSMTPD does, ``%lld.%lld`` (usec not zero-padded)."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(_zd(value))
    if isinstance(value, float):
        sec = math.floor(value)
        usec = round((value - sec) * 1_000_000)
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        return f"{sec}.{usec}"
    raise TypeError(f"unsupported stat value: {value!r}")


def format_stats(kv: Mapping[str, int | float]) -> list[str]:
    """``key=value`` lines in strcmp (byte) order of the keys.

    ``uptime`` is the number of seconds since smtpd started (the caller
    subtracts the start time) and prints two lines: ``uptime=<n>`` and
    ``uptime.human=<duration_to_text(n)>``.
    """
    lines: list[str] = []
    for key in sorted(kv, key=lambda k: k.encode("utf-8", "surrogateescape")):
        value = kv[key]
        if key == "uptime":
            n = int(value)
            lines.append(f"uptime={n}")
            lines.append(f"uptime.human={duration_to_text(n)}")
        else:
            lines.append(f"{key}={format_stat_value(value)}")
    return lines


# --- bulk envelope commands -----------------------------------------------


def format_bulk_result(verb: str, count: int) -> str:
    """``%zu envelope%s <verb>``.

    ``paused``/``resumed``/``scheduled``/``removed`` take the plural only
    when count > 1 (``0 envelope removed``); ``discovered`` whenever
    count != 1 (``0 envelopes discovered``), as smtpctl.c.
    """
    n = _zu(count)
    plural = (n != 1) if verb == "discovered" else (n > 1)
    return f"{n} envelope{'s' if plural else ''} {verb}"


# --- monitor ---------------------------------------------------------------

MONITOR_HEADER = (
    "--- client ---  -- envelope --   ---- relay/delivery --- ------- misc -------",
    "curr conn disc  curr  enq  deq   ok tmpfail prmfail loop expire remove bounce",
)

DIGEST_FIELDS = (
    "clt_connect", "clt_disconnect", "evp_enqueued", "evp_dequeued",
    "evp_expired", "evp_removed", "evp_bounce",
    "dlv_ok", "dlv_permfail", "dlv_tempfail", "dlv_loop",
)


def monitor_header(first: bool) -> list[str]:
    """The two header lines, preceded by an empty line unless ``first``
    (smtpctl prints it before row 0, 25, 50, ...)."""
    return list(MONITOR_HEADER) if first else ["", *MONITOR_HEADER]


def format_monitor_row(curr: Mapping[str, int],
                       prev: Mapping[str, int] | None) -> str:
    """One monitor row from two ``struct stat_digest`` snapshots.

    Keys: clt_connect, clt_disconnect, evp_enqueued, evp_dequeued,
    evp_expired, evp_removed, evp_bounce, dlv_ok, dlv_permfail,
    dlv_tempfail, dlv_loop (missing keys count as 0).  ``prev`` is None for
    the first row (all zeros, so totals are shown).  Values are size_t in C,
    so a negative difference wraps around as it does there.
    """
    last = prev or {}

    def c(k: str) -> int:
        return int(curr.get(k, 0))

    def p(k: str) -> int:
        return int(last.get(k, 0))

    def d(k: str) -> int:
        return _zu(c(k) - p(k))

    return ("%4d %4d %4d  %4d %4d %4d %4d    %4d    %4d %4d   %4d   %4d   %4d" % (
        _zu(c("clt_connect") - c("clt_disconnect")),
        d("clt_connect"),
        d("clt_disconnect"),
        _zu(c("evp_enqueued") - c("evp_dequeued")),
        d("evp_enqueued"),
        d("evp_dequeued"),
        d("dlv_ok"),
        d("dlv_tempfail"),
        d("dlv_permfail"),
        d("dlv_loop"),
        d("evp_expired"),
        d("evp_removed"),
        d("evp_bounce"),
    ))


# --- generic result --------------------------------------------------------


def command_result(ok: bool, text: str | None = None) -> str:
    """``srv_check_result(1)``: ``command succeeded``, ``command failed`` or
    ``command failed: <text>`` (text only shown on failure, when non-empty)."""
    if ok:
        return "command succeeded"
    if text:
        return f"command failed: {text}"
    return "command failed"
