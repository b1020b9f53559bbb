"""The envelope: one recipient of one message, and its on-disk text codec.

The file format is OpenSMTPD's (envelope.c, version 3): ``key: value`` lines in a
fixed order, a line omitted when its value renders empty.  The action is stored by
NAME (``dispatcher``), never as a resolved command, so that queued mail follows a
corrected configuration.  pysmtpd adds two keys of its own to ``mda`` envelopes,
``mda-method`` and ``mda-file``, for what an alias or .forward names instead of a
user (docs/expansion.md); both are empty, so absent from the file, for a user.
"""
from __future__ import annotations

import re

import msgspec

ENVELOPE_VERSION = 3

# dsn-notify bits, as OpenSMTPD stores them.
DSN_SUCCESS = 1
DSN_FAILURE = 2
DSN_DELAY = 4
DSN_NEVER = 8

FLAG_NAMES = ("authenticated", "bounce", "internal")

# mda-method: "" the action's delivery for mda_user, "exec" an alias's or .forward's
# |command (mda_exec), "file" its /path (mda_file)
MDA_METHODS = ("", "exec", "file")


class EnvelopeError(ValueError):
    """An envelope file or buffer that cannot be decoded."""


class Envelope(msgspec.Struct, kw_only=True):
    id: int = 0                      # evpid; not stored in the file (its name is the id)
    dispatcher: str = ""             # action name
    tag: str = ""
    type: str = "mta"                # "mda" | "mta" | "bounce"
    smtpname: str = ""
    helo: str = ""
    hostname: str = ""
    username: str = ""
    errorline: str = ""
    sockaddr: str = "local"          # "local", dotted IPv4 or "[IPv6]"
    sender: str = ""                 # "user@domain", "" for <>
    rcpt: str = ""                   # the original recipient
    dest: str = ""                   # the recipient after expansion
    ctime: int = 0
    last_try: int = 0
    last_bounce: int = 0
    ttl: int = 0
    retry: int = 0
    flags: list[str] = []
    dsn_notify: int = 0
    dsn_ret: str = ""
    dsn_envid: str = ""
    dsn_orcpt: str = ""
    esc_class: int = 0
    esc_code: int = 0
    mda_exec: str = ""
    mda_subaddress: str = ""
    mda_user: str = ""
    # What an alias or .forward target asks for instead of the action's delivery
    # (docs/expansion.md): "" deliver to mda_user by the action's method (maildir,
    # mbox, lmtp, mda); "exec" pipe to the command in mda_exec, run as mda_user;
    # "file" append mbox-style to the file mda_file, written as mda_user.
    mda_method: str = ""
    mda_file: str = ""
    bounce_ttl: int = 0
    bounce_delay: int = 0
    bounce_type: str = ""

    @property
    def msgid(self) -> int:
        return self.id >> 32


# (file key, attribute, kind) in OpenSMTPD's order.  kind: s=str, i=int, f=flags.
_COMMON = [
    ("dispatcher", "dispatcher", "s"), ("tag", "tag", "s"), ("type", "type", "s"),
    ("smtpname", "smtpname", "s"), ("helo", "helo", "s"), ("hostname", "hostname", "s"),
    ("username", "username", "s"), ("errorline", "errorline", "s"), ("sockaddr", "sockaddr", "s"),
    ("sender", "sender", "a"), ("rcpt", "rcpt", "a"), ("dest", "dest", "a"),
    ("ctime", "ctime", "i"), ("last-try", "last_try", "i"), ("last-bounce", "last_bounce", "i"),
    ("ttl", "ttl", "i"), ("retry", "retry", "i"), ("flags", "flags", "f"),
    ("dsn-notify", "dsn_notify", "i"), ("dsn-ret", "dsn_ret", "s"), ("dsn-envid", "dsn_envid", "s"),
    ("dsn-orcpt", "dsn_orcpt", "s"), ("esc-class", "esc_class", "c"), ("esc-code", "esc_code", "c"),
]
_BY_TYPE = {
    "mda": [("mda-exec", "mda_exec", "s"), ("mda-subaddress", "mda_subaddress", "s"),
            ("mda-user", "mda_user", "s"), ("mda-method", "mda_method", "s"),
            ("mda-file", "mda_file", "s")],
    "mta": [],
    "bounce": [("bounce-ttl", "bounce_ttl", "i"), ("bounce-delay", "bounce_delay", "i"),
               ("bounce-type", "bounce_type", "s")],
}
_ALL_KEYS = {k: (attr, kind) for k, attr, kind in _COMMON + sum(_BY_TYPE.values(), [])}
_ALL_KEYS["version"] = ("", "v")
_KEY_RE = re.compile(r"^([A-Za-z0-9-]+)\s*:\s*(.*)$")
_BOUNCE_TYPES = {"error": "failed", "warn": "delayed", "dsn": "delivered"}


