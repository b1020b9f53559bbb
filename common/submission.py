"""sendmail(8)'s command line and message handling, pure (OpenSMTPD's enqueue.c).

Shared by the sendmail client (smtpctl/sendmail.py), which reads a message on its
standard input, and by the parent (smtpd/offline.py), which reads what sendmail left
in offline/ while the daemon was down: both must understand the same arguments and
take the same recipients out of the same headers.  No I/O here.

Options, as enqueue.c's getopt string (``A:B:b:E::e:F:f:iJ::L:mN:o:p:qr:R:StvV:x``):
``-f``/``-r`` envelope sender, ``-F`` full name, ``-t`` recipients from the To/Cc/Bcc
fields, ``-N``/``-R``/``-V`` DSN NOTIFY, RET and ENVID, ``-v`` verbose, ``-b`` mode
(``-bs`` SMTP on standard input, ``-bp`` mailq, ``-bi`` newaliases, others ignored),
``-q`` (not supported: exit 70, as OpenSMTPD), ``-S`` (OpenSMTPD's offline
re-injection), and the rest (``-i``, ``-oi``, ``-oem``, ``-L tag``...) accepted and
ignored, as sendmail's other implementations are called with them.  Options and
recipients may be mixed (glibc's getopt permutes, which the portable OpenSMTPD uses);
``--`` ends the options.
"""
from __future__ import annotations

import email.utils
from dataclasses import dataclass, field

# Options that take a value, glued (-fuser) or as the next argument (-f user).
WITH_VALUE = frozenset("ABbeFfLNopRrV")
# Options whose value may only be glued (getopt's "E::" and "J::").
OPTIONAL_VALUE = frozenset("EJ")
WITHOUT_VALUE = frozenset("imqStvx")
# The options that set a field of SendmailOptions (the others are accepted and ignored).
SWITCHES = {"t": "by_headers", "v": "verbose", "q": "queue_run"}
VALUES = {"f": "sender", "r": "sender", "F": "fullname", "N": "dsn_notify", "R": "dsn_ret",
          "V": "dsn_envid"}
MODES = {"s": "smtp", "p": "mailq", "i": "newaliases", "m": "deliver"}
# A message whose first lines name none of these fields has no header (enqueue.c's
# keywords[]): all of it is body.
KNOWN_FIELDS = frozenset({"from", "to", "cc", "bcc", "subject", "date", "message-id", "mime-version",
                          "content-type", "content-disposition", "content-transfer-encoding",
                          "user-agent"})


class UsageError(Exception):
    """A sendmail command line that cannot be run (printed with the usage line)."""


@dataclass
class SendmailOptions:
    sender: str = ""                 # -f/-r, as given ("" = the invoking user)
    fullname: str = ""               # -F
    by_headers: bool = False         # -t
    verbose: bool = False            # -v
    mode: str = "deliver"            # -b: deliver | smtp | mailq | newaliases
    queue_run: bool = False          # -q
    dsn_notify: str = ""             # -N
    dsn_ret: str = ""                # -R
    dsn_envid: str = ""              # -V
    recipients: list[str] = field(default_factory=list)


def parse_args(args: list[str]) -> SendmailOptions:
    """The options and recipients of a sendmail command line (without argv[0])."""
    opts = SendmailOptions()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            opts.recipients.extend(a for a in args[i:] if a)
            break
        if not arg.startswith("-") or arg == "-":
            if arg:
                opts.recipients.append(arg)
            continue
        pos = 1
        while pos < len(arg):            # grouped flags: -ti, -tf user
            flag = arg[pos]
            pos += 1
            if flag in WITHOUT_VALUE:
                if flag in SWITCHES:
                    setattr(opts, SWITCHES[flag], True)
                continue
            if flag in OPTIONAL_VALUE:
                break
            if flag not in WITH_VALUE:
                raise UsageError(f"invalid option -- '{flag}'")
            value = arg[pos:]
            if not value:
                if i >= len(args):
                    raise UsageError(f"option requires an argument -- '{flag}'")
                value = args[i]
                i += 1
            _set(opts, flag, value)
            break
    return opts


def _set(opts: SendmailOptions, flag: str, value: str) -> None:
    if flag in VALUES:
        setattr(opts, VALUES[flag], value)
    elif flag == "b":
        # -bs, -bp, -bi; -bm is the default; other modes (-bd, -bt, -bv...) are
        # sendmail's own and ignored, as OpenSMTPD ignores every -b.
        opts.mode = MODES.get(value[:1], opts.mode)


