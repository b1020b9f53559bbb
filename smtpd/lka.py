"""The lookup agent (``smtpd: lka``): tables, rules, expansion, DNS.

For each RCPT pony asks lka which rule matches; lka expands the recipient into
envelopes and submits them straight to the queue (as OpenSMTPD does), or answers
pony with the SMTP error.  The expansion (smtpd/expand.py) asks for what it needs;
``ExpansionDriver`` answers it from the rules and tables, and from the parent for
users' .forward and :include: files (lka_session.c's IMSG_LKA_OPEN_FORWARD), awaiting
each.  At delivery time it answers user and DNS lookups.  It checks AUTH credentials
against tables (the parent checks system accounts) and which senders an
authenticated user may use (smtpd/auth.py).

lka owns the tables (smtpd/table/): it opens them after its privilege drop, on
CONF_END as OpenSMTPD's lka does (file tables were read by the parent while parsing;
db files are opened and table programs started here, as smtpd's user), and reloads
one on ``smtpctl update table``.  Code that still looks tables up synchronously
(credentials, senders) runs in a worker thread when some table must be
awaited (a proc table), so the event loop never waits for a table program.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import socket

import dns.exception
import dns.resolver
import msgspec

from common import privsep
from common.ipc import PeerTimeout
from common.messages import (
    CtlReply, CtlRequest, CtlUpdateTable, LkaEnvelopesSubmit, LkaOpenForward,
    LkaOpenForwardReply, MdaLookupUserinfo, MdaLookupUserinfoReply, MtaCredentialsReply,
    MtaDnsLookup, MtaDnsReply, MtaHeloReply, MtaLookupCredentials, MtaLookupHelo,
    MtaLookupSource, MtaSourceReply, SmtpAuthenticate, SmtpAuthenticateReply,
    SmtpCheckSender, SmtpCheckSenderReply, SmtpExpandRcpt, SmtpExpandRcptReply,
)
from common.vis import COMMAND, log_text
from smtpd import auth, filter_builtin, filter_proc
from smtpd.dns import NullMx, Resolver
from smtpd.expand import (
    TEMPFAIL, ExpandResult, Expansion, FileAnswer, MatchRule, ReadForward, ReadInclude, TableLookup,
)
from smtpd.ruleset import MatchContext, match, match_async
from smtpd.table import TableSet, TableUnavailable
from smtpd.table.services import parse_userinfo
from smtpd.ttl_cache import TtlCache

log = logging.getLogger("smtpd")

FILE_TIMEOUT = 60.0      # a .forward on a hung NFS home: the RCPT fails temporarily
FORWARD_CACHE_TTL = 5.0  # seconds a user's .forward (its text, or that it has none) is kept


def prepare(opts, config) -> None:
    """libcrypt, for the password hashes of credentials tables, while still privileged.
    The tables are opened after the drop (Process.start)."""
    auth.load_libcrypt()


class Process:
    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.tables = TableSet(self.config)
        self.resolver = Resolver(self.config.mta_resolver, self.config.mta_resolver_port)
        self.tasks: set[asyncio.Task] = set()
        fd = getattr(ctx.opts, "fd_channel", -1)
        channel = socket.socket(fileno=fd) if fd is not None and fd >= 0 else None
        self.filters = filter_proc.Runtime(ctx, channel, self._builtin_filter())
        self.smtpd_user = _unprivileged_user()
        # (user, home, uid, gid) -> the parent's answer for that .forward, "ok" or
        # "absent" only: a burst of mail to one user asks the parent once, not once a
        # recipient (docs/expansion.md); forgotten at a reload
        self.forwards = TtlCache(FORWARD_CACHE_TTL)

    def _builtin_filter(self):
        """smtpd/filter_builtin.py's matches(spec, phase, facts, tables, param): whether a
        builtin filter's condition holds (the chain applies its action), with this
        process's tables, asked synchronously (the filter engine is sans I/O)."""
        return lambda spec, phase, facts, param: filter_builtin.matches(
            spec, phase, facts, _SyncTables(self.tables), param)

    async def start(self) -> None:
        pass

    async def on_conf_end(self) -> None:
        """lka.c on IMSG_CONF_END: table_open_all (db files, table programs), then the
        filter processes (lka_filter.c: lka serves once they have registered)."""
        await self.tables.open()
        await self.filters.start()

    async def stop(self) -> None:
        self.filters.stop()
        for task in list(self.tasks):
            task.cancel()
        await self.tables.close()

    # -- configuration reload (smtpd/reload.py): the parent re-read the table files -----------

    async def prepare_config(self, config, msg) -> TableSet:
        if filter_proc.filters_changed(self.config, config):
            # the running processes and their sessions belong to the old lines
            raise ValueError("filter or proc statements changed: restart smtpd to apply them")
        tables = TableSet(config)
        await tables.open()
        return tables

    async def apply_config(self, config, tables: TableSet) -> None:
        old, self.config, self.tables = self.tables, config, tables
        self.resolver = Resolver(config.mta_resolver, config.mta_resolver_port)
        self.forwards.clear()
        await old.close()

    async def abort_config(self, tables: TableSet) -> None:
        await tables.close()

    async def _sync(self, func, *args):
        """``func(*args)``, a synchronous caller of the tables: inline when every table
        answers at once, else in a worker thread, where a proc table's answer is waited
        for without blocking the event loop (smtpd/table/base.py BlockingTable)."""
        if self.tables.blocking:
            return await asyncio.to_thread(func, *args)
        return func(*args)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def handle(self, peer: str, msg) -> None:
        if peer == "pony" and await self.filters.handle(peer, msg):
            return
        match msg:
            case SmtpExpandRcpt():
                # in a task: an expansion may wait for the parent (a .forward)
                self._spawn(self._expand(msg))
            case MdaLookupUserinfo():
                await self.ctx.mesh.send(peer, await self._userinfo(msg))
            case CtlUpdateTable() if peer == "control":
                self._spawn(self._update_table(peer, msg))
            case MtaDnsLookup():
                self._spawn(self._dns(peer, msg))
            case SmtpAuthenticate() if peer == "pony":
                self._spawn(self._authenticate(msg))
            case SmtpAuthenticateReply() if peer == "parent":
                await self.ctx.mesh.send("pony", msg)
            case CtlRequest(command="show filters"):
                await self.ctx.mesh.send(peer, CtlReply(reqid=msg.reqid, ok=True,
                                                        text=json.dumps(self.filters.status())))
            case SmtpCheckSender() if peer == "pony":
                result = await self._sync(auth.sender_allowed, self.tables.get(msg.table), msg.user,
                                          msg.sender, self.config.sub_addr_delim)
                await self.ctx.mesh.send(peer, SmtpCheckSenderReply(
                    reqid=msg.reqid, ok=result == "ok", result=result))
            case MtaLookupCredentials() if peer == "pony":
                self._spawn(self._send_credentials(peer, msg))
            case MtaLookupSource() | MtaLookupHelo() if peer == "pony":
                self._spawn(self._send_relay_source(peer, msg))
            case _:
                log.warning("warn: lka: unexpected %s from %s", type(msg).__name__, peer)

    async def _send_relay_source(self, peer: str, req: MtaLookupSource | MtaLookupHelo) -> None:
        """lka.c IMSG_MTA_LOOKUP_SOURCE (fetch of the ``source`` service: the table's
        next address) and IMSG_MTA_LOOKUP_HELO (``addrname`` lookup of a source)."""
        is_source = isinstance(req, MtaLookupSource)
        what = "source address" if is_source else "helo"
        status, value = "tempfail", ""
        if req.table not in self.config.tables:
            log.warning("warn: %s table %s missing", what, req.table)
        else:
            table = self.tables.get(req.table)
            try:
                found = await (table.fetch("source") if is_source
                               else table.lookup("addrname", req.address))
                status, value = ("ok", found) if found else ("permfail", "")
            except (TableUnavailable, OSError) as exc:
                log.warning("warn: %s lookup fail for %s: %s", what, req.table, exc)
        reply = (MtaSourceReply(reqid=req.reqid, status=status, address=value) if is_source
                 else MtaHeloReply(reqid=req.reqid, status=status, name=value))
        await self.ctx.mesh.send(peer, reply)

    async def _send_credentials(self, peer: str, req: MtaLookupCredentials) -> None:
        await self.ctx.mesh.send(peer, await self._credentials(req))

    async def _credentials(self, req: MtaLookupCredentials) -> MtaCredentialsReply:
        """lka_credentials: a relay's user and password from a credentials table
        (table.c K_CREDENTIALS: "user:password"; no colon: the label is the user)."""
        if req.table not in self.config.tables:
            log.warning("warn: credentials table %s missing", req.table)
            return MtaCredentialsReply(reqid=req.reqid, status="tempfail")
        try:
            value = await self.tables.get(req.table).lookup("credentials", req.label)
        except (TableUnavailable, OSError) as exc:      # a table that cannot answer now
            log.warning("warn: credentials lookup fail for %s:%s: %s", req.table,
                        log_text(req.label), log_text(str(exc), COMMAND))
            return MtaCredentialsReply(reqid=req.reqid, status="tempfail")
        if value is None:
            log.warning("warn: credentials not found for %s:%s", req.table, log_text(req.label))
            return MtaCredentialsReply(reqid=req.reqid, status="permfail")
        user, colon, password = str(value).partition(":")
        if not colon:
            user, password = req.label, str(value)
        if len(str(value)) < 3 or not user or not password:
            log.warning("warn: credentials parse error for %s:%s", req.table, log_text(req.label))
            return MtaCredentialsReply(reqid=req.reqid, status="tempfail")
        return MtaCredentialsReply(reqid=req.reqid, status="ok", user=user, password=password)

    async def _authenticate(self, req: SmtpAuthenticate) -> None:
        """lka_authenticate; system accounts (no table) are the parent's to check."""
        if req.table is None:
            await self.ctx.mesh.send("parent", req)
            return
        if req.table not in self.config.tables:
            log.warning("warn: could not find table %s needed for authentication", req.table)
            result = "tempfail"
        else:
            # bcrypt and crypt(3) are slow by design: off the event loop
            result = await asyncio.to_thread(auth.authenticate_with_table,
                                             self.tables.get(req.table), req.user, req.password)
        await self.ctx.mesh.send("pony", SmtpAuthenticateReply(reqid=req.reqid, result=result))

    async def _expand(self, req: SmtpExpandRcpt) -> None:
        send = self.ctx.mesh.send
        if req.auth_user and not req.envelope.username:
            # the envelope records who authenticated (OpenSMTPD's evp.username), which
            # `match auth` and `from auth` rules look at
            req.envelope = msgspec.structs.replace(req.envelope, username=req.auth_user)
        try:
            result = await ExpansionDriver(self, req).run()
        except Exception:
            # a fault of ours is a temporary failure, never a 5xx
            log.exception("warn: lka: expansion of <%s> failed", log_text(req.envelope.rcpt))
            result = ExpandResult(error=(451, "4.3.0 Temporary failure"))
        if result.error is not None:
            code, text = result.error
            await send("pony", SmtpExpandRcptReply(reqid=req.reqid, code=code, text=text))
            return
        # every envelope and the end of the RCPT in one message (one wake-up of the queue)
        await send("queue", LkaEnvelopesSubmit(reqid=req.reqid, msgid=req.msgid,
                                               envelopes=result.envelopes))

    async def _userinfo(self, req: MdaLookupUserinfo) -> MdaLookupUserinfoReply:
        """lka_userinfo: a userbase table's ``uid:gid:home``, or the system's (getpwnam,
        answered here: lka may read the user database, the delivery side may not)."""
        try:
            value = await self.tables.get(req.table or "getpwnam").lookup("userinfo", req.user.lower())
            if value is None:
                return MdaLookupUserinfoReply(reqid=req.reqid, status="notfound")
            uid, gid, home = parse_userinfo(req.user, value)
        except TableUnavailable:
            return MdaLookupUserinfoReply(reqid=req.reqid, status="tempfail")
        except ValueError as exc:
            log.warning("warn: lka: table %s: bad userinfo for %s: %s", req.table or "getpwnam",
                        log_text(req.user), exc)
            return MdaLookupUserinfoReply(reqid=req.reqid, status="tempfail")
        return MdaLookupUserinfoReply(reqid=req.reqid, status="ok", uid=uid, gid=gid, home=home)

    async def _update_table(self, peer: str, req: CtlUpdateTable) -> None:
        """``smtpctl update table NAME`` (lka.c IMSG_CTL_UPDATE_TABLE): smtpctl prints
        OpenSMTPD's bare ``command failed``; the reason is in the log."""
        if req.name not in self.config.tables:
            log.warning("warn: Lookup table not found: \"%s\"", log_text(req.name))
            problem = "not found"
        else:
            problem = await self.tables.update(req.name)
            if problem is not None:
                log.warning("warn: table %s: update failed: %s", req.name, log_text(problem))
        await self.ctx.mesh.send(peer, CtlReply(reqid=req.reqid, ok=problem is None))

    async def _dns(self, peer: str, req: MtaDnsLookup) -> None:
        try:
            if req.kind == "ptr":
                hosts = [(0, await self.resolver.ptr(req.name), req.name)]
            elif req.kind == "mx":
                hosts = await self.resolver.mx(req.name)
            else:
                hosts = [(0, req.name, a) for a in await self.resolver.addresses(req.name)]
            reply = MtaDnsReply(reqid=req.reqid, status="ok" if hosts else "tempfail", hosts=hosts,
                                error="" if hosts else ("No MX found for domain" if req.kind == "mx" else "Host not found"))
        except dns.resolver.NXDOMAIN:
            reply = MtaDnsReply(reqid=req.reqid, status="permfail", error="Domain does not exist")
        except NullMx:
            reply = MtaDnsReply(reqid=req.reqid, status="permfail", error="Domain does not accept mail")
        except (dns.exception.DNSException, OSError) as exc:
            # the name comes from a client's address or from DNS, the error may quote either
            log.info("smtp-out: Failed to resolve %s for %s: %s", req.kind.upper(),
                     log_text(req.name), log_text(str(exc), COMMAND))
            reply = MtaDnsReply(reqid=req.reqid, status="tempfail",
                                error="Temporary failure in MX lookup" if req.kind == "mx" else "Host not found")
        await self.ctx.mesh.send(peer, reply)


