"""The contract between pysmtpd's processes.

Every message that crosses a channel is one of the Structs below, encoded with
msgpack and tagged with its OpenSMTPD-style IMSG name (``queue_message_commit``,
``sched_envelope_transfer``...).  Nothing else goes on the wire, so this module
is the whole inter-process protocol; bump PROTOCOL_VERSION when it changes
incompatibly (processes are always started from the same install, but smtpctl
checks it against control).

Conventions: ``reqid`` correlates a request with its reply (unique per sender),
``evpid``/``msgid`` are the envelope/message ids, and a reply carries ``ok`` and
an ``error`` text rather than raising across processes.
"""
from __future__ import annotations

from typing import Union

import msgspec

from common.envelope import Envelope

PROTOCOL_VERSION = 1


class Msg(msgspec.Struct, tag_field="type", kw_only=True, array_like=False):
    """Base of every message.  Subclasses set ``tag`` to their IMSG name."""


def _m(name: str):
    return dict(tag=name)


# --- parent <-> every child -------------------------------------------------------------

class SetupDone(Msg, **_m("setup_done")):
    proc: str
    pid: int


class ConfEnd(Msg, **_m("conf_end")):
    """Parent -> child: every process is up; start serving (pony starts listening)."""


class CtlVerbose(Msg, **_m("ctl_verbose")):
    """control -> every process: the new tracing mask (common.trace bits; bit 0x1 is
    ``log verbose``).  A non-zero reqid asks for a CtlReply once it is applied."""
    mask: int
    reqid: int = 0


# --- inbound SMTP: pony <-> queue, pony <-> lka, lka -> queue -----------------------------

class SmtpMessageCreate(Msg, **_m("smtp_message_create")):
    """pony -> queue: ``count`` new message ids (pony's reserve asks for several in
    one round trip; the queue gives at most MAX_CREATE)."""
    reqid: int
    count: int = 1


class SmtpMessageCreateReply(Msg, **_m("smtp_message_create_reply")):
    """queue -> pony: ``msgid``, and the further ids of a ``count`` > 1 in ``more``."""
    reqid: int
    ok: bool
    msgid: int = 0
    more: list[int] = []


class SmtpExpandRcpt(Msg, **_m("smtp_expand_rcpt")):
    """pony -> lka: match rules for one recipient and expand it into envelopes.

    ``envelope`` carries what the session knows (sender, rcpt, helo, hostname,
    sockaddr, smtpname, tag, username, flags); lka fills dispatcher, type, dest,
    mda_user and submits the results to the queue itself.
    """
    reqid: int
    msgid: int
    envelope: Envelope
    rdns: str = ""
    tls: bool = False
    local_listener: bool = False
    auth_user: str = ""      # the session's authenticated user ("" none): `match auth` rules


class SmtpExpandRcptReply(Msg, **_m("smtp_expand_rcpt_reply")):
    """lka -> pony, only on failure (success is answered by the queue's commit)."""
    reqid: int
    code: int            # 550, 451, 524...
    text: str            # full SMTP reply text after the code


class SmtpAuthenticate(Msg, **_m("smtp_authenticate")):
    """pony -> lka: check AUTH credentials against the listener's table (smtpd/auth.py).
    With ``table`` None (the system's accounts) lka forwards it to the parent, the
    only process that can read the shadow file, which answers lka."""
    reqid: int
    session: int
    table: str | None
    user: str
    password: str


class SmtpAuthenticateReply(Msg, **_m("smtp_authenticate_reply")):
    """lka -> pony (and parent -> lka, forwarded as is)."""
    reqid: int
    result: str          # "ok" | "permfail" | "tempfail"


class SmtpCheckSender(Msg, **_m("smtp_check_sender")):
    """pony -> lka at MAIL FROM on a ``senders <table>`` listener, once authenticated:
    may ``user`` use ``sender`` ("" for <>)?"""
    reqid: int
    session: int
    table: str
    user: str
    sender: str


class SmtpCheckSenderReply(Msg, **_m("smtp_check_sender_reply")):
    reqid: int
    ok: bool
    result: str = ""     # "ok" | "permfail" | "tempfail" (the table could not answer)


class QueueEnvelopeCommitReply(Msg, **_m("queue_envelope_commit_reply")):
    """queue -> pony: the envelopes of one RCPT (LkaEnvelopesSubmit) are written, or
    not; ``evpids`` are theirs, in order, when ``ok``."""
    reqid: int
    ok: bool
    evpids: list[int] = []
    disk_full: bool = False     # not ok because the spool is full: 452 4.3.1 to the client


