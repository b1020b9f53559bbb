"""The metrics endpoint (a pysmtpd addition, off by default): ``show stats`` for Prometheus.

Enabled by ``metrics listen on 127.0.0.1 port 9025`` in smtpd.conf (docs/config.md);
the address must be a loopback one, since the counters are served to anyone who can
connect.  control binds the socket while still privileged (``bind``) and serves it
on its event loop: each ``GET /metrics`` gathers the counters of every process as
``show stats`` does (smtpd/stat_backend.py) and answers them in the Prometheus text
format, written by the prometheus-client library (format negotiated from the
request's Accept header, as the library's own server does).

Names: ``smtpd_`` + OpenSMTPD's key with every character outside ``[a-zA-Z0-9_]``
made ``_`` (``smtp.session`` -> ``smtpd_smtp_session``), all gauges (OpenSMTPD's
counters go up and down), the key itself in the HELP text; ``uptime`` becomes
``smtpd_uptime_seconds``.  Keys exist once touched, as in ``show stats``.

The HTTP side is deliberately small: one request per connection, a request head of
at most 8 KiB read within 10 s, GET or HEAD of ``/metrics`` (or ``/``), else 404/405.
"""
from __future__ import annotations

import asyncio
import logging
import re
import socket
import time

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from smtpd.stat_backend import StatsUnavailable

log = logging.getLogger("smtpd")

HEAD_LIMIT = 8192
HEAD_TIMEOUT = 10.0
_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]")


def bind(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    sock.listen(16)
    return sock


def metric_name(key: str) -> str:
    return "smtpd_" + _NOT_NAME.sub("_", key)


class _Snapshot:
    """A prometheus-client collector of one gathered set of counters."""

    def __init__(self, values: dict, now: float) -> None:
        self.values = values
        self.now = now

    def collect(self):
        for key in sorted(self.values):
            value = self.values[key]
            if key == "uptime":
                family = GaugeMetricFamily("smtpd_uptime_seconds", "seconds since smtpd started (uptime)")
                family.add_metric([], int(self.now) - int(value))
            else:
                family = GaugeMetricFamily(metric_name(key), f"OpenSMTPD counter {key}")
                family.add_metric([], value)
            yield family


def exposition(values: dict, accept: str | None, now: float | None = None) -> tuple[bytes, str]:
    """(body, content type) of the counters ``values`` (``show stats``'s)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(values, time.time() if now is None else now))
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


class Endpoint:
    def __init__(self, sock: socket.socket, gather) -> None:
        self.sock = sock
        self.gather = gather            # async () -> Gathered (stat_backend.Stats.gather)
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, sock=self.sock, limit=HEAD_LIMIT)
        host, port = self.sock.getsockname()[:2]
        log.info("info: control: metrics on http://%s:%d/metrics",
                 f"[{host}]" if ":" in host else host, port)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            status, body, ctype = await self._answer(head)
            writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n" % (status, _REASON[status], ctype.encode(), len(body)))
            if not head.startswith(b"HEAD "):
                writer.write(body)
            await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError, ValueError) as exc:
            log.debug("debug: control: metrics client dropped: %r", exc)
        finally:
            writer.close()

    async def _answer(self, head: bytes) -> tuple[int, bytes, str]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, b"bad request\n", "text/plain"
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", "text/plain"
        if target.split("?", 1)[0] not in ("/metrics", "/"):
            return 404, b"not found: try /metrics\n", "text/plain"
        accept = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        try:
            gathered = await self.gather()
        except StatsUnavailable as exc:
            return 503, f"{exc}\n".encode(), "text/plain"
        body, ctype = exposition(gathered.values, accept)
        return 200, body, ctype


_REASON = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
           503: b"Service Unavailable"}
