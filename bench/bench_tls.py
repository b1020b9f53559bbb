#!/usr/bin/env python3
"""What TLS costs an inbound SMTP session, per message (issue 8).

Boots the real daemon (temporary spool, free 127.0.0.1 ports, delivery paused so only
reception is measured) with a plain listener and a STARTTLS one sharing a
certificate made at run time, then sends N messages, one session each, with
smtplib: plain, then STARTTLS.  Reports, for each, the wall time per message and
pony's CPU time per message (utime+stime from /proc), and the difference.

    .venv/bin/python bench/bench_tls.py [-n 300] [--size 5120]

Bounded (every session has a timeout); stops the daemon by its process group.
"""
from __future__ import annotations

import argparse
import os
import smtplib
import ssl
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import Daemon, free_port  # noqa: E402
from tests.e2e.helpers import userbase  # noqa: E402
from tests.tlsca import CertificateAuthority  # noqa: E402

NAME = "mx.example.test"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(port: int, n: int, body: bytes, context: ssl.SSLContext | None, pony: int) -> tuple[float, float]:
    cpu, started = cpu_seconds(pony), time.monotonic()
    for _ in range(n):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.ehlo("client.test")
            if context is not None:
                c.starttls(context=context)
                c.ehlo("client.test")
            c.sendmail("a@remote.test", ["alice@example.test"], body)
    return (time.monotonic() - started) / n, (cpu_seconds(pony) - cpu) / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=300)
    p.add_argument("--size", type=int, default=5120)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="pysmtpd-bench-tls-") as tmp:
        base = Path(tmp)
        issued = CertificateAuthority(base / "ca").issue(NAME)
        plain, starttls = free_port(), free_port()
        conf = "\n".join([
            f'pki {NAME} cert "{issued.cert}"', f'pki {NAME} key "{issued.key}"',
            f"table users {userbase(base / 'd')}",
            f"listen on 127.0.0.1 port {plain}",
            f"listen on 127.0.0.1 port {starttls} tls pki {NAME}",
            'action "local" maildir "~/Maildir" userbase <users>',
            'match from any for domain "example.test" action "local"']) + "\n"
        (base / "d").mkdir(exist_ok=True)
        d = Daemon(base / "d", conf)
        try:
            d.start()
            d.smtpctl("pause", "mda")
            pony = d.children()["smtpd: pony"]
            context = ssl.create_default_context(cafile=str(base / "ca" / "ca.crt"))
            context.check_hostname = False
            body = b"Subject: bench\r\n\r\n" + b"x" * max(0, args.size - 18)
            run(plain, 10, body, None, pony)                    # warm up
            plain_wall, plain_cpu = run(plain, args.n, body, None, pony)
            tls_wall, tls_cpu = run(starttls, args.n, body, context, pony)
        finally:
            d.stop()
            d.kill_group()
    print(f"n={args.n} size={args.size}, one session per message:")
    print(f"  plain:    {plain_wall * 1000:.1f} ms/message wall, pony {plain_cpu * 1000:.2f} ms CPU/message")
    print(f"  STARTTLS: {tls_wall * 1000:.1f} ms/message wall, pony {tls_cpu * 1000:.2f} ms CPU/message")
    print(f"  TLS adds {(tls_cpu - plain_cpu) * 1000:.2f} ms of pony CPU per message "
          f"({tls_cpu / plain_cpu:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