class SmtpMessageData(Msg, **_m("smtp_message_data")):
    """pony -> queue: one chunk of a message body, in order (see docs/ipc.md)."""
    msgid: int
    chunk: bytes


class SmtpMessageCommit(Msg, **_m("smtp_message_commit")):
    reqid: int
    msgid: int


class SmtpMessageCommitReply(Msg, **_m("smtp_message_commit_reply")):
    reqid: int
    ok: bool
    code: int = 250
    text: str = ""


class SmtpMessageRollback(Msg, **_m("smtp_message_rollback")):
    msgid: int


# --- queue <-> scheduler -----------------------------------------------------------------

class SchedEntry(msgspec.Struct, array_like=True):
    """What the scheduler keeps of an envelope: no addresses, no text."""
    evpid: int
    type: str            # "mda" | "mta" | "bounce"
    ctime: int
    expire: int
    retry: int
    last_bounce: int = 0 # ctime + warn interval of the last delay notice sent (0: none)


class QueueEnvelopeSubmit(Msg, **_m("queue_envelope_submit")):
    entry: SchedEntry


class QueueMessageCommit(Msg, **_m("queue_message_commit")):
    msgid: int


class QueueMessageRollback(Msg, **_m("queue_message_rollback")):
    msgid: int


class SchedEnvelopeDeliver(Msg, **_m("sched_envelope_deliver")):
    evpid: int


class SchedEnvelopeTransfer(Msg, **_m("sched_envelope_transfer")):
    evpid: int


class SchedEnvelopeRemove(Msg, **_m("sched_envelope_remove")):
    evpid: int


class SchedEnvelopeExpire(Msg, **_m("sched_envelope_expire")):
    evpid: int


class QueueDeliveryOk(Msg, **_m("queue_delivery_ok")):
    evpid: int


class QueueDeliveryTempfail(Msg, **_m("queue_delivery_tempfail")):
    entry: SchedEntry


class QueueDeliveryPermfail(Msg, **_m("queue_delivery_permfail")):
    evpid: int


class QueueDeliveryLoop(Msg, **_m("queue_delivery_loop")):
    evpid: int


class QueueEnvelopeAck(Msg, **_m("queue_envelope_ack")):
    """queue -> scheduler: a remove/expire order was carried out (or the envelope is gone)."""
    evpid: int


# --- queue <-> pony: delivery ------------------------------------------------------------

class QueueDeliver(Msg, **_m("queue_deliver")):
    """queue -> pony: deliver this envelope locally (MDA).  ``fd_key``: when not 0,
    the message's descriptor was sent just before over the queue -> pony fd channel
    under this key (smtpd/fd_channel.py pushed_key); 0: pony asks (MdaMessageOpen)."""
    envelope: Envelope
    fd_key: int = 0


class QueueTransfer(Msg, **_m("queue_transfer")):
    """queue -> pony: relay this envelope (MTA)."""
    envelope: Envelope


class MessageOpen(Msg, **_m("message_open")):
    """pony -> queue: the body of a queued message, for delivery."""
    reqid: int
    msgid: int


class MessageContent(Msg, **_m("message_content")):
    reqid: int
    ok: bool
    data: bytes = b""
    error: str = ""


class DeliveryResult(Msg, **_m("delivery_result")):
    """pony -> queue: IMSG_{MTA,MDA}_DELIVERY_{OK,TEMPFAIL,PERMFAIL,LOOP} in one type."""
    evpid: int
    agent: str           # "mta" | "mda"
    status: str          # "ok" | "tempfail" | "permfail" | "loop" | "hold"
    errorline: str = ""
    esc_code: int = 0
    holdq: int = 0       # status "hold": the hold queue (route) the envelope waits in
    dsn_notify: int = 0      # the envelope's NOTIFY bits: the queue reads the envelope back
                             # for a success notice only when SUCCESS is among them
    remote_dsn: bool = False # mta: the server took the message and advertised DSN (it
                             # notifies from then on; without it the queue sends "relayed")


# --- pony <-> lka: lookups at delivery time ------------------------------------------------

class MdaLookupUserinfo(Msg, **_m("mda_lookup_userinfo")):
    reqid: int
    table: str           # userbase table name, "" for the system password db
    user: str


class MdaLookupUserinfoReply(Msg, **_m("mda_lookup_userinfo_reply")):
    reqid: int
    status: str          # "ok" | "notfound" | "tempfail"
    uid: int = 0
    gid: int = 0
    home: str = ""


