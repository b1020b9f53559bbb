"""A remote MX for the tests: an aiosmtpd server on 127.0.0.1 that records
every transaction (and can refuse recipients or be stopped and restarted; with
``dsn=True`` it advertises DSN and records the DSN parameters it is given)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

_DSN_PARAMS = ("RET", "ENVID", "NOTIFY", "ORCPT")


@dataclass
class Transaction:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: tuple = ()         # (address, port) of the client: one per connection
    dsn_params: list[str] = field(default_factory=list)   # as sent, MAIL's then each RCPT's
    helo: str = ""           # the name the client gave in EHLO/HELO


@dataclass
class SinkHandler:
    transactions: list[Transaction] = field(default_factory=list)
    reject_rcpt: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    dsn: bool = False

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.dsn:
            responses.insert(-1, "250-DSN")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, options):
        if address in self.reject_rcpt:
            return self.reject_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.transactions.append(Transaction(envelope.mail_from, list(envelope.rcpt_tos),
                                                 envelope.original_content, tuple(session.peer),
                                                 list(getattr(server, "dsn_seen", [])),
                                                 session.host_name or ""))
            if hasattr(server, "dsn_seen"):
                server.dsn_seen = []
        return "250 2.0.0 Ok: queued"


class DsnSMTP(SMTP):
    """aiosmtpd refuses parameters it does not know: keep the DSN ones aside."""

    def _strip(self, arg):
        if not hasattr(self, "dsn_seen"):
            self.dsn_seen = []
        if not arg or ">" not in arg:
            return arg
        head, _, params = arg.partition(">")
        kept = []
        for word in params.split():
            (self.dsn_seen if word.split("=")[0].upper() in _DSN_PARAMS else kept).append(word)
        return head + ">" + (" " + " ".join(kept) if kept else "")

    async def smtp_MAIL(self, arg):
        self.dsn_seen = []
        await super().smtp_MAIL(self._strip(arg))

    async def smtp_RCPT(self, arg):
        await super().smtp_RCPT(self._strip(arg))


class DsnController(Controller):
    def factory(self):
        return DsnSMTP(self.handler, **self.SMTP_kwargs)


class Sink:
    """``ssl_context``: TLS from the first byte (smtps); ``smtp_kwargs`` go to aiosmtpd's
    SMTP (``tls_context`` offers STARTTLS, ``authenticator``, ``auth_required``...)."""

    def __init__(self, port: int, dsn: bool = False, ssl_context=None, **smtp_kwargs) -> None:
        self.port = port
        self.handler = SinkHandler(dsn=dsn)
        self.controller: Controller | None = None
        self.ssl_context = ssl_context
        self.smtp_kwargs = smtp_kwargs

    def start(self) -> "Sink":
        cls = DsnController if self.handler.dsn else Controller
        self.controller = cls(self.handler, hostname="127.0.0.1", port=self.port,
                              ready_timeout=10, ssl_context=self.ssl_context, **self.smtp_kwargs)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    @property
    def transactions(self) -> list[Transaction]:
        with self.handler.lock:
            return list(self.handler.transactions)
