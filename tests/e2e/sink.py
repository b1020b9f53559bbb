"""A remote MX for the tests: an aiosmtpd server on 127.0.0.1 that records
every transaction (and can refuse recipients or be stopped and restarted)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller


@dataclass
class Transaction:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: tuple = ()         # (address, port) of the client: one per connection


@dataclass
class SinkHandler:
    transactions: list[Transaction] = field(default_factory=list)
    reject_rcpt: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server, session, envelope, address, options):
        if address in self.reject_rcpt:
            return self.reject_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.transactions.append(Transaction(envelope.mail_from, list(envelope.rcpt_tos),
                                                 envelope.original_content, tuple(session.peer)))
        return "250 2.0.0 Ok: queued"


class Sink:
    def __init__(self, port: int) -> None:
        self.port = port
        self.handler = SinkHandler()
        self.controller: Controller | None = None

    def start(self) -> "Sink":
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     ready_timeout=10)
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