class MtaDnsLookup(Msg, **_m("mta_dns_lookup")):
    """pony -> lka: MX lookup for a domain (``mx``) or an address lookup (``host``)."""
    reqid: int
    kind: str            # "mx" | "host"
    name: str


class MtaDnsReply(Msg, **_m("mta_dns_reply")):
    reqid: int
    status: str          # "ok" | "tempfail" | "permfail"
    hosts: list[tuple[int, str, str]] = []   # (preference, name, address)
    error: str = ""


# --- control <-> the others ---------------------------------------------------------------

class CtlRequest(Msg, **_m("ctl_request")):
    """control -> a process: one smtpctl command to carry out (pause, schedule, list...)."""
    reqid: int
    command: str
    id: int = 0          # evpid or msgid argument, 0 for "all"
    after: int = 0       # listing cursor
    limit: int = 0


class CtlReply(Msg, **_m("ctl_reply")):
    reqid: int
    ok: bool
    text: str = ""
    count: int = 0


class QueueListEntry(msgspec.Struct, kw_only=True):
    """One `show queue` line's worth of data (formatted by smtpctl)."""
    evpid: int
    runstate: str        # "pending" | "inflight" | "offline"
    runtime: int | None
    suspended: bool = False
    held: bool = False
    expire: int = 0      # ctime + the ttl that applies (filled by the queue)
    envelope: Envelope | None = None


class SchedListReply(Msg, **_m("sched_list_reply")):
    """scheduler -> queue: a batch of envelopes to describe to control."""
    reqid: int
    entries: list[QueueListEntry]
    more: bool
    last: int            # listing cursor: the last evpid the scheduler looked at


class CtlListReply(Msg, **_m("ctl_list_reply")):
    """queue -> control: the batch with envelopes loaded from disk."""
    reqid: int
    entries: list[QueueListEntry]
    more: bool
    last: int


# --- scheduler: delay notices, hold queues (issue 3; docs/queue.md "Scheduler") ------------

class SchedEnvelopeBounce(Msg, **_m("sched_envelope_bounce")):
    """scheduler -> queue: a delay notice is due for this envelope (`bounce
    warn-interval`): ``delay`` is the interval reached.  The queue creates the
    `delayed` bounce and stores last-bounce = ctime + delay; no answer."""
    evpid: int
    delay: int


class QueueHoldqHold(Msg, **_m("queue_holdq_hold")):
    """queue -> scheduler: the MTA answered an envelope with "hold" (its route is
    failing): park it in hold queue ``holdq`` until released or its next retry."""
    evpid: int
    holdq: int


class MtaHoldqRelease(Msg, **_m("mta_holdq_release")):
    """pony -> queue: a delivery to the route of hold queue ``holdq`` succeeded:
    release ``n`` of its envelopes (0: all).  Relayed to the scheduler as
    QueueHoldqRelease (pony has no channel to it)."""
    holdq: int
    n: int = 0


class QueueHoldqRelease(Msg, **_m("queue_holdq_release")):
    holdq: int
    n: int = 0


# --- start-up and configuration reload (parent <-> every child; docs/ops.md) --------------

class ConfEndDone(Msg, **_m("conf_end_done")):
    """Child -> parent: conf_end applied (pony: its listeners accept connections).
    The parent tells systemd READY=1 once every child has said so."""
    proc: str


class ConfReloadPrepare(Msg, **_m("conf_reload_prepare")):
    """Parent -> child: a new configuration, read and checked by the parent (the only
    process that can still read every file: the children dropped privileges).  The
    child checks that it can apply it and keeps it pending until commit or abort.
    ``listeners`` (pony): the listener index of each socket the parent passes over the
    fd channel for this generation, in order.  ``tls_files`` (pony alone): every pki's
    certificate and key and every ca's certificates as the parent read them
    (smtpd.tls.read_tls_files: path as configured -> contents), since pony, chrooted
    and unprivileged, cannot read them.  Key material: the repr shows sizes only."""
    reqid: int
    generation: int
    config: bytes                  # smtpd.config.encode_config() of the new model
    listeners: list[int] = []
    tls_files: dict[str, bytes] = {}

    def __repr__(self) -> str:
        sizes = {path: len(data) for path, data in self.tls_files.items()}
        return (f"ConfReloadPrepare(reqid={self.reqid}, generation={self.generation}, "
                f"config=<{len(self.config)} bytes>, listeners={self.listeners}, "
                f"tls_files={sizes})")


