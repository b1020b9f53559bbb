"""The metrics endpoint (a pysmtpd addition, off by default): ``show stats`` for Prometheus.

Enabled by ``metrics listen on 127.0.0.1 port 9025`` in smtpd.conf (docs/config.md);
the address must be a loopback one, since the counters are served to anyone who can
connect.  control binds the socket while still privileged (``bind``) and serves it
on its event loop: each ``GET /metrics`` gathers the counters of every process as
``show stats`` does (smtpd/stat_backend.py) and answers them in the Prometheus text
format, written by the prometheus-client library (format negotiated from the
request's Accept header, as the library's own server does).

Names: ``smtpd_`` + OpenSMTPD's key with every character outside ``[a-zA-Z0-9_]``
made ``_`` (``smtp.session`` -> ``smtpd_smtp_session``), the key itself in the HELP
text; ``uptime`` becomes ``smtpd_uptime_seconds``.  Keys exist once touched, as in
``show stats``.  Types: most of OpenSMTPD's keys go up and down (sessions open,
envelopes queued): gauges.  Those that only count events since the start
(``TOTALS``: deliveries by outcome, bounces, expired and removed envelopes, SMTP
sessions by address family) are counters, exposed with ``_total``
(``smtpd_scheduler_delivery_ok_total``), so that ``rate()`` works on them.

Process metrics, one series per process (``process="lka"``...), read by the parent in
/proc (``process_usage``; the children may be chrooted and run as other users):
``smtpd_process_cpu_seconds_total`` (user + system), ``smtpd_process_resident_memory_bytes``
and ``smtpd_process_open_fds`` (only where the parent may look into the process's
fd table: as root with CAP_SYS_PTRACE, or unprivileged mode; docs/ops.md).

The HTTP side is deliberately small: one request per connection, a request head of
at most 8 KiB read within 10 s, GET or HEAD of ``/metrics`` (or ``/``), else 404/405.
"""
from __future__ import annotations

import asyncio
import logging
import re
import socket
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from smtpd.proc_usage import process_usage  # noqa: F401  (the parent reads it without prometheus-client)
from smtpd.stat_backend import StatsUnavailable

log = logging.getLogger("smtpd")

HEAD_LIMIT = 8192
HEAD_TIMEOUT = 10.0
_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]")
# OpenSMTPD's keys that only ever increase (stat_increment without a matching
# stat_decrement in OpenSMTPD and here): Prometheus counters.
TOTALS = re.compile(r"queue\.bounce|scheduler\.delivery\.[a-z]+|scheduler\.envelope\.(expired|removed)"
                    r"|smtp\.session\.(inet4|inet6|local)")


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


# process_usage key -> (metric family, type, HELP)
_PROCESS_METRICS = (
    ("cpu_seconds", "smtpd_process_cpu_seconds", CounterMetricFamily,
     "user and system CPU time of each pysmtpd process, in seconds"),
    ("resident_memory_bytes", "smtpd_process_resident_memory_bytes", GaugeMetricFamily,
     "resident memory of each pysmtpd process, in bytes"),
    ("open_fds", "smtpd_process_open_fds", GaugeMetricFamily,
     "open file descriptors of each pysmtpd process"),
)


class _Snapshot:
    """A prometheus-client collector of one gathered set of counters."""

    def __init__(self, values: dict, now: float, processes: dict[str, dict[str, float]]) -> None:
        self.values = values
        self.now = now
        self.processes = processes

    def collect(self):
        for key in sorted(self.values):
            value = self.values[key]
            if key == "uptime":
                family = GaugeMetricFamily("smtpd_uptime_seconds", "seconds since smtpd started (uptime)")
                family.add_metric([], int(self.now) - int(value))
            else:
                kind = CounterMetricFamily if TOTALS.fullmatch(key) else GaugeMetricFamily
                family = kind(metric_name(key), f"OpenSMTPD statistic {key}")
                family.add_metric([], value)
            yield family
        for key, name, kind, help_text in _PROCESS_METRICS:
            family = kind(name, help_text, labels=["process"])
            for proc in sorted(self.processes):
                if key in self.processes[proc]:
                    family.add_metric([proc], self.processes[proc][key])
            if family.samples:
                yield family


def exposition(values: dict, accept: str | None, now: float | None = None,
               processes: dict[str, dict[str, float]] | None = None) -> tuple[bytes, str]:
    """(body, content type) of the counters ``values`` (``show stats``'s) and the
    resource usage of the processes."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(values, time.time() if now is None else now, processes or {}))
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
        body, ctype = exposition(gathered.values, accept, processes=gathered.processes)
        return 200, body, ctype


_REASON = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
           503: b"Service Unavailable"}