class _SyncTables:
    """The table set as builtin filters ask it: ``get(name).check(service, key, regex)``
    answered at once (``check_now``).  A table that must be awaited (a proc table:
    ``blocking``) cannot be asked from the event loop's thread
    without waiting on itself: for a builtin filter it finds nothing, and says so once."""

    warned: set[str] = set()

    def __init__(self, tables) -> None:
        self.tables = tables

    def get(self, name: str):
        table = self.tables.get(name)
        if table.blocking:
            if name not in self.warned:
                self.warned.add(name)
                log.warning("warn: filter: table %s cannot be used by a builtin filter "
                            "(its answers must be awaited): nothing matches in it", name)
            return _Nothing()
        return _Now(table)


class _Now:
    __slots__ = ("table",)

    def __init__(self, table) -> None:
        self.table = table

    def check(self, service: str, key: str, regex: bool = False) -> bool:
        return self.table.check_now(service, key, regex)


class _Nothing:
    @staticmethod
    def check(service: str, key: str, regex: bool = False) -> bool:
        return False

async def lookup_table(tables: TableSet, table: str, service: str, key: str):
    """Where an expansion's lookups reach a table that must be awaited (a proc table's
    program may take its time; ExpansionDriver.answer_now asks the others at once):
    the value, None, or TEMPFAIL."""
    try:
        return await tables.get(table).lookup(service, key)
    except TableUnavailable:
        return TEMPFAIL