class ConfReloadCommit(Msg, **_m("conf_reload_commit")):
    """Parent -> child: every child is prepared; apply the pending configuration."""
    reqid: int
    generation: int


class ConfReloadAbort(Msg, **_m("conf_reload_abort")):
    """Parent -> child: drop the pending configuration and keep the current one."""
    generation: int


class ConfReloadReply(Msg, **_m("conf_reload_reply")):
    """Child -> parent: answer to prepare or commit."""
    reqid: int
    proc: str
    ok: bool
    error: str = ""


# --- control <-> every process: introspection (smtpctl trace/profile/show stats/monitor) ----

class CtlProfile(Msg, **_m("ctl_profile")):
    """control -> every process: the new profiling mask (common.trace PROFILE_*)."""
    mask: int
    reqid: int = 0


class StatGet(Msg, **_m("stat_get")):
    """control -> a process: send your counters (common.stat)."""
    reqid: int


class StatReply(Msg, **_m("stat_reply")):
    """A process's counters, and the running totals of their increments and
    decrements (monitor counts connects and disconnects, enqueues and dequeues).
    The parent's also carries ``processes``: the resource usage of every process,
    by name (smtpd/metrics.py process_usage), which only it can read in /proc."""
    reqid: int
    proc: str
    values: dict[str, Union[int, float]]
    increments: dict[str, int] = {}
    decrements: dict[str, int] = {}
    processes: dict[str, dict[str, float]] = {}


# --- queue administration (smtpctl discover/uncorrupt/show envelope/show message) ---------
# control -> queue: CtlRequest(command="discover"|"uncorrupt", id=msgid or evpid), answered
# with CtlReply(ok, text, count); CtlRequest(command="show envelope"|"show message", id=...)
# answered with CtlContentReply.

class CtlContentReply(Msg, **_m("ctl_content_reply")):
    """queue -> control: the bytes of a spool file (show envelope / show message).
    ``error`` is the strerror text when the file cannot be read."""
    reqid: int
    ok: bool
    data: bytes = b""
    error: str = ""


class QueueEnvelopeRemove(Msg, **_m("queue_envelope_remove")):
    """queue -> scheduler: forget this envelope, its message was moved to corrupt/
    (OpenSMTPD's IMSG_QUEUE_ENVELOPE_REMOVE for an envelope that cannot be loaded).
    No order comes back and nothing is counted as a delivery."""
    evpid: int


# --- bounces, DSN, internal enqueue (docs/queue.md "Bounces and DSN") ----------------------

class PonyEnqueue(Msg, **_m("pony_enqueue")):
    """queue (a bounce) or parent (an offline/ file) -> pony: inject a message as a
    local SMTP session would (create, expand each recipient through lka as mail from
    local, write, commit).  ``data``: the message, LF line endings, no Received line
    yet.  ``bounce`` marks a notice from <>: its envelopes carry the bounce flag."""
    reqid: int
    sender: str              # "" for <>
    recipients: list[str]
    data: bytes
    bounce: bool = False
    origin: str = ""         # for log lines: "bounce", "offline"
    # issue 11 (sendmail): DSN options (-N, -R, -V; checked) and the submitting
    # user's uid (SO_PEERCRED, or the offline file's owner), for the log line.
    dsn_notify: int = 0
    dsn_ret: str = ""
    dsn_envid: str = ""
    uid: int = -1


class PonyEnqueueReply(Msg, **_m("pony_enqueue_reply")):
    reqid: int
    status: str              # "ok" | "tempfail" | "permfail"
    text: str = ""           # the SMTP-style reply that decided it
    msgid: int = 0


# --- robust (issue 3): loading a big queue at start ------------------------------------

class QueueEnvelopeSubmitBatch(Msg, **_m("queue_envelope_submit_batch")):
    """queue -> scheduler at start: envelopes of messages already committed in the spool,
    about a thousand per send rather than one (100,000 envelopes load in seconds).
    A message's envelopes are never split over two batches: the scheduler stages
    them and commits each of their messages at once."""
    entries: list[SchedEntry]


class RequestFailed(Msg, **_m("request_failed")):
    """Any process -> the sender of a request whose handler raised: the requester
    fails at once (common.ipc.PeerFailed) instead of waiting for its timeout."""
    reqid: int
    error: str


# --- local delivery: bodies by descriptor (issue 11; docs/delivery.md) -----------------------

