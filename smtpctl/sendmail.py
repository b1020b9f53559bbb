"""sendmail(8): submit a message to the running daemon, or leave it in offline/ (enqueue.c).

``smtpctl`` run as ``sendmail`` or ``send-mail`` (smtpctl.main's argv[0] dispatch, as
OpenSMTPD's sendmail_compat).  The message is read from standard input; the options
are common/submission.py's (OpenSMTPD's).  ``-bs`` speaks SMTP on standard input and
output (smtpctl/sendmail_smtp.py), ``-bp`` is mailq, ``-bi`` is newaliases.

Daemon up: one ``enqueue`` request on the control socket (recipients, -f, -F, the DSN
options), the message in ClientContent frames, and the daemon's answer.  Where
OpenSMTPD asks control for an SMTP session and speaks SMTP over it, pysmtpd hands
the message over whole: the sender's identity is the connection's uid, read by
control with SO_PEERCRED, so nothing the client says names the user; the parent
turns the uid into the login name (the sender unless ``-f`` is given, which any user
may, as with OpenSMTPD) and pony stores the message through the internal enqueue
path (smtpd/enqueue.py) as mail ``from local``.

Daemon down: the command line (arguments joined by ``|``) and the message go to a new
file ``<spool>/offline/<time>.<random>`` (mode 0600, owned by the user; the directory
is root's, mode 01777), and sendmail exits 0: the daemon enqueues it at its next
start (smtpd/offline.py).  OpenSMTPD exits 75 (EX_TEMPFAIL) there, which mail
clients report as a failure and save as dead.letter, although the message will be
sent; we exit 0 as Postfix's sendmail does for its maildrop.

Failure: the daemon's reply on standard error, the message saved to
``~/dead.letter``, exit 70 (EX_SOFTWARE, a permanent refusal) or 75 (EX_TEMPFAIL).
``$SMTPD_SOCKET`` and ``$SMTPD_SPOOL`` replace the default socket and spool.
"""
from __future__ import annotations

import os
import pwd
import secrets
import sys
import time
from pathlib import Path

from common import submission
from common.control_wire import MAX_REQUEST, WireError, frame, recv_frame
from common.messages import PROTOCOL_VERSION, ClientContent, ClientEnd, ClientRequest, ClientResult
from smtpctl.client import Connection, NotRunning, socket_path

EX_OK = 0
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
CHUNK = MAX_REQUEST - 1024          # message bytes per ClientContent frame
# How long the daemon may take to answer (its parent gives pony 300 s): giving up
# sooner would report a failure for a message that may still be queued.
REPLY_TIMEOUT = 400.0
USAGE = "usage: {prog} [-tv] [-f from] [-F name] to ..."


class SendmailError(Exception):
    def __init__(self, text: str, status: int) -> None:
        super().__init__(text)
        self.status = status


def warn(prog: str, text: str) -> None:
    print(f"{prog}: {text}", file=sys.stderr)


def prepare(opts: submission.SendmailOptions, raw: bytes) -> tuple[list[str], bytes]:
    """(recipients, message) to submit: the arguments' recipients, plus with ``-t``
    those of To/Cc/Bcc, whose Bcc fields are then removed."""
    message = submission.normalize(raw)
    rcpts = submission.split_recipients(opts.recipients)
    if opts.by_headers:
        found, message = submission.header_recipients(message)
        rcpts += found
    if not rcpts:
        raise SendmailError("no recipients", EX_SOFTWARE)
    return rcpts, message


def request_enqueue(conn: Connection, opts: submission.SendmailOptions, rcpts: list[str],
                    message: bytes) -> ClientResult:
    """The enqueue request on an open control connection, and the daemon's result
    (its text: ``250 2.0.0 <msgid> Message accepted for delivery`` or the refusal)."""
    args = {"recipients": rcpts, "sender": opts.sender, "fullname": opts.fullname,
            "dsn_notify": opts.dsn_notify, "dsn_ret": opts.dsn_ret, "dsn_envid": opts.dsn_envid}
    sock = conn.sock
    sock.settimeout(REPLY_TIMEOUT)
    try:
        sock.sendall(frame(ClientRequest(version=PROTOCOL_VERSION, command="enqueue", args=args)))
        for start in range(0, len(message), CHUNK):
            sock.sendall(frame(ClientContent(data=message[start:start + CHUNK])))
        sock.sendall(frame(ClientEnd()))
    except OSError:
        pass            # the daemon refused early (too big, paused): its reply says why
    try:
        reply = recv_frame(sock)
    except (WireError, OSError) as exc:
        return ClientResult(ok=False, text=f"451 4.3.0 lost connection to smtpd: {exc}")
    if not isinstance(reply, ClientResult):
        return ClientResult(ok=False, text="451 4.3.0 unexpected reply from smtpd")
    return reply


