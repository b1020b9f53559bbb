"""Configuration reload (SIGHUP, ``smtpctl reload``): a pysmtpd addition.

OpenSMTPD has none (SIGHUP is fatal there); admins need one for certificate
renewal, table changes and listeners (reference/admin-asks.md 4).  The protocol
is a two-phase commit driven by the parent, so a reload is applied everywhere or
nowhere:

1. The parent re-reads the file (and its includes and table files) as root,
   checks it as ``smtpd -n`` would, and binds the listeners it adds.  Any error:
   logged, and the daemon keeps running on the current configuration.
2. prepare: every child gets the parsed model (conf_reload_prepare) and builds
   what it needs from it (lka its tables, pony its listening sockets, received
   over the fd channel, and its TLS contexts from the certificates and keys the
   parent read, sent to pony alone) without using it yet; each answers ok or why not.
3. commit (all ok) or abort (any failure or silence): each child swaps the new
   configuration in, or drops it.  The parent then closes the sockets of removed
   listeners.

Why the model crosses a channel here, when at start every process parses the
file itself: after the privilege drop the children can no longer read files only
root can read (a 0600 smtpd.conf, a secrets table) and, chrooted, cannot see
them at all.  The parent sends what it validated, so every process applies the
very same configuration, without a race against an editor saving the file.

Mail in the queue is not touched: envelopes name their action, which is looked
up in the configuration in force when they are delivered (docs/ops.md).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time

from common.ids import UidGenerator
from common.ipc import PeerTimeout
from common.messages import ConfReloadAbort, ConfReloadCommit, ConfReloadPrepare, ConfReloadReply
from smtpd import fdpass, listeners
from smtpd.config import ConfigError, decode_config, encode_config
from smtpd.tls import read_tls_files

log = logging.getLogger("smtpd")

PREPARE_TIMEOUT = 10.0
COMMIT_TIMEOUT = 10.0


class Reloader:
    """The parent's side.  ``parent`` provides opts, config, bound (listeners.Bound
    list), mesh, children (names), fd_channel, notifier and status_text()."""

    def __init__(self, parent, load_config) -> None:
        self.parent = parent
        self.load_config = load_config
        self.lock = asyncio.Lock()
        self.generation = 0
        self.new_id = UidGenerator()

    async def reload(self, origin: str) -> tuple[bool, str]:
        """Reload from the configuration file; (ok, text for smtpctl)."""
        async with self.lock:
            p = self.parent
            p.notifier.notify(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000,
                              STATUS="reloading configuration")
            log.info("info: smtpd: reloading configuration from %s (%s)", p.opts.config, origin)
            try:
                ok, text = await self._reload()
            except Exception as exc:              # a bug: keep serving, say so
                log.exception("warn: smtpd: reload failed")
                ok, text = False, f"internal error: {exc}"
            if ok:
                log.info("info: smtpd: configuration reloaded: %s", text)
                p.notifier.ready(p.status_text())
            else:
                log.error("warn: smtpd: reload failed, keeping the current configuration: %s", text)
                p.notifier.ready(f"reload failed ({text}); {p.status_text()}")
            return ok, text

    async def _reload(self) -> tuple[bool, str]:
        p = self.parent
        try:
            config = await asyncio.to_thread(self.load_config, p.opts)
            # pony can no longer read the keys (smtpd/tls.py): it gets their contents
            tls_files = await asyncio.to_thread(read_tls_files, config)
            plan = listeners.plan(config, p.bound)
            added = listeners.bind_planned(config, plan)
        except ConfigError as exc:
            return False, str(exc)
        self.generation += 1
        generation = self.generation
        serve = [(b.sock, index) for b, index in plan.keep] + [(b.sock, b.index) for b in added]
        try:
            fdpass.send_sockets(p.fd_channel, generation, [s for s, _ in serve])
        except OSError as exc:
            self._close(added)
            return False, f"cannot pass the listening sockets to pony: {exc.strerror}"
        data = encode_config(config)
        replies = await self._ask_all(lambda name: ConfReloadPrepare(
            reqid=self.new_id(), generation=generation, config=data,
            listeners=[i for _, i in serve] if name == "pony" else [],
            tls_files=tls_files if name == "pony" else {}), PREPARE_TIMEOUT)
        failures = _failures(replies)
        if failures:
            for name in p.children:
                await p.mesh.send(name, ConfReloadAbort(generation=generation))
            self._close(added)
            return False, "; ".join(failures)
        replies = await self._ask_all(lambda name: ConfReloadCommit(
            reqid=self.new_id(), generation=generation), COMMIT_TIMEOUT)
        failures = _failures(replies)
        # From here the children run the new configuration (those that failed to
        # apply it said why, and keep the old one): the parent follows.
        for bound, index in plan.keep:
            bound.index = index
        p.bound = [b for b, _ in plan.keep] + added
        p.config = config
        self._close(plan.close)
        for note in config.not_applied:
            log.warning("warn: %s", note)
        if failures:
            return False, "applied, but " + "; ".join(failures) + " (restart smtpd)"
        return True, _summary(plan, added)

    async def _ask_all(self, make, timeout: float) -> dict[str, ConfReloadReply | str]:
        p = self.parent

        async def ask(name: str):
            try:
                return await p.mesh.request(name, make(name), (ConfReloadReply,), timeout=timeout)
            except PeerTimeout as exc:
                return str(exc)

        names = list(p.children)
        results = await asyncio.gather(*(ask(n) for n in names))
        return dict(zip(names, results))

    @staticmethod
    def _close(bound: list[listeners.Bound]) -> None:
        for b in bound:
            b.sock.close()


def _failures(replies: dict) -> list[str]:
    out = []
    for name, reply in replies.items():
        if isinstance(reply, str):
            out.append(f"{name}: {reply}")
        elif not reply.ok:
            out.append(f"{name}: {reply.error}")
    return out


def _summary(plan: listeners.Plan, added: list[listeners.Bound]) -> str:
    parts = [f"{len(plan.keep) + len(added)} listening socket(s)"]
    if added:
        parts.append("added " + ", ".join(listeners.key_text(b.key) for b in added))
    if plan.close:
        parts.append("removed " + ", ".join(listeners.key_text(b.key) for b in plan.close))
    return "; ".join(parts)


# --- the children's side ---------------------------------------------------------------

CHILD_MESSAGES = (ConfReloadPrepare, ConfReloadCommit, ConfReloadAbort)

# generation -> (config, what the process prepared from it)
_pending: dict[int, tuple[object, object]] = {}


async def _maybe_await(value):
    return await value if inspect.isawaitable(value) else value


async def on_child_message(ctx, process, peer: str, msg) -> None:
    """A child's handling of the reload messages.  A process may define
    ``prepare_config(config, msg) -> pending`` (may raise: the reload is aborted),
    ``apply_config(config, pending)`` (must not fail) and ``abort_config(pending)``;
    one that defines none and has a ``config`` attribute just gets the new model."""
    send = ctx.mesh.send
    if isinstance(msg, ConfReloadPrepare):
        for old in list(_pending):
            await _abort(process, old)
        try:
            config = decode_config(msg.config)
            prepare = getattr(process, "prepare_config", None)
            pending = await _maybe_await(prepare(config, msg)) if prepare else None
        except Exception as exc:
            log.error("warn: %s: cannot apply the new configuration: %s", ctx.name, exc)
            await send(peer, ConfReloadReply(reqid=msg.reqid, proc=ctx.name, ok=False,
                                             error=str(exc) or type(exc).__name__))
            return
        _pending[msg.generation] = (config, pending)
        await send(peer, ConfReloadReply(reqid=msg.reqid, proc=ctx.name, ok=True))
    elif isinstance(msg, ConfReloadCommit):
        item = _pending.pop(msg.generation, None)
        if item is None:
            await send(peer, ConfReloadReply(reqid=msg.reqid, proc=ctx.name, ok=False,
                                             error="no configuration pending"))
            return
        config, pending = item
        ctx.config = config
        try:
            apply = getattr(process, "apply_config", None)
            if apply is not None:
                await _maybe_await(apply(config, pending))
            elif hasattr(process, "config"):
                process.config = config
        except Exception as exc:
            log.exception("warn: %s: error applying the new configuration", ctx.name)
            await send(peer, ConfReloadReply(reqid=msg.reqid, proc=ctx.name, ok=False, error=str(exc)))
            return
        log.debug("debug: %s: configuration reloaded", ctx.name)
        await send(peer, ConfReloadReply(reqid=msg.reqid, proc=ctx.name, ok=True))
    elif isinstance(msg, ConfReloadAbort):
        await _abort(process, msg.generation)


async def _abort(process, generation: int) -> None:
    item = _pending.pop(generation, None)
    abort = getattr(process, "abort_config", None)
    if item is not None and abort is not None:
        await _maybe_await(abort(item[1]))