class MdaMessageOpen(Msg, **_m("mda_message_open")):
    """pony -> queue: open this message for a local delivery.  The queue sends the
    read-only descriptor over the queue -> pony fd channel under ``reqid``
    (smtpd/fd_channel.py), then answers MdaMessageOpened."""
    reqid: int
    msgid: int


class MdaMessageOpened(Msg, **_m("mda_message_opened")):
    reqid: int
    ok: bool
    error: str = ""


# --- issue 11: sendmail(8) through the running daemon -------------------------------------

class CtlEnqueue(Msg, **_m("ctl_enqueue")):
    """control -> parent: a message a local user submits with sendmail (the
    ``enqueue`` request of the control socket).  ``uid`` is the client's, from
    SO_PEERCRED: the parent (root, not chrooted) turns it into the login name that is
    the default sender and into the full name of the From: field; ``sender`` is
    sendmail's -f, which any user may give.  Answered by PonyEnqueueReply (same
    reqid), once pony has stored the message or refused it."""
    reqid: int
    uid: int
    sender: str              # -f/-r, as given; "" = the user's login name
    fullname: str            # -F, "" = the GECOS name
    recipients: list[str]
    data: bytes              # the message, LF line endings, Bcc fields already removed
    dsn_notify: str = ""     # -N, -R, -V as given (the parent checks them)
    dsn_ret: str = ""
    dsn_envid: str = ""


# --- MTA routing administration (issue 10: smtpd/mta.py, smtpd/mta_routes.py) --------------
# control -> pony: CtlRequest(command="show routes"|"show hosts"|"show relays"|"show hoststats"|
# "show mta paused") answered with CtlLinesReply; CtlRequest(command="resume route", id=ROUTE
# or 0 for all) and CtlMtaBlock answered with CtlReply.

class CtlLinesReply(Msg, **_m("ctl_lines_reply")):
    """pony -> control: the lines of a `show routes|hosts|relays|hoststats|mta paused`."""
    reqid: int
    lines: list[str] = []


class CtlMtaBlock(Msg, **_m("ctl_mta_block")):
    """control -> pony: `smtpctl pause|resume mta from SOURCE for DOMAIN` (block: pause)."""
    reqid: int
    block: bool
    source: str
    domain: str


class SchedEnvelopeWithdraw(Msg, **_m("sched_envelope_withdraw")):
    """scheduler -> queue -> pony: an envelope in flight was removed or paused
    (`smtpctl remove|pause envelope`): the MTA takes it out of a task not yet sent and
    answers it with a temporary failure, so the scheduler finishes the removal or
    keeps it paused at once.  The queue passes it on unchanged; no answer."""
    evpid: int


# --- relay AUTH (issue 10): pony -> lka, the credentials of a relay URL's label ------------

class MtaLookupCredentials(Msg, **_m("mta_lookup_credentials")):
    """IMSG_MTA_LOOKUP_CREDENTIALS: ``label`` of ``smtp+tls://label@host`` in the
    action's ``auth <table>``."""
    reqid: int
    table: str
    label: str


class MtaCredentialsReply(Msg, **_m("mta_credentials_reply")):
    reqid: int
    status: str              # "ok" | "permfail" (no such label) | "tempfail"
    user: str = ""
    password: str = ""


# --- filters (issue 9): pony <-> lka, lka <-> parent (docs/filters.md) -----------------------

class FilterSmtpBegin(Msg, **_m("filter_smtp_begin")):
    """pony -> lka: a session of a listener with ``filter NAME`` starts (IMSG_FILTER_SMTP_BEGIN
    with IMSG_REPORT_SMTP_LINK_CONNECT's facts); lka answers which phases and report
    events its chain asks for, so pony asks nothing else."""
    reqid: int
    session: int
    filter: str
    rdns: str
    src: str                 # "ip:port" or "unix:PATH"
    dest: str
    time: float


class FilterSmtpBeginReply(Msg, **_m("filter_smtp_begin_reply")):
    reqid: int
    phases: list[str]
    events: list[str]
    ok: bool = True          # False: a filter of the chain is not running (the session gets 421)


class FilterSmtpEnd(Msg, **_m("filter_smtp_end")):
    """pony -> lka: the session is over (IMSG_FILTER_SMTP_END)."""
    session: int


class FilterReportEvent(msgspec.Struct, kw_only=True):
    """One report event (IMSG_REPORT_SMTP_*): its name, parameters and time."""
    event: str
    params: list[str]
    time: float