def _unprivileged_user() -> str:
    """Who runs commands and writes files named in aliases tables (OpenSMTPD's
    SMTPD_USER): lka's own user, ``_smtpd`` when started as root."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return privsep.SMTPD_USER


_AWAIT = object()        # ExpansionDriver.answer_now: this answer must be awaited


def _forward_key(request: ReadForward) -> tuple[str, str, int, int]:
    return request.user, request.home, request.uid, request.gid


class ExpansionDriver:
    """Runs one recipient's Expansion: answers its requests from the configuration,
    the tables and the parent, until it has a result."""

    MAX_REQUESTS = 10000     # far above what MAX_NODES allows: a bound, not a limit

    def __init__(self, lka: Process, req: SmtpExpandRcpt) -> None:
        self.lka, self.req = lka, req
        self.config, self.tables = lka.config, lka.tables
        self.expansion = Expansion(req.envelope, self.config.actions,
                                   sub_addr_delim=self.config.sub_addr_delim,
                                   smtpd_user=lka.smtpd_user)

    async def run(self) -> ExpandResult:
        for _ in range(self.MAX_REQUESTS):
            request = self.expansion.next_request()
            if request is None:
                break
            answer = self.answer_now(request)
            if answer is _AWAIT:
                answer = await self.answer(request)
            self.expansion.feed(answer)
        if self.expansion.result is None:
            raise RuntimeError("expansion did not finish")
        return self.expansion.result

    def answer_now(self, request):
        """The answer of a rule match or table lookup whose tables all answer at once
        (every backend but proc tables), or of a .forward lka has kept, without a
        coroutine per question; _AWAIT when it must be awaited.  Same answers, same
        trace lines as ``answer``."""
        try:
            if isinstance(request, MatchRule):
                if self.tables.blocking:
                    return _AWAIT
                return match(self.config, self.tables, self._context(request))
            if isinstance(request, ReadForward):
                return self.lka.forwards.get(_forward_key(request)) or _AWAIT
            if isinstance(request, TableLookup):
                table = self.tables.get(request.table)
                if table.blocking:
                    return _AWAIT
                return table.lookup_now(request.service, request.key)
        except TableUnavailable:
            return TEMPFAIL
        return _AWAIT

    async def answer(self, request):
        match request:
            case MatchRule():
                return await self._match(request)
            case TableLookup():
                return await lookup_table(self.tables, request.table, request.service, request.key)
            case ReadForward():
                answer = await self._read_file(LkaOpenForward(
                    reqid=self.lka.ctx.new_id(), kind="forward", user=request.user,
                    home=request.home, uid=request.uid, gid=request.gid))
                if answer.status in ("ok", "absent"):
                    # not a failure: the parent logs each of those, and a tempfail is retried
                    self.lka.forwards.put(_forward_key(request), answer)
                return answer
            case ReadInclude():
                return await self._read_file(LkaOpenForward(
                    reqid=self.lka.ctx.new_id(), kind="include", path=request.path))
        raise TypeError(f"unknown expansion request {request!r}")

    def _context(self, request: MatchRule) -> MatchContext:
        base, req = self.req.envelope, self.req
        return MatchContext(
            source="local" if request.internal else base.sockaddr.strip("[]"), rdns=req.rdns or None,
            helo=base.helo, mail_from=base.sender, rcpt=request.address, tag=base.tag or None,
            auth_user=base.username or None, tls=req.tls,
            local_listener=request.internal or req.local_listener)

    async def _match(self, request: MatchRule):
        try:
            return await match_async(self.config, self.tables, self._context(request))
        except TableUnavailable:
            return TEMPFAIL

    async def _read_file(self, msg: LkaOpenForward) -> FileAnswer:
        try:
            reply = await self.lka.ctx.mesh.request("parent", msg, (LkaOpenForwardReply,),
                                                    timeout=FILE_TIMEOUT)
        except PeerTimeout as exc:
            log.warning("warn: lka: %s", exc)
            return FileAnswer("tempfail")
        return FileAnswer(reply.status, reply.content)
