"""Delivery status notifications (RFC 3464), built without I/O.

The queue gathers the bounce envelopes of one message and asks ``build_report``
for ONE multipart/report covering all their recipients: a human-readable notice,
a machine-readable ``message/delivery-status`` part, and the original message's
headers (``text/rfc822-headers``), or the whole message (``message/rfc822``)
when the sender asked for RET=FULL and the report is a failure.  The clock and
the unique token (Message-ID, MIME boundary) are passed in, so a report is a
pure function of its inputs.

The result uses LF line endings, as messages are stored in the spool.
"""
from __future__ import annotations

import datetime
import email.utils
from dataclasses import dataclass, field

# The four kinds of notice, OpenSMTPD's bounce types (envelope ``bounce-type``).
FAILED, DELAYED, DELIVERED, RELAYED = "failed", "delayed", "delivered", "relayed"
KINDS = (FAILED, DELAYED, DELIVERED, RELAYED)

_DEFAULT_STATUS = {FAILED: "5.0.0", DELAYED: "4.0.0", DELIVERED: "2.0.0", RELAYED: "2.0.0"}

_INTRO = {
    FAILED: ("An error has occurred while attempting to deliver a message for the\n"
             "following list of recipients:"),
    DELAYED: ("Delivery of a message to the following list of recipients has been delayed\n"
              "for {delay}. It is still in the queue and will be tried again, for up to\n"
              "{ttl} after it was received, before it is given up:"),
    DELIVERED: "Your message was successfully delivered to the following list of recipients:",
    RELAYED: ("Your message was relayed to the following list of recipients. The next\n"
              "server does not offer delivery status notifications, so no further notice\n"
              "will follow from it:"),
}
_OUTRO = {
    True: "Below is a copy of the original message:",
    False: "Below are the headers of the original message:",
}


@dataclass
class Recipient:
    """One recipient line of a report (one bounce envelope)."""
    dest: str                       # final recipient (envelope ``dest``)
    orcpt: str = ""                 # ORCPT as received: "rfc822;user@domain"
    esc_class: int = 0              # enhanced status code of the outcome: class.(code/10).(code%10)
    esc_code: int = 0
    errorline: str = ""             # the reply or reason, for Diagnostic-Code and the text part
    remote_mta: str = ""            # the server that answered, if any


@dataclass
class Report:
    kind: str                       # one of KINDS
    smtpname: str                   # reporting MTA's name (the envelope's ``smtpname``)
    to: str                         # the original sender: the notice's recipient
    arrival: int                    # when the original message was received (unix time)
    original: bytes                 # the original message as stored (LF endings)
    recipients: list[Recipient] = field(default_factory=list)
    envid: str = ""                 # ENVID of the original transaction
    ret: str = ""                   # "FULL" | "HDRS" | ""
    delay: int = 0                  # seconds, for DELAYED
    ttl: int = 0                    # seconds the original may stay queued, for DELAYED


def status_of(kind: str, esc_class: int, esc_code: int) -> str:
    """The x.y.z Status of a recipient; the class follows the kind when the failure
    gave none (or one that contradicts it: a failed notice is never 2.x.x)."""
    if esc_class in (2, 4, 5):
        wanted = {FAILED: 5, DELAYED: 4}.get(kind, 2)
        if esc_class == wanted:
            return f"{esc_class}.{esc_code // 10}.{esc_code % 10}"
        if kind in (FAILED, DELAYED) and esc_code:
            return f"{wanted}.{esc_code // 10}.{esc_code % 10}"
    return _DEFAULT_STATUS[kind]