class FilterSmtpReport(Msg, **_m("filter_smtp_report")):
    """pony -> lka: the report events of a session since its last message to lka, for the
    filters registered to them (one message per batch, not per event)."""
    session: int
    events: list[FilterReportEvent]


class FilterSmtpProtocol(Msg, **_m("filter_smtp_protocol")):
    """pony -> lka: what does the chain say about this phase (IMSG_FILTER_SMTP_PROTOCOL)."""
    reqid: int
    session: int
    phase: str
    param: str
    time: float


class FilterSmtpProtocolReply(Msg, **_m("filter_smtp_protocol_reply")):
    """lka -> pony: proceed, junk, reject, disconnect, rewrite (``param``: the reply or the
    new parameter) or tempfail (a filter failed: 421/451 4.3.0)."""
    reqid: int
    decision: str
    param: str | None = None


class FilterSmtpData(Msg, **_m("filter_smtp_data")):
    """pony -> lka: body bytes of a filtered message (unstuffed, LF), as they come, in
    chunks (one message per chunk, not per line); ``last``: the final dot."""
    session: int
    chunk: bytes
    last: bool = False
    first: bool = False


class FilterSmtpDataOut(Msg, **_m("filter_smtp_data_out")):
    """lka -> pony: what the data-line filters wrote, gathered per read; ``done`` after
    their final dot; ``failed``: a filter failed (the message gets 451 4.3.0)."""
    session: int
    chunk: bytes
    done: bool = False
    failed: bool = False


class FilterProcFork(Msg, **_m("filter_proc_fork")):
    """lka -> parent: start (or restart) filter process NAME; its stdin/stdout and stderr
    reach lka over the fd channel (smtpd/filter_proc.py), as OpenSMTPD's parent forks
    processors and hands their fds to lka."""
    name: str
    generation: int


class FilterProcKill(Msg, **_m("filter_proc_kill")):
    """lka -> parent: kill filter process ``pid`` of NAME (it hung or wrote garbage)."""
    name: str
    pid: int

# --- tables (issue 11): smtpctl update table -----------------------------------------------

class CtlUpdateTable(Msg, **_m("ctl_update_table")):
    """control -> lka: ``smtpctl update table NAME``: reload what the table's backend
    caches (re-read its file, reopen its db, send ``update`` to its program); lka
    answers CtlReply (ok, or text saying why not).  lka is the one process that holds
    tables; the others ask it."""
    reqid: int
    name: str


# --- recipient expansion (issue 11): lka asks the parent for users' files ----------------

class LkaOpenForward(Msg, **_m("lka_open_forward")):
    """lka -> parent: the text of a file an expansion needs, read as root with
    OpenSMTPD's checks (smtpd/forward.py; OpenSMTPD's IMSG_LKA_OPEN_FORWARD).
    ``kind`` "forward": ``home``/.forward of ``user`` (uid ``uid``); "include": the
    :include: file ``path`` an aliases table names."""
    reqid: int
    kind: str                # "forward" | "include"
    user: str = ""
    home: str = ""
    uid: int = -1
    gid: int = -1
    path: str = ""


class LkaOpenForwardReply(Msg, **_m("lka_open_forward_reply")):
    """parent -> lka."""
    reqid: int
    status: str              # "ok" | "absent" | "tempfail" | "permfail"
    content: str = ""


# --- relay sources (issue 10, gaps): pony -> lka, `relay src <table>` and `helo-src <table>` ---

class MtaLookupSource(Msg, **_m("mta_lookup_source")):
    """IMSG_MTA_LOOKUP_SOURCE: the next local address of a relay's ``src`` table (lka
    fetches the table's ``source`` service, which goes round its entries)."""
    reqid: int
    table: str


class MtaSourceReply(Msg, **_m("mta_source_reply")):
    reqid: int
    status: str              # "ok" | "permfail" (empty table) | "tempfail"
    address: str = ""


class MtaLookupHelo(Msg, **_m("mta_lookup_helo")):
    """IMSG_MTA_LOOKUP_HELO: the HELO name of a source address in a ``helo-src`` table
    (the ``addrname`` service)."""
    reqid: int
    table: str
    address: str


class MtaHeloReply(Msg, **_m("mta_helo_reply")):
    reqid: int
    status: str              # "ok" | "permfail" (address not in the table) | "tempfail"
    name: str = ""


# --- issue 12: queue (fewer messages per mail: batches where a wake-up serves several) -----

