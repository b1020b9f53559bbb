"""Record OpenSMTPD's answers to every transcript: ``python -m tests.oracle.record``.

Writes tests/oracle/opensmtpd_replies.json (read by tools and the other helpers) and
docs/opensmtpd-replies.md (the same, for people). Run as root on a Debian-family machine.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from tests.oracle import opensmtpd
from tests.oracle.opensmtpd_source import complete
from tests.oracle.environment import HOSTNAME, MAX_MESSAGE_SIZE, MAX_RCPT, make_site
from tests.oracle.transcripts import BY_NAME, Result, play_all

REPO = Path(__file__).resolve().parents[2]
JSON_PATH = REPO / "tests/oracle/opensmtpd_replies.json"
DOC_PATH = REPO / "docs/opensmtpd-replies.md"


def record(base: Path) -> tuple[str, dict[str, tuple[Result, str]]]:
    """{name: (result, source)}: source is "" when recorded whole, else where the part after
    the TLS handshake was read (tests/oracle/opensmtpd_source.py). Raises
    opensmtpd.Unavailable where OpenSMTPD cannot be fetched or run."""
    site = make_site(base)
    try:
        server = opensmtpd.OpenSmtpd.prepare(base, site.config_text)
        server.start(site.port_list())
        try:
            results = play_all(site.ports, cafile=str(site.cafile), hostname=HOSTNAME,
                               log_source=server.log)
        finally:
            server.stop()
    finally:
        site.remove_homes()
    return opensmtpd.version(server.root), {name: complete(res) for name, res in results.items()}


def markdown(version: str, results: dict[str, tuple[Result, str]]) -> str:
    out = [
        "# OpenSMTPD's replies, recorded",
        "",
        f"What Debian's opensmtpd {version} answers to the transcripts of",
        "tests/oracle/transcripts.py, recorded by `python -m tests.oracle.record` (as root) from the",
        "real daemon (tests/oracle/opensmtpd.py). The machine-readable copy is",
        "tests/oracle/opensmtpd_replies.json; the differences pysmtpd keeps are in",
        "docs/smtp-fidelity.md. Regenerate both files rather than editing them.",
        "",
        "The site (tests/oracle/environment.py): hostname " + HOSTNAME + ", users alice, bob, carol",
        f"of example.test, `smtp max-message-size {MAX_MESSAGE_SIZE}`, `smtp limit max-rcpt "
        f"{MAX_RCPT}`, no relay rule; listeners `plain` (no TLS), `starttls` (`tls`, `auth`),",
        "`require` (`tls-require`), `smtps` (`smtps`, `auth-optional`). `C:` is what the client",
        "sent, `S:` the server's reply; `log:` the smtp lines of the session (id shown as <id>).",
        "",
        "Debian's 6.8.0p2 cannot complete a TLS handshake with bookworm's OpenSSL 3 (upstream",
        "issues OpenSMTPD#1171 and #1239): in the transcripts marked *after TLS: from the source*,",
        "what follows `220 2.0.0 Ready to start TLS` (or the whole SMTPS session) is OpenSMTPD",
        "6.8.0p2's behaviour read from smtp_session.c (tests/oracle/opensmtpd_source.py), not",
        "recorded; `<ciphers>` stands for the negotiated TLS parameters.",
        "",
    ]
    for name, (res, source) in results.items():
        tr = BY_NAME[name]
        origin = " *After TLS: from the source.*" if source else ""
        out += [f"## {name}", "", f"{tr.about} (listener `{res.listener}`).{origin}", "", "```"]
        for ex in res.exchanges:
            if ex.sent:
                out.append(f"C: {ex.sent}")
            for reply in ex.replies:
                out += [f"S: {line}" for line in reply.shown()]
            if ex.event:
                out.append(f"   [{ex.event}]")
        if res.end:
            out.append(f"   [connection {res.end}]")
        out += [f"log: <id> {line}" for line in res.log]
        out += ["```", ""]
    return "\n".join(out)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="opensmtpd-record-") as tmp:
        try:
            version, results = record(Path(tmp))
        except opensmtpd.Unavailable as exc:
            sys.exit(f"cannot record: {exc}")
    data = {"server": f"OpenSMTPD (Debian opensmtpd {version})",
            "transcripts": {name: {**res.as_json(), "source": source or "recorded"}
                            for name, (res, source) in results.items()}}
    JSON_PATH.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    DOC_PATH.write_text(markdown(version, results))
    print(f"wrote {JSON_PATH} and {DOC_PATH}: {len(results)} transcripts")


if __name__ == "__main__":
    main()
