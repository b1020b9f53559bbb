"""Recipient expansion as an object that asks and is answered (OpenSMTPD's
lka_session.c, with expand.c and aliases.c).

An ``Expansion`` is made for one RCPT.  It does no I/O: ``next_request()`` says
what it needs (a rule match, a table lookup, a user's .forward, an :include: file)
and ``feed()`` gives it the answer, until ``result`` holds the envelopes to queue or
the SMTP error to answer.  smtpd/lka.py drives it; the tests drive it by hand.  The
order, limits and replies are OpenSMTPD's; docs/expansion.md tells them and the
envelope fields delivery reads.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from common.envelope import Envelope
from common.trace import FLAGS, trace
from smtpd.expand_parse import (
    ADDRESS, ERROR, FILENAME, FILTER, INCLUDE, USERNAME, LineError, Target, file_lines, parse_line,
)
from smtpd.table.services import parse_userinfo

log = logging.getLogger("smtpd")

MAX_DEPTH = 10                 # lka_session.c EXPAND_DEPTH
MAX_FORWARD_SIZE = 4096        # forward.c: a larger .forward fails temporarily
MAX_FORWARD_NODES = 100        # forward.c MAX_EXPAND_NODES
MAX_NODES = 1000               # pysmtpd's bound on one recipient's expansion

# expand_cmp orders nodes by type first (smtpd.h's enum order): the targets of one
# alias entry are taken in that order, as OpenSMTPD walks its tree
_TYPE_ORDER = {USERNAME: 1, FILENAME: 2, FILTER: 3, INCLUDE: 4, ADDRESS: 5, ERROR: 6}


class _TempfailAnswer:
    """The answer to any request that could not be answered now (a table backend
    down, a lookup that timed out): the expansion fails temporarily."""

    def __repr__(self) -> str:
        return "TEMPFAIL"


TEMPFAIL = _TempfailAnswer()


# -- what the expansion asks for -------------------------------------------------------

@dataclass(frozen=True)
class MatchRule:
    """The rule for this address (answer: the Rule, None when none matches, or TEMPFAIL).
    ``internal``: the address came from an expansion, not from the client."""
    address: str
    internal: bool


@dataclass(frozen=True)
class TableLookup:
    """A lookup in a table (answer: str or list of str, None if absent, or TEMPFAIL).
    ``table`` as the configuration names it, without <>."""
    table: str
    service: str               # "alias" (alias and virtual tables, OpenSMTPD's K_ALIAS), "userinfo"
    key: str


@dataclass(frozen=True)
class ReadForward:
    """The text of ``home``/.forward, read by the parent with its checks (answer: FileAnswer)."""
    user: str
    home: str
    uid: int
    gid: int


@dataclass(frozen=True)
class ReadInclude:
    """The text of an :include: file named in a table (answer: FileAnswer)."""
    path: str


@dataclass(frozen=True)
class FileAnswer:
    status: str                # "ok" | "absent" | "tempfail" | "permfail"
    content: str = ""


Request = MatchRule | TableLookup | ReadForward | ReadInclude


@dataclass
class ExpandResult:
    envelopes: list[Envelope] = field(default_factory=list)
    error: tuple[int, str] | None = None


@dataclass(eq=False)
class Node:
    """An expandnode: one step of the expansion, with where it came from."""
    type: str
    value: str                 # the address, user name, path, command or error text
    parent: Node | None
    action: object | None      # the action of the rule current when it was added
    depth: int = 0
    sameuser: bool = False     # a user named in its own alias or .forward
    realuser: bool = False     # found in the user base (uid known)
    realuser_uid: int = -1
    forwarded: bool = False    # its .forward was asked for
    subaddress: str = ""
    serial: int = 0            # its number in the session: nodes are told apart by it

    @property
    def internal(self) -> bool:
        return self.parent is not None

    def ancestor(self, type_: str) -> Node | None:
        node = self.parent
        while node is not None and node.type != type_:
            node = node.parent
        return node


class _Fail(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(code, text)
        self.code, self.text = code, text


def split_address(addr: str) -> tuple[str, str]:
    user, _, domain = addr.rpartition("@")
    return (user, domain) if user else (addr, "")


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


class Expansion:
    """lka_session for one recipient: feed it answers until ``result`` is set."""

    def __init__(self, envelope: Envelope, actions: dict, *, sub_addr_delim: str = "+",
                 smtpd_user: str = "_smtpd") -> None:
        self.base = envelope
        self.actions = actions
        self.delim = sub_addr_delim or "+"
        self.smtpd_user = smtpd_user
        self.result: ExpandResult | None = None
        self._queue: deque[Node] = deque()
        self._seen: set[tuple] = set()
        self._count = 0
        self._envelopes: list[Envelope] = []
        self._pending: Request | None = None
        self._steps = self._run()
        self._advance(None)

    # -- the sans-I/O surface --------------------------------------------------------

    def next_request(self) -> Request | None:
        """What the expansion waits for, or None once ``result`` is set."""
        return self._pending

    def feed(self, answer) -> None:
        """The answer to ``next_request()``."""
        if self._pending is None:
            raise RuntimeError("the expansion is not waiting for an answer")
        self._advance(answer)

    def _advance(self, answer) -> None:
        try:
            self._pending = self._steps.send(answer)
        except StopIteration:
            self._pending = None
        except _Fail as fail:
            self._pending = None
            self.result = ExpandResult(error=(fail.code, fail.text))

    # -- replies (lka_session's, with our enhanced codes: docs/smtp-fidelity.md) --------

    def _rcpt(self) -> str:
        return f"<{self.base.rcpt}>"

    def _tempfail(self) -> _Fail:
        return _Fail(451, "4.3.0 Temporary failure")

    def _expansion_failed(self, temporary: bool) -> _Fail:
        if temporary:
            return _Fail(424, f"4.2.4 Mailing list expansion problem: {self._rcpt()}")
        return _Fail(524, f"5.2.4 Mailing list expansion problem: {self._rcpt()}")

    # -- the session -----------------------------------------------------------------

    def _run(self):
        if _has_control(self.base.rcpt) or _has_control(self.base.sender):
            # the session refuses these already; an envelope cannot even store them
            raise _Fail(550, f"5.1.3 Invalid recipient: {self._rcpt()}")
        self._insert(Target(ADDRESS, self.base.rcpt), parent=None, action=None)
        while self._queue:
            node = self._queue.popleft()
            yield from self._expand(node)
        if not self._envelopes:
            self._trace("expand: lka_done: expanded to empty delivery list")
            raise self._expansion_failed(temporary=False)
        self.result = ExpandResult(envelopes=self._envelopes)

    def _trace(self, fmt: str, *args) -> None:
        if FLAGS.expand:
            trace(fmt, *args)

    def _insert(self, target: Target, parent: Node | None, action) -> None:
        """expand_insert: add a node unless the same one is already there."""
        node = Node(target.type, target.value, parent, action,
                    depth=parent.depth + 1 if parent else 0)
        if (node.type == USERNAME and parent is not None and parent.type == USERNAME
                and parent.value == node.value):
            node.sameuser = True
        # expand_cmp: the same node under the same address is the same (and for
        # commands and files, under the same user: they run as that user)
        address = node.ancestor(ADDRESS)
        user = node.ancestor(USERNAME) if node.type in (FILENAME, FILTER) else None
        key = (node.type, node.sameuser, node.value, address.serial if address else -1,
               user.serial if user else -1)
        if key in self._seen:
            self._trace("expand: %s:%s: node found, discarding", node.type, node.value)
            return
        self._seen.add(key)
        self._count += 1
        node.serial = self._count
        if self._count > MAX_NODES:
            self._trace("expand: more than %d nodes", MAX_NODES)
            raise self._expansion_failed(temporary=False)
        self._queue.append(node)

    def _expand(self, node: Node):
        """lka_expand."""
        if node.depth >= MAX_DEPTH:
            self._trace("expand: lka_expand: node too deep.")
            raise self._expansion_failed(temporary=False)
        if node.type == ADDRESS:
            yield from self._address(node)
        elif node.type == USERNAME:
            yield from self._username(node)
        elif node.type in (FILENAME, FILTER):
            self._file_or_command(node)
        elif node.type == ERROR:
            self._error(node)

    def _address(self, node: Node):
        self._trace("expand: lka_expand: address: %s [depth=%d]", node.value, node.depth)
        ancestor = node.ancestor(ADDRESS)
        while ancestor is not None:
            if ancestor.value.lower() == node.value.lower() and ancestor.internal == node.internal:
                # it would expand the same way again, down to the depth limit
                self._trace("expand: loop detected for %s", node.value)
                raise self._expansion_failed(temporary=False)
            ancestor = ancestor.ancestor(ADDRESS)
        rule = yield MatchRule(node.value, node.internal)
        if rule is TEMPFAIL:
            raise self._tempfail()
        if rule is None or rule.reject:
            raise _Fail(550, f"5.7.1 Invalid recipient: {self._rcpt()}")
        action = self.actions[rule.action]
        user, domain = split_address(node.value)
        if action.method == "relay":
            self._submit(node, action)
        elif action.virtual:
            found = yield from self._virtual(action, node, user, domain)
            if found is TEMPFAIL:
                self._trace("expand: lka_expand: error in virtual alias lookup")
                raise self._expansion_failed(temporary=True)
            if not found:
                self._trace("expand: lka_expand: no aliases for virtual")
                raise self._expansion_failed(temporary=False)
        else:
            node.action = action
            self._insert(Target(USERNAME, user.lower()), parent=node, action=action)

    def _username(self, node: Node):
        action = node.action
        self._trace("expand: lka_expand: username: %s [depth=%d, sameuser=%d]",
                    node.value, node.depth, node.sameuser)
        if not node.sameuser and (action.alias or action.virtual):
            if action.alias:
                found = yield from self._alias(action, node)
            else:
                # OpenSMTPD reads the user name as an address without domain here
                found = yield from self._virtual(action, node, node.value, "")
            if found is TEMPFAIL:
                self._trace("expand: lka_expand: error in alias lookup")
                raise self._expansion_failed(temporary=True)
            if found:
                return
        user, _, node.subaddress = node.value.partition(self.delim)
        node.value = user
        info = yield TableLookup((action.userbase or "<getpwnam>").strip("<>"), "userinfo", user)
        if info is TEMPFAIL:
            self._trace("expand: lka_expand: backend error while searching user")
            raise self._tempfail()
        if not info:
            self._trace("expand: lka_expand: user-part does not match system user")
            raise _Fail(550, f"5.1.1 Invalid recipient: {self._rcpt()}")
        try:
            uid, gid, home = parse_userinfo(user, info if isinstance(info, str) else info[0])
        except ValueError as exc:
            log.warning("warn: lka: table %s: bad userinfo for %s: %s", action.userbase, user, exc)
            raise self._tempfail() from None
        node.realuser, node.realuser_uid = True, uid
        if node.sameuser and node.parent.forwarded:
            self._trace("expand: lka_expand: same user, submitting")
            self._submit(node, action)
            return
        if action.user and action.user != user:
            self._trace("expand: lka_expand: alternate delivery user mismatch recipient "
                        "user, skip .forward, submitting")
            self._submit(node, action)
            return
        node.forwarded = True
        answer = yield ReadForward(user, home, uid, gid)
        self._forward(node, action, answer)

    def _forward(self, node: Node, action, answer) -> None:
        """lka_session_forward_reply and forward.c forwards_get."""
        user = node.value
        status = answer.status if isinstance(answer, FileAnswer) else "tempfail"
        if status == "permfail":
            self._trace("expand: ~/.forward failed for user %s", user)
            raise self._expansion_failed(temporary=False)
        if status not in ("ok", "absent"):
            raise self._expansion_failed(temporary=True)
        added = 0
        if status == "ok" and answer.content:
            if len(answer.content.encode("utf-8", "surrogateescape")) >= MAX_FORWARD_SIZE:
                log.info("info: forward file exceeds max size")
                raise self._expansion_failed(temporary=True)
            before = self._count
            for line in file_lines(answer.content):
                try:
                    targets = parse_line(line, includes=False)
                except LineError:
                    log.info("info: parse error in forward file")
                    raise self._expansion_failed(temporary=True) from None
                for target in targets:
                    self._insert(target, parent=node, action=action)
                if self._count - before > MAX_FORWARD_NODES:
                    log.info("info: forward file expanded too many nodes")
                    raise self._expansion_failed(temporary=True)
            added = self._count - before
        if added:
            return
        what = "no" if status == "absent" else "empty"
        if action.method == "forward-only":
            self._trace("expand: %s .forward for user %s on forward-only rule", what, user)
            raise self._expansion_failed(temporary=True)
        if action.method == "expand-only":
            self._trace("expand: %s .forward for user %s and no default action on rule", what, user)
            raise self._expansion_failed(temporary=False)
        self._trace("expand: %s .forward for user %s, just deliver", what, user)
        self._submit(node, action)

    def _file_or_command(self, node: Node) -> None:
        parent, action = node.parent, node.action
        if parent is not None and parent.realuser and parent.realuser_uid == 0:
            self._trace("expand: %s not allowed in root's forward", node.type)
            raise self._tempfail()
        if action.method == "forward-only":
            self._trace("expand: %s matched on forward-only rule", node.type)
            raise self._tempfail()
        self._trace("expand: lka_expand: %s: %s [depth=%d]", node.type, node.value, node.depth)
        self._submit(node, action)

    def _error(self, node: Node) -> None:
        if node.action.method == "forward-only":
            self._trace("expand: error matched on forward-only rule")
            raise self._tempfail()
        self._trace("expand: lka_expand: error: %s [depth=%d]", node.value, node.depth)
        code, text = int(node.value[:3]), node.value[4:]
        head = text.split(" ", 1)[0]
        parts = head.split(".")
        if not (len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] == str(code)[0]):
            text = f"{str(code)[0]}.0.0 {text}"          # RFC 2034: every reply has one
        raise _Fail(code, f"{text}: {self._rcpt()}")

    # -- table lookups (aliases.c) ----------------------------------------------------

    def _lookup_targets(self, table: str, key: str):
        """One alias/virtual lookup: the targets, None if absent, or TEMPFAIL (a failed
        lookup or a value that does not parse, as table_parse_lookup)."""
        value = yield TableLookup(table.strip("<>"), "alias", key)
        if value is TEMPFAIL or not value:
            return value or None
        text = value if isinstance(value, str) else ",".join(value)
        try:
            return parse_line(text, includes=True)
        except LineError as exc:
            log.warning("warn: table %s: entry %s: %s", table, key, exc)
            return TEMPFAIL

    def _alias(self, action, node: Node):
        """aliases_get: ``user+tag``, then ``user``."""
        name = node.value.lower()
        keys = [name]
        if self.delim in name:
            keys.append(name.partition(self.delim)[0])
        return (yield from self._first_found(action.alias, keys, node, action))

    def _virtual(self, action, node: Node, user: str, domain: str):
        """aliases_virtual_get: the address with and without its tag, the user part
        with and without it, then the catch-alls ``@domain`` and ``@``."""
        user, domain = user.lower(), domain.lower()
        plain, _, tag = user.partition(self.delim)
        keys = []
        if tag:
            keys.append(f"{plain}{self.delim}{tag}@{domain}")
        keys.append(f"{plain}@{domain}")
        if tag:
            keys.append(f"{plain}{self.delim}{tag}")
        keys.append(plain)
        if domain:
            keys += [f"@{domain}", "@"]
        return (yield from self._first_found(action.virtual, keys, node, action))

    def _first_found(self, table: str, keys: list[str], node: Node, action):
        """The number of targets the first key found adds (an :include: counts one
        when its file could be read), 0 when no key is found, or TEMPFAIL."""
        for key in dict.fromkeys(keys):
            targets = yield from self._lookup_targets(table, key)
            if targets is TEMPFAIL:
                return TEMPFAIL
            if targets is None:
                continue
            self._trace("expand: lka_expand: expanded %s to %s [depth=%d]", key,
                        ", ".join(t.value for t in targets), node.depth)
            count = 0
            for target in sorted(set(targets), key=lambda t: (_TYPE_ORDER[t.type], t.value)):
                if target.type == INCLUDE:
                    count += yield from self._include(target.value, node, action)
                else:
                    self._insert(target, parent=node, action=action)
                    count += 1
            return count
        return 0

    def _include(self, path: str, node: Node, action):
        """aliases_expand_include: the file's targets join the expansion; a file that
        cannot be read adds nothing (and counts nothing), a bad line is skipped."""
        answer = yield ReadInclude(path)
        if not isinstance(answer, FileAnswer) or answer.status != "ok":
            log.warning('warn: failed to open include file "%s".', path)
            return 0
        for line in file_lines(answer.content):
            try:
                targets = parse_line(line, includes=False)
            except LineError as exc:
                self._trace("expand: include %s: %s", path, exc)
                continue
            for target in targets:
                self._insert(target, parent=node, action=action)
        return 1

    # -- lka_submit -------------------------------------------------------------------

    def _submit(self, node: Node, action) -> None:
        env = Envelope(**{f: getattr(self.base, f) for f in self.base.__struct_fields__})
        env.flags = list(self.base.flags)
        env.dispatcher = action.name
        if action.method == "relay":
            env.type, env.dest = "mta", node.value
        else:
            env.type = "mda"
            env.dest = (node if node.type == ADDRESS else node.ancestor(ADDRESS)).value
            if node.type == USERNAME:
                env.mda_user, env.mda_subaddress = node.value, node.subaddress
            else:
                parent = node.parent
                env.mda_user = parent.value if parent.realuser else self.smtpd_user
                if node.type == FILTER:
                    env.mda_method, env.mda_exec = "exec", node.value
                    if not parent.realuser:
                        log.warning("warn: commands executed from aliases run with %s privileges",
                                    self.smtpd_user)
                else:
                    env.mda_method, env.mda_file = "file", node.value
        self._trace("expand: envelope for %s: %s, action %s%s", self.base.rcpt, env.dest, action.name,
                    f", user {env.mda_user}" if env.mda_user else "")
        self._envelopes.append(env)