class LkaEnvelopesSubmit(Msg, **_m("lka_envelopes_submit")):
    """lka -> queue: every envelope one RCPT expanded to, in one message; the queue
    answers pony with one QueueEnvelopeCommitReply that carries their evpids."""
    reqid: int
    msgid: int
    envelopes: list[Envelope]

    def trace_ids(self) -> list[str]:
        return [f"evpid={env.id:016x}" for env in self.envelopes[:TRACE_IDS_MAX] if env.id]


class QueueCommitBatch(Msg, **_m("queue_commit_batch")):
    """queue -> scheduler: the envelopes of the messages one group commit made durable,
    in message order (what a QueueEnvelopeSubmit per envelope and a QueueMessageCommit
    per message did): the scheduler stages and commits each message in turn, with the
    same traces and counters."""
    entries: list[SchedEntry]

    def trace_ids(self) -> list[str]:
        msgids = dict.fromkeys(e.evpid >> 32 for e in self.entries[:TRACE_IDS_MAX])
        return ([f"msgid={m:08x}" for m in msgids]
                + [f"evpid={e.evpid:016x}" for e in self.entries[:TRACE_IDS_MAX]])


class SchedOrders(Msg, **_m("sched_orders")):
    """scheduler -> queue: the orders of one scheduling pass, in their order (what a
    SchedEnvelopeDeliver/Transfer/Expire/Remove per envelope did): (kind, evpid) with
    kind "deliver", "transfer", "expire" or "remove"."""
    orders: list[tuple[str, int]]

    def trace_ids(self) -> list[str]:
        return [f"evpid={evpid:016x}" for _, evpid in self.orders[:TRACE_IDS_MAX]]


class QueueDeliveredBatch(Msg, **_m("queue_delivered_batch")):
    """queue -> scheduler: envelopes delivered (and removed) within a few milliseconds,
    in one message (what a QueueDeliveryOk per envelope did); the scheduler forgets
    each with the same trace and counters."""
    evpids: list[int]

    def trace_ids(self) -> list[str]:
        return [f"evpid={evpid:016x}" for evpid in self.evpids[:TRACE_IDS_MAX]]


TRACE_IDS_MAX = 32      # ids of a batch message shown in a trace line


# --- issue 12: local delivery workers, pony <-> parent (docs/delivery.md) ------------------

class MdaWorkerSpawn(Msg, **_m("mda_worker_spawn")):
    """pony -> parent: fork a delivery worker that runs as (uid, gid) and serves the
    socket that came first over the pony -> parent fd channel under ``reqid`` (pony
    keeps the other end and sends its requests there).  Answered by MdaWorkerSpawned."""
    reqid: int
    uid: int
    gid: int


class MdaWorkerSpawned(Msg, **_m("mda_worker_spawned")):
    reqid: int
    status: str          # "ok" | "tempfail" | "permfail" (uid 0)
    error: str = ""
    pid: int = 0


class MdaWorkerKill(Msg, **_m("mda_worker_kill")):
    """pony -> parent: a worker past its delivery deadline; the parent kills it if it
    is one of its own."""
    pid: int


class MdaWorkerExit(Msg, **_m("mda_worker_exit")):
    """pony -> parent: how did this worker end (it closed its socket mid-delivery)?"""
    reqid: int
    pid: int


class MdaWorkerExitReply(Msg, **_m("mda_worker_exit_reply")):
    reqid: int
    text: str            # "terminated; signal 9", "delivery process exited with status 1"...


class MdaMboxPrepare(Msg, **_m("mda_mbox_prepare")):
    """pony -> parent: make ``<spool>/<username>`` for (uid, gid) when missing, the
    spool taken from ``action`` in the parent's own configuration (root creates the
    file: pony never names its path).  Answered by MdaMboxPrepared with the path."""
    reqid: int
    action: str
    username: str
    uid: int
    gid: int


class MdaMboxPrepared(Msg, **_m("mda_mbox_prepared")):
    reqid: int
    status: str          # "ok" | "tempfail" | "permfail"
    error: str = ""
    path: str = ""


