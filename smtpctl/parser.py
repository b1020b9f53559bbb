"""smtpctl's command grammar, as OpenSMTPD's parser.c.

Commands are installed, in a fixed order, as whitespace-separated token
patterns into a tree.  A pattern token is either a literal keyword or one of
the typed placeholders

    <str>      any word
    <int>      a decimal int (INT_MIN..INT_MAX)
    <msgid>    exactly 8 hex digits, not zero
    <evpid>    exactly 16 hex digits, not zero
    <routeid>  a decimal number 1..2^63-1
    <addr>     an IPv4 or IPv6 literal, IPv6 with an optional %scope

Each word of the command line is matched against the children of the current
node: first an exact (literal) or typed (placeholder) match, children tried
in install order; failing that, a prefix match among the *literal* children
only, which must be unique (``sh ro`` is ``show routes``).  An ambiguous or
unknown word, or a line that stops at a node that is not a command, fails
with::

    possibilities are:
    <path so far> <child 1>
    <path so far> <child 2>
    ...

listing *every* child of the node where matching stopped (placeholders print
as their pattern token, e.g. ``show queue <msgid>``); a word after a node
that has no children fails with ``invalid command``.  smtpctl prints either
text on stderr and exits 255 (``cmd_run`` returns -1).

Everything here is pure: no sockets, no privileges checked (``privileged``
only says whether the command needs root).
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

__all__ = [
    "COMMANDS",
    "Command",
    "CommandError",
    "Grammar",
    "GRAMMAR",
    "ipv6_text",
    "PLACEHOLDERS",
    "parse_command",
    "parse_id",
    "parse_msgid",
    "parse_evpid",
    "msgid_to_text",
    "evpid_to_text",
    "EXIT_COMMAND_ERROR",
]

# cmd_run() returns -1 on a parse failure; smtpctl exits with it.
EXIT_COMMAND_ERROR = 255

# Token types (parser.h P_*).
P_TOKEN = "token"
P_STR = "str"
P_INT = "int"
P_MSGID = "msgid"
P_EVPID = "evpid"
P_ROUTEID = "routeid"
P_ADDR = "addr"

PLACEHOLDERS = {
    "<str>": P_STR,
    "<int>": P_INT,
    "<msgid>": P_MSGID,
    "<evpid>": P_EVPID,
    "<routeid>": P_ROUTEID,
    "<addr>": P_ADDR,
}

# (pattern, privileged) in install order.  The order is OpenSMTPD's
# smtpctl.c main() (it decides typed-match priority and the order of the
# "possibilities are:" lines).  pysmtpd keeps three commands OpenSMTPD no
# longer installs, at the place they used to have: ``stop`` (after
# ``show status``, as before its removal in 2016), ``uncorrupt <msgid>``
# (after ``trace <str>``, as before 2018), and adds ``reload`` at the end of
# the privileged block.
COMMANDS: tuple[tuple[str, bool], ...] = (
    ("discover <evpid>", True),
    ("discover <msgid>", True),
    ("pause mta from <addr> for <str>", True),
    ("resume mta from <addr> for <str>", True),
    ("show mta paused", True),
    ("log brief", True),
    ("log verbose", True),
    ("monitor", True),
    ("pause envelope <evpid>", True),
    ("pause envelope <msgid>", True),
    ("pause envelope all", True),
    ("pause mda", True),
    ("pause mta", True),
    ("pause smtp", True),
    ("profile <str>", True),
    ("remove <evpid>", True),
    ("remove <msgid>", True),
    ("remove all", True),
    ("resume envelope <evpid>", True),
    ("resume envelope <msgid>", True),
    ("resume envelope all", True),
    ("resume mda", True),
    ("resume mta", True),
    ("resume route <routeid>", True),
    ("resume smtp", True),
    ("schedule <msgid>", True),
    ("schedule <evpid>", True),
    ("schedule all", True),
    ("show envelope <evpid>", True),
    ("show hoststats", True),
    ("show message <msgid>", True),
    ("show message <evpid>", True),
    ("show queue", True),
    ("show queue <msgid>", True),
    ("show hosts", True),
    ("show relays", True),
    ("show routes", True),
    ("show stats", True),
    ("show status", True),
    ("stop", True),
    ("trace <str>", True),
    ("uncorrupt <msgid>", True),
    ("unprofile <str>", True),
    ("untrace <str>", True),
    ("update table <str>", True),
    ("reload", True),
    # Unprivileged commands.
    ("encrypt", False),
    ("encrypt <str>", False),
    ("spf walk", False),
)


class CommandError(ValueError):
    """A command line the grammar does not accept.

    ``str(err)`` (== ``err.text``) is exactly what smtpctl prints on stderr,
    without the final newline: either ``invalid command`` or
    ``possibilities are:`` followed by one line per candidate.
    """

    def __init__(self, lines: Sequence[str], bad_id: str | None = None,
                 id_kinds: Sequence[str] = ()):
        self.lines: list[str] = list(lines)
        # Set when the word that failed stands where a message/envelope id is expected
        # (smtpctl.main turns it into a clear "invalid ... id" error, exit 1).
        self.bad_id = bad_id
        self.id_kinds: tuple[str, ...] = tuple(id_kinds)
        super().__init__("\n".join(self.lines))

    @property
    def id_error(self) -> str | None:
        """``invalid envelope id: '12' (an envelope id is 16 hex digits)`` and the like,
        or None when the failure is not about an id."""
        if self.bad_id is None:
            return None
        if self.id_kinds == ("msgid",):
            return f"invalid message id: {self.bad_id!r} (a message id is 8 hex digits)"
        if self.id_kinds == ("evpid",):
            return f"invalid envelope id: {self.bad_id!r} (an envelope id is 16 hex digits)"
        return (f"invalid message or envelope id: {self.bad_id!r} "
                "(8 hex digits for a message, 16 for an envelope)")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def possibilities(self) -> list[str]:
        """The candidate lines (empty for ``invalid command``)."""
        if self.lines and self.lines[0] == "possibilities are:":
            return self.lines[1:]
        return []

    exit_status = EXIT_COMMAND_ERROR


@dataclass(frozen=True)
class Command:
    """A parsed command line.

    name        the literal keywords of the matched pattern, space-joined
                ("show queue", "pause envelope", "schedule", "schedule all",
                "pause mta from for")
    args        typed placeholder values keyed by type: evpid/msgid/routeid/
                int -> int, str -> str, addr -> normalised address text
    privileged  False only for encrypt and spf walk
    pattern     the installed pattern ("pause envelope <evpid>")
    """

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    privileged: bool = True
    pattern: str = ""

    @property
    def target(self) -> tuple[str, int | None] | None:
        """For envelope commands: ("evpid", id), ("msgid", id) or ("all", None)."""
        if "evpid" in self.args:
            return ("evpid", self.args["evpid"])
        if "msgid" in self.args:
            return ("msgid", self.args["msgid"])
        if self.pattern.split()[-1:] == ["all"]:
            return ("all", None)
        return None


# --- typed placeholders ---------------------------------------------------

_HEX8 = re.compile(r"[0-9A-Fa-f]{8}")
_HEX16 = re.compile(r"[0-9A-Fa-f]{16}")
_DEC = re.compile(r"[0-9]+")
_SDEC = re.compile(r"[+-]?[0-9]+")

_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_LLONG_MAX = 2**63 - 1
_UINT32_MAX = 2**32 - 1


def parse_msgid(text: str) -> int | None:
    """8 hex digits, non-zero -> int; anything else -> None."""
    if not isinstance(text, str) or not _HEX8.fullmatch(text):
        return None
    value = int(text, 16)
    return value or None


def parse_evpid(text: str) -> int | None:
    """16 hex digits, non-zero -> int; anything else -> None."""
    if not isinstance(text, str) or not _HEX16.fullmatch(text):
        return None
    value = int(text, 16)
    return value or None


def parse_id(text: str) -> tuple[str, int]:
    """``("msgid", n)`` for 8 hex digits, ``("evpid", n)`` for 16.

    As smtpctl, the kind is decided purely by the length.  Raises
    ``ValueError`` for any other length, a non-hex digit, or zero.
    """
    msgid = parse_msgid(text)
    if msgid is not None:
        return ("msgid", msgid)
    evpid = parse_evpid(text)
    if evpid is not None:
        return ("evpid", evpid)
    raise ValueError(f"invalid message or envelope id: {text!r}")


def msgid_to_text(msgid: int) -> str:
    return f"{msgid:08x}"


def evpid_to_text(evpid: int) -> str:
    return f"{evpid:016x}"


def _parse_int(text: str) -> int | None:
    if not _SDEC.fullmatch(text):
        return None
    value = int(text)
    return value if _INT_MIN <= value <= _INT_MAX else None


def _parse_routeid(text: str) -> int | None:
    if not _DEC.fullmatch(text):
        return None
    value = int(text)
    return value if 1 <= value <= _LLONG_MAX else None


def ipv6_text(addr: ipaddress.IPv6Address) -> str:
    """The address as inet_ntop(3) writes it (OpenBSD's and glibc's, the ISC code), on
    every Python: the longest run of zero groups (the first of equal runs, two groups at
    least) as ``::``, and an IPv4-mapped (``::ffff:192.0.2.1``) or IPv4-compatible
    (``::192.0.2.1``) address ending in the dotted quad.  str() differs: before 3.13 it
    writes both in hex (``::ffff:c000:201``), 3.13 only the compatible one."""
    packed = addr.packed
    tail = ipaddress.IPv4Address(packed[12:])
    if packed[:10] == bytes(10) and packed[10:12] == b"\xff\xff":
        return f"::ffff:{tail}"
    if packed[:12] == bytes(12) and packed[12:14] != bytes(2):   # zero run of exactly six groups
        return f"::{tail}"
    return str(addr)


def _parse_addr(text: str) -> str | None:
    """parser.c text_to_sockaddr(PF_UNSPEC): IPv4 first, then IPv6[%scope].

    The scope of a link-local (or interface/link-local multicast) address may
    be an interface name known to this host; otherwise it must be a number
    0..2^32-1.  Returns the normalised text, or None.
    """
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        pass
    base, pct, scope = text.partition("%")
    try:
        # IPv6Address itself would swallow a "%scope"; it is split off above.
        addr = ipaddress.IPv6Address(base)
    except ValueError:
        return None
    if not pct:
        return ipv6_text(addr)
    scoped_ok = False
    if addr.is_link_local or (
        addr.is_multicast and (addr.packed[1] & 0x0F) in (1, 2)
    ):
        try:
            scoped_ok = bool(scope) and socket.if_nametoindex(scope) != 0
        except (OSError, ValueError):
            scoped_ok = False
    if not scoped_ok:
        if not _DEC.fullmatch(scope) or int(scope) > _UINT32_MAX:
            return None
    return f"{ipv6_text(addr)}%{scope}"


def _check(kind: str, token: str, word: str) -> tuple[bool, Any]:
    """parser.c cmd_check(): does ``word`` match this node, and its value."""
    if kind == P_TOKEN:
        return (word == token, None)
    if kind == P_STR:
        return (True, word)
    if kind == P_INT:
        value = _parse_int(word)
    elif kind == P_MSGID:
        value = parse_msgid(word)
    elif kind == P_EVPID:
        value = parse_evpid(word)
    elif kind == P_ROUTEID:
        value = _parse_routeid(word)
    elif kind == P_ADDR:
        value = _parse_addr(word)
    else:  # pragma: no cover - install() only creates the kinds above
        raise AssertionError(f"bad token type: {kind}")
    return (value is not None, value)


# --- the tree -------------------------------------------------------------


class _Node:
    __slots__ = ("token", "kind", "children", "pattern", "privileged")

    def __init__(self, token: str, kind: str):
        self.token = token
        self.kind = kind
        self.children: list[_Node] = []
        self.pattern: str | None = None      # set when a command ends here
        self.privileged = True


class Grammar:
    """A command tree built with ``install`` (parser.c cmd_install/cmd_run)."""

    def __init__(self, table: Iterable[tuple[str, bool]] = ()):
        self.root = _Node("", P_TOKEN)
        for pattern, privileged in table:
            self.install(pattern, privileged)

    def install(self, pattern: str, privileged: bool = True) -> None:
        tokens = pattern.split()
        if not tokens:
            raise ValueError("empty pattern")
        kinds = [PLACEHOLDERS.get(t, P_TOKEN) for t in tokens]
        typed = [k for k in kinds if k != P_TOKEN]
        if len(typed) != len(set(typed)):
            # args are keyed by type, so a type may appear once per pattern
            raise ValueError(f"placeholder used twice in pattern: {pattern}")
        node = self.root
        for token, kind in zip(tokens, kinds):
            for child in node.children:
                if child.token == token:
                    node = child
                    break
            else:
                child = _Node(token, kind)
                node.children.append(child)
                node = child
        if node.pattern is not None:
            raise ValueError(f"duplicate pattern: {pattern}")
        node.pattern = " ".join(tokens)
        node.privileged = bool(privileged)

    def parse(self, words: Sequence[str]) -> Command:
        if isinstance(words, str):
            raise TypeError("parse_command() takes a list of words, not a string")
        node = self.root
        stack: list[_Node] = []
        args: dict[str, Any] = {}
        for word in words:
            nxt = None
            for child in node.children:
                ok, value = _check(child.kind, child.token, word)
                if ok:
                    nxt = child
                    if child.kind != P_TOKEN:
                        args[child.kind] = value
                    break
            if nxt is None:
                for child in node.children:
                    if child.kind != P_TOKEN or not child.token.startswith(word):
                        continue
                    if nxt is not None:
                        raise self._failure(node, stack, word)
                    nxt = child
                if nxt is None:
                    raise self._failure(node, stack, word)
            stack.append(nxt)
            node = nxt
        if node.pattern is None:
            raise self._failure(node, stack)
        name = " ".join(n.token for n in stack if n.kind == P_TOKEN)
        return Command(name=name, args=args, privileged=node.privileged,
                       pattern=node.pattern)

    @staticmethod
    def _failure(node: _Node, stack: list[_Node], word: str | None = None) -> CommandError:
        if not node.children:
            return CommandError(["invalid command"])
        prefix = " ".join(n.token for n in stack)
        lines = ["possibilities are:"]
        for child in node.children:
            lines.append(f"{prefix} {child.token}" if prefix else child.token)
        kinds = [c.kind for c in node.children if c.kind in (P_MSGID, P_EVPID)]
        if word is not None and kinds:
            return CommandError(lines, bad_id=word, id_kinds=sorted(kinds, reverse=True))
        return CommandError(lines)

    def keywords(self, path: Sequence[str]) -> list[str]:
        """The keywords (literal tokens) that may follow the keywords ``path``, in order."""
        node = self.root
        for token in path:
            node = next(c for c in node.children if c.token == token)
        return [c.token for c in node.children if c.kind == P_TOKEN]

    def patterns(self) -> list[str]:
        """Every installed pattern, in tree order."""
        out: list[str] = []

        def walk(n: _Node) -> None:
            if n.pattern is not None:
                out.append(n.pattern)
            for c in n.children:
                walk(c)

        walk(self.root)
        return out


GRAMMAR = Grammar(COMMANDS)


def parse_command(words: Sequence[str]) -> Command:
    """Parse smtpctl's argv (without the program name) into a ``Command``.

    Raises ``CommandError`` with smtpctl's exact diagnostic text.
    """
    return GRAMMAR.parse(words)