def duration_words(seconds: int) -> str:
    """'4 hours', '1 day', '30 seconds': in the largest unit it reaches, rounded down,
    as OpenSMTPD's notices say it."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def header_block(message: bytes) -> bytes:
    """The header section of a stored message (up to, not including, the blank line)."""
    text = message.replace(b"\r\n", b"\n")
    end = text.find(b"\n\n")
    if text.startswith(b"\n"):
        return b""
    return text if end < 0 else text[:end + 1]


def _clean(text: str) -> str:
    """A single header-safe line (error lines come from remote servers)."""
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())


def _diagnostic(errorline: str) -> str:
    """OpenSMTPD strips a leading reply code that is not an SMTP one (1xx/6xx, internal)."""
    line = _clean(errorline)
    if len(line) > 4 and line[:3].isdigit() and line[3] == " " and line[0] in "16":
        line = line[4:]
    return line


def _rfc5322_date(when: float) -> str:
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(when).astimezone())


def subject(kind: str) -> str:
    return f"Delivery status notification: {kind}"


def build_report(report: Report, *, now: float, unique: str) -> bytes:
    """The whole notice as bytes.  ``unique``: a token unique to this notice (the queue
    uses the bounce envelope id), used in the Message-ID and the MIME boundary."""
    if report.kind not in KINDS:
        raise ValueError(f"unknown notice kind {report.kind!r}")
    name = report.smtpname
    boundary = f"{unique}/{name}"
    full = report.kind == FAILED and report.ret.upper() == "FULL"
    date = _rfc5322_date(now)
    arrival = _rfc5322_date(report.arrival)

    head = [
        f"From: Mailer Daemon <MAILER-DAEMON@{name}>",
        f"To: {report.to}",
        f"Subject: {subject(report.kind)}",
        f"Date: {date}",
        f"Message-ID: <{unique}.bounce@{name}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "Content-Transfer-Encoding: 7bit",
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]

    text = [
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Description: Notification",
        "Content-Transfer-Encoding: 8bit",
        "",
        "Hi!",
        "",
        f"This is the mail system at {name}. This notice was generated automatically,",
        "please do not reply to it.",
        "",
        _INTRO[report.kind].format(delay=duration_words(report.delay),
                                   ttl=duration_words(report.ttl)),
        "",
    ]
    for r in report.recipients:
        diag = _diagnostic(r.errorline)
        text.append(f"{r.dest}: {diag}" if diag else r.dest)
    text += ["", _OUTRO[full], ""]

    status = [
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery Report",
        "Content-Transfer-Encoding: 7bit",
        "",
        f"Reporting-MTA: dns; {name}",
    ]
    if report.envid:
        status.append(f"Original-Envelope-Id: {_clean(report.envid)}")
    status.append(f"Arrival-Date: {arrival}")
    action = report.kind
    for r in report.recipients:
        status.append("")
        if r.orcpt:
            orcpt = _clean(r.orcpt)
            status.append(f"Original-Recipient: {orcpt if ';' in orcpt else 'rfc822;' + orcpt}")
        status.append(f"Final-Recipient: rfc822;{r.dest}")
        status.append(f"Action: {action}")
        status.append(f"Status: {status_of(report.kind, r.esc_class, r.esc_code)}")
        if r.remote_mta:
            status.append(f"Remote-MTA: dns; {_clean(r.remote_mta)}")
        diag = _diagnostic(r.errorline)
        if diag:
            status.append(f"Diagnostic-Code: smtp; {diag}")
        if report.kind == DELAYED:
            status.append(f"Last-Attempt-Date: {date}")
    status.append("")

    original = report.original.replace(b"\r\n", b"\n")
    if full:
        attached = [f"--{boundary}", "Content-Type: message/rfc822",
                    "Content-Description: Undelivered Message", "Content-Transfer-Encoding: 8bit", ""]
        body = original if original.endswith(b"\n") else original + b"\n"
    else:
        attached = [f"--{boundary}", "Content-Type: text/rfc822-headers",
                    "Content-Description: Message Headers", "Content-Transfer-Encoding: 8bit", ""]
        body = header_block(original)
    out = "\n".join(head + text + status + attached).encode("utf-8") + b"\n" + body
    return out + f"\n--{boundary}--\n".encode("utf-8")