Message = Union[
    RequestFailed, SetupDone, ConfEnd, CtlVerbose,
    SmtpMessageCreate, SmtpMessageCreateReply, SmtpExpandRcpt, SmtpExpandRcptReply,
    SmtpAuthenticate, SmtpAuthenticateReply, SmtpCheckSender, SmtpCheckSenderReply,
    QueueEnvelopeCommitReply,
    SmtpMessageData, SmtpMessageCommit, SmtpMessageCommitReply, SmtpMessageRollback,
    QueueEnvelopeSubmit, QueueMessageCommit, QueueMessageRollback,
    SchedEnvelopeDeliver, SchedEnvelopeTransfer, SchedEnvelopeRemove, SchedEnvelopeExpire,
    QueueDeliveryOk, QueueDeliveryTempfail, QueueDeliveryPermfail, QueueDeliveryLoop,
    QueueEnvelopeAck, QueueDeliver, QueueTransfer, MessageOpen, MessageContent, DeliveryResult,
    MdaLookupUserinfo, MdaLookupUserinfoReply, MtaDnsLookup, MtaDnsReply,
    CtlRequest, CtlReply, SchedListReply, CtlListReply,
    ConfEndDone, ConfReloadPrepare, ConfReloadCommit, ConfReloadAbort, ConfReloadReply,
    CtlProfile, StatGet, StatReply,
    SchedEnvelopeBounce, QueueHoldqHold, MtaHoldqRelease, QueueHoldqRelease,
    CtlContentReply, QueueEnvelopeRemove,
    PonyEnqueue, PonyEnqueueReply,
    QueueEnvelopeSubmitBatch,
    MdaMessageOpen, MdaMessageOpened,
    CtlEnqueue,
    MtaLookupCredentials, MtaCredentialsReply,
    CtlLinesReply, CtlMtaBlock, SchedEnvelopeWithdraw,
    FilterSmtpBegin, FilterSmtpBeginReply, FilterSmtpEnd, FilterSmtpReport, FilterSmtpProtocol,
    FilterSmtpProtocolReply, FilterSmtpData, FilterSmtpDataOut, FilterProcFork, FilterProcKill,
    CtlUpdateTable,
    LkaOpenForward, LkaOpenForwardReply,
    MtaLookupSource, MtaSourceReply, MtaLookupHelo, MtaHeloReply,
    LkaEnvelopesSubmit, QueueCommitBatch, SchedOrders, QueueDeliveredBatch,   # issue 12: queue
    MdaWorkerSpawn, MdaWorkerSpawned, MdaWorkerKill, MdaWorkerExit, MdaWorkerExitReply,
    MdaMboxPrepare, MdaMboxPrepared,                                          # issue 12: mda
]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Msg:
    """Raises msgspec.DecodeError / ValidationError on anything not in the contract."""
    return _decoder.decode(data)


def type_name(msg: Msg) -> str:
    return msg.__struct_config__.tag  # type: ignore[return-value]


def ids_of(msg: Msg) -> str:
    """The ids a message carries, for `trace mproc` lines."""
    parts = []
    for field in ("reqid", "msgid", "evpid"):
        value = getattr(msg, field, None)
        if value:
            parts.append(f"{field}={value:016x}" if field != "msgid" else f"msgid={value:08x}")
    env = getattr(msg, "envelope", None)
    if isinstance(env, Envelope) and env.id:
        parts.append(f"evpid={env.id:016x}")
    entry = getattr(msg, "entry", None)
    if isinstance(entry, SchedEntry):
        parts.append(f"evpid={entry.evpid:016x}")
    if hasattr(msg, "trace_ids"):      # a batch: the ids it carries (issue 12)
        parts += msg.trace_ids()
    return " ".join(parts)


# --- smtpctl <-> control (the control socket) ------------------------------------------------

class ClientRequest(msgspec.Struct, tag="client_request", kw_only=True):
    version: int
    command: str                 # canonical command path, e.g. "show queue"
    args: dict[str, object] = {}


class ClientResult(msgspec.Struct, tag="client_result", kw_only=True):
    ok: bool
    text: str = ""
    count: int = 0
    data: dict[str, object] = {}


class ClientQueueBatch(msgspec.Struct, tag="client_queue_batch", kw_only=True):
    entries: list[QueueListEntry]


class ClientEnd(msgspec.Struct, tag="client_end", kw_only=True):
    """Ends a streamed reply."""


class ClientContent(msgspec.Struct, tag="client_content", kw_only=True):
    """A piece of a spool file (show envelope / show message), in order; ClientEnd ends it.
    Also client -> control after an ``enqueue`` request: the message sendmail submits."""
    data: bytes


ClientMessage = Union[ClientRequest, ClientResult, ClientQueueBatch, ClientEnd, ClientContent]
_client_decoder = msgspec.msgpack.Decoder(ClientMessage)


def encode_client(msg) -> bytes:
    return _encoder.encode(msg)


def decode_client(data: bytes):
    return _client_decoder.decode(data)