def dump(env: Envelope) -> bytes:
    """Serialise an envelope to the spool's text format."""
    lines = [f"version: {ENVELOPE_VERSION}"]
    for key, attr, kind in _COMMON + _BY_TYPE.get(env.type, []):
        value = getattr(env, attr)
        if kind == "f":
            text = " ".join(value)
        elif kind == "a":
            text = value                        # the null sender renders empty: line omitted
        elif kind == "c":
            if not env.esc_class:
                continue
            text = str(value)
        elif kind == "s" and key == "bounce-delay" and env.bounce_type != "delayed":
            continue
        else:
            text = str(value)
        if "\n" in text or "\r" in text:
            raise EnvelopeError(f"{key}: value contains a line break")
        if text:
            lines.append(f"{key}: {text}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def load(data: bytes, evpid: int = 0) -> Envelope:
    """Parse an envelope file; any unknown key or bad value makes it invalid."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"not UTF-8: {exc}") from None
    values: dict[str, object] = {}
    version = None
    spec_of = _ALL_KEYS.get
    # str.partition rather than _KEY_RE per line: the queue parses every envelope at
    # start and for `show queue`, 100,000 of them in a big queue (bench/bench_scale.py)
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        key, colon, value = line.partition(":")
        key = key.rstrip()
        spec = spec_of(key) or spec_of(key.lower())
        if spec is None or not colon:
            if not colon or not _KEY_RE.match(line):
                raise EnvelopeError(f"line {lineno}: not a 'key: value' line")
            raise EnvelopeError(f"line {lineno}: unknown key {key.lower()!r}")
        attr, kind = spec
        value = value.strip()
        try:
            if kind == "v":
                version = int(value)
            elif kind in "ic":
                values[attr] = int(value)
            elif kind == "f":
                values[attr] = [f for f in re.split(r"[ ,|]+", value)
                                if f and f != "enqueued"]
            elif kind == "a":
                values[attr] = "" if value == "@" else value
            else:
                values[attr] = value
        except ValueError:
            raise EnvelopeError(f"line {lineno}: bad value for {key}") from None
    if version != ENVELOPE_VERSION:
        raise EnvelopeError(f"unsupported envelope version {version}")
    flags = values.get("flags", [])
    if any(f not in FLAG_NAMES for f in flags):  # type: ignore[union-attr]
        raise EnvelopeError(f"unknown flag in {flags}")
    if "bounce_type" in values:
        values["bounce_type"] = _BOUNCE_TYPES.get(values["bounce_type"], values["bounce_type"])
    env = Envelope(id=evpid, **values)  # type: ignore[arg-type]
    if env.type not in _BY_TYPE:
        raise EnvelopeError(f"unknown envelope type {env.type!r}")
    if env.mda_method not in MDA_METHODS:
        raise EnvelopeError(f"unknown mda-method {env.mda_method!r}")
    if not env.dispatcher:
        raise EnvelopeError("no dispatcher")
    return env