def submit(conn: Connection, opts: submission.SendmailOptions, rcpts: list[str], message: bytes) -> str:
    """request_enqueue's accepted text, else SendmailError (its exit status: 70 for a
    permanent refusal, 75 for a temporary one)."""
    reply = request_enqueue(conn, opts, rcpts, message)
    if not reply.ok:
        status = EX_TEMPFAIL if reply.text[:1] == "4" else EX_SOFTWARE
        raise SendmailError(f"command failed: {reply.text}", status)
    return reply.text


def offline_args_line(args: list[str]) -> bytes:
    """The first line of an offline file: the arguments joined by ``|`` (none may hold
    one, nor a line break)."""
    for arg in args:
        if "|" in arg or "\n" in arg or "\r" in arg:
            raise SendmailError(f"{arg} contains illegal character", EX_SOFTWARE)
    return "|".join(args).encode("utf-8", "surrogateescape") + b"\n"


def write_offline(spool: Path, args: list[str], message: bytes, now: float | None = None) -> Path:
    """``offline/<time>.<10 random characters>``, created new (O_EXCL, never through a
    link), mode 0600, written and synced; the path.  The message is kept as given
    (with its Bcc fields): the daemon applies -t when it reads the file."""
    head = offline_args_line(args)
    directory = spool / "offline"
    stamp = int(time.time() if now is None else now)
    for _ in range(100):
        path = directory / f"{stamp}.{secrets.token_hex(5).upper()}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise SendmailError(f"cannot create temporary file {path}: {exc.strerror}", EX_UNAVAILABLE) from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(head)
                f.write(message)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise SendmailError(f"write error: {exc.strerror}", EX_UNAVAILABLE) from None
        return path
    raise SendmailError(f"cannot create temporary file in {directory}", EX_UNAVAILABLE)


def save_dead_letter(message: bytes) -> None:
    """The message into ``~/dead.letter`` (enqueue.c's savedeadletter), if there is a
    home to write it in; nothing is said when there is none (cron's minimal env)."""
    try:
        home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return
    try:
        fd = os.open(Path(home) / "dead.letter", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(message)
    except OSError:
        pass


def deliver(prog: str, opts: submission.SendmailOptions, args: list[str], raw: bytes) -> int:
    rcpts, message = prepare(opts, raw)
    try:
        conn = Connection(socket_path(None))
    except NotRunning:
        path = write_offline(Path(os.environ.get("SMTPD_SPOOL") or "/var/spool/smtpd"), args, submission.normalize(raw))
        if opts.verbose:
            print(f"smtpd is not running: message left in {path}, sent when it starts")
        return EX_OK
    with conn:
        try:
            text = submit(conn, opts, rcpts, message)
        except SendmailError:
            save_dead_letter(message)
            raise
    if opts.verbose:
        print(text)
    return EX_OK


def main(prog: str, args: list[str]) -> int:
    """sendmail's exit status for a command line (``args`` without argv[0])."""
    try:
        opts = submission.parse_args(args)
    except submission.UsageError as exc:
        warn(prog, str(exc))
        print(USAGE.format(prog=prog), file=sys.stderr)
        return EX_USAGE
    if opts.mode == "newaliases":
        return tables_command("newaliases", [])     # sendmail's own options are not newaliases'

    if opts.mode == "mailq":
        from smtpctl import main as smtpctl_main
        return smtpctl_main.run_status(["show", "queue"])
    if opts.queue_run:
        warn(prog, "-q is not supported: the daemon runs its queue itself")
        return EX_SOFTWARE
    if opts.mode == "smtp":
        from smtpctl import sendmail_smtp
        return sendmail_smtp.serve(prog, opts, sys.stdin.buffer, sys.stdout.buffer)
    try:
        return deliver(prog, opts, args, sys.stdin.buffer.read())
    except SendmailError as exc:
        warn(prog, str(exc))
        return exc.status


def tables_command(name: str, args: list[str]) -> int:
    """``sendmail -bi`` is OpenSMTPD's newaliases mode: smtpctl/mapfiles.py's."""
    from smtpctl import mapfiles
    return mapfiles.main_by_name(name, args)