def strip_brackets(addr: str) -> str:
    """``<user@host>`` -> ``user@host`` (enqueue.c refuses a ``<`` without ``>``)."""
    addr = addr.strip()
    if addr.startswith("<"):
        if not addr.endswith(">"):
            raise UsageError("leading < but no trailing >")
        addr = addr[1:-1]
    return addr


def qualify(addr: str, hostname: str) -> str:
    """An address with a domain: a bare name gets ``@hostname`` (the empty one stays)."""
    addr = strip_brackets(addr)
    return addr if "@" in addr or not addr else f"{addr}@{hostname}"


def split_recipients(args: list[str]) -> list[str]:
    """Recipient arguments; one may hold several, separated by commas (rcpt_add)."""
    return [part.strip() for arg in args for part in arg.split(",") if part.strip()]


def normalize(message: bytes) -> bytes:
    """LF line endings (a CRLF message from a client is the same message)."""
    return message.replace(b"\r\n", b"\n")


def split_headers(message: bytes) -> tuple[bytes, bytes]:
    """(header section with its last LF, the rest from the empty line on)."""
    if message.startswith(b"\n"):
        return b"", message
    end = message.find(b"\n\n")
    return (message, b"") if end < 0 else (message[:end + 1], message[end + 1:])


def _fields(head: bytes) -> list[tuple[str, str, list[bytes]]]:
    """(lower-cased name, unfolded value, raw lines) of each header field."""
    out: list[tuple[str, str, list[bytes]]] = []
    for line in head.split(b"\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and out:
            name, value, raw = out[-1]
            out[-1] = (name, value + " " + line.decode("utf-8", "replace").strip(), raw + [line])
            continue
        name, _, value = line.decode("utf-8", "replace").partition(":")
        out.append((name.strip().lower(), value.strip(), [line]))
    return out


def header_names(message: bytes) -> set[str]:
    """The lower-cased names of the header fields of a message."""
    return {name for name, _, _ in _fields(split_headers(message)[0])}


def header_recipients(message: bytes) -> tuple[list[str], bytes]:
    """``sendmail -t``: the addresses of the To, Cc and Bcc fields, and the message
    without its Bcc fields (their recipients must not see each other)."""
    head, body = split_headers(message)
    fields = _fields(head)
    values = [value for name, value, _ in fields if name in ("to", "cc", "bcc")]
    addrs = [addr for _, addr in email.utils.getaddresses(values) if addr]
    kept = b"".join(line + b"\n" for name, _, raw in fields if name != "bcc" for line in raw)
    return addrs, kept + body


def drop_envelope_lines(message: bytes) -> bytes:
    """A leading mbox ``From `` line and ``Return-Path:`` fields are not the
    message's (enqueue.c drops them: the server writes Return-Path at delivery)."""
    head, body = split_headers(message)
    lines = [line for line in head.split(b"\n")[:-1]
             if not line[:5].lower() == b"from " and not line[:12].lower() == b"return-path:"]
    return b"".join(line + b"\n" for line in lines) + body


def from_header(sender: str, fullname: str) -> bytes:
    """The From: field enqueue.c adds to a message without one."""
    name = fullname.replace("\r", " ").replace("\n", " ").strip()
    if name:
        return f"From: {email.utils.formataddr((name, sender))}\n".encode("utf-8")
    return f"From: <{sender}>\n".encode("utf-8")


def complete_headers(message: bytes, sender: str, fullname: str) -> bytes:
    """The message with a From: field when it has none; a message with no header at
    all gets an empty line first, so that its first line stays body (enqueue.c's
    ``noheader``).  Date and Message-ID are added by the daemon (smtpd/enqueue.py)."""
    head, body = split_headers(message)
    names = {name for name, _, _ in _fields(head)}
    if not names & KNOWN_FIELDS:
        head, body = b"", b"\n" + message if not message.startswith(b"\n") else message
    if "from" in names:
        return head + body
    return from_header(sender, fullname) + head + body


def gecos_name(gecos: str, login: str) -> str:
    """The full name of a passwd entry: the GECOS field up to its first comma, ``&``
    standing for the login name capitalised (build_from in enqueue.c)."""
    name = gecos.split(",", 1)[0]
    return name.replace("&", login[:1].upper() + login[1:], 1)
