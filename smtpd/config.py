"""The configuration model (what smtpd.conf says), shared by every process."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from smtpd import netif


class ConfigError(Exception):
    def __init__(self, file: str, line: int | None, message: str) -> None:
        self.file, self.line, self.message = file, line, message
        super().__init__(f"{file}:{line}: {message}" if line else f"{file}: {message}")


@dataclass
class Listener:
    address: str
    port: int = 25
    family: str | None = None
    hostname: str | None = None
    tag: str | None = None
    lineno: int = 0
    file: str = ""
    # TLS (issue 8): "" none, "starttls" (``tls``), "require" (``tls-require``: MAIL and AUTH
    # refused until STARTTLS), "smtps" (TLS from the first byte).
    tls: str = ""
    tls_verify: bool = False           # ``verify``: a client certificate checked against ``ca``
    pki: list[str] = field(default_factory=list)   # first = default, the others chosen by SNI
    ca: str | None = None
    ciphers: str | None = None         # OpenSSL cipher list; None = ``smtp ciphers`` or the default
    protocols: str | None = None       # libtls syntax ("tlsv1.2,tlsv1.3", "secure", "all")
    # AUTH: "" none, "required" (``auth``: MAIL refused before AUTH), "optional" (``auth-optional``)
    auth: str = ""
    auth_table: str | None = None      # credentials table; None = the system's accounts
    senders: str | None = None         # ``senders <table>``: which MAIL FROM an authenticated user may use
    masquerade: bool = False
    hostnames: str | None = None
    proxy_v2: bool = False
    mask_src: bool = False
    no_dsn: bool = False
    received_auth: bool = False
    filter: str | None = None          # ``filter NAME`` / ``filter { a, b }``: the chain its sessions go through


@dataclass
class FilterProc:
    """``proc NAME "cmd" [user U] [group G] [chroot D]``, or the process of a
    ``filter NAME proc-exec "cmd"`` (named after its filter)."""
    name: str
    command: str
    user: str | None = None
    group: str | None = None
    chroot: str | None = None
    protocol: str = "0.7"              # pysmtpd's ``protocol 0.6``: the version spoken to it
    lineno: int = 0
    file: str = ""


@dataclass
class FilterCheck:
    """One condition of a builtin filter: ``[!] KIND [regex] [<table>]`` (smtpd.conf(5))."""
    kind: str                          # fcrdns | rdns | src | helo | auth | mail-from | rcpt-to
    negate: bool = False
    regex: bool = False
    table: str | None = None           # None: the bare ``rdns``, ``fcrdns``, ``auth``


@dataclass
class Filter:
    """``filter NAME proc P`` / ``proc-exec "cmd"`` (kind "proc", ``proc`` names the
    FilterProc), ``filter NAME phase PHASE match CHECK ACTION`` (kind "builtin"),
    ``filter NAME chain { a, b }`` (kind "chain", ``chain`` lists filter names)."""
    name: str
    kind: str                          # "proc" | "builtin" | "chain"
    proc: str | None = None
    phase: str = ""                    # builtin: connect, helo, ehlo, auth, mail-from, rcpt-to, data, commit
    check: FilterCheck | None = None
    action: str = ""                   # builtin: junk | bypass | reject | disconnect | rewrite | report
    action_text: str = ""              # the reply (reject/disconnect), parameter (rewrite) or report text
    chain: list[str] = field(default_factory=list)
    lineno: int = 0
    file: str = ""


@dataclass
class Pki:
    """``pki NAME cert FILE`` / ``key FILE`` / ``dhe none|auto|legacy``: NAME is the host
    name the certificate serves (``*`` the catch-all), lower-cased as OpenSMTPD does."""
    name: str
    cert: str | None = None
    key: str | None = None
    dhe: str = "none"
    lineno: int = 0
    file: str = ""


@dataclass
class Ca:
    """``ca NAME cert FILE``: the certificates a ``verify`` listener trusts."""
    name: str
    cert: str | None = None
    lineno: int = 0
    file: str = ""


@dataclass
class Table:
    name: str
    backend: str                       # "static" (inline or file:) or an external type
    config: str | None
    values: list[str] | dict[str, str] | None
    lineno: int = 0
    # smtpd/parse_table.py: "list" or "hash" (a file or inline table), "dynamic" (others);
    # the file as the parent found it (under -r root); a table program's (path, argv)
    kind: str = ""
    source: str = ""
    command: tuple[str, list[str]] | None = None


@dataclass
class Action:
    name: str
    method: str                        # "maildir" | "mbox" | "lmtp" | "mda" | "relay" | ...
    target: str | None = None
    alias: str | None = None
    virtual: str | None = None
    userbase: str | None = None
    user: str | None = None
    junk: bool = False
    wrapper: str | None = None         # ``wrapper NAME``: run the mda through ``mda wrapper NAME``
    lmtp_rcpt_to: bool = False         # ``lmtp DEST rcpt-to``: RCPT TO the original recipient
    host: str | None = None
    helo: str | None = None
    ttl: int | None = None
    lineno: int = 0
    # relay routing options (smtpd/parse_mta.py): `backup [mx NAME]`, `src`, `helo-src`, `mail-from`
    backup: bool = False
    backup_mx: str | None = None
    src: str | None = None             # a source address, or a table's name
    helo_src: str | None = None        # a table: source address -> HELO name
    mail_from: str | None = None
    # relay TLS and AUTH (issue 10, smtpd/parse_relay.py, docs/mta.md)
    tls_required: bool = False         # ``tls [no-verify]``: STARTTLS at least, never plain text
    tls_verify: bool = False           # ``tls`` without no-verify: the server's certificate checked
    auth_table: str | None = None      # ``auth <table>``: credentials for the relay URL's label
    relay_pki: str | None = None       # ``pki NAME``: the client certificate shown to the relay
    relay_ca: str | None = None        # ``ca NAME``: trusted instead of the system's CAs
    relay_protocols: str | None = None
    relay_ciphers: str | None = None


@dataclass
class Condition:
    kind: str                          # "from" | "for" | "tag" | "helo" | "mail-from" | "rcpt-to" | "auth"
    what: str                          # from: any|local|src|...; for: any|local|domain|rcpt-to
    table: str | None = None
    negate: bool = False
    regex: bool = False


@dataclass
class Rule:
    conditions: list[Condition]
    action: str | None
    reject: bool
    lineno: int


@dataclass
class Config:
    file: str
    hostname: str
    listeners: list[Listener] = field(default_factory=list)
    tables: dict[str, Table] = field(default_factory=dict)
    actions: dict[str, Action] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    pki: dict[str, Pki] = field(default_factory=dict)
    ca: dict[str, Ca] = field(default_factory=dict)
    tls_ciphers: str | None = None     # ``smtp ciphers``: the default of every listener
    max_message_size: int = 35 * 1024 * 1024
    queue_ttl: int = 4 * 86400
    bounce_warn_interval: list[int] = field(default_factory=lambda: [4 * 3600])
    smtp_max_mails: int = 100
    smtp_max_rcpt: int = 1000
    # pysmtpd's session limits ("smtp limit max-sessions N max-sessions-per-address N
    # command-timeout D data-timeout D"): OpenSMTPD bounds sessions by its file
    # descriptors and times out idle ones after 300 s (SMTPD_SESSION_TIMEOUT).
    smtp_max_sessions: int = 768
    smtp_max_sessions_per_address: int = 64
    smtp_command_timeout: int = 300
    smtp_data_timeout: int = 300
    sub_addr_delim: str = "+"
    mta_max_deferred: int = 100
    # `mta limit [for domain D] KEY VALUE` (smtpd/parse_mta.py): per domain ("" for the
    # default) the keys set, applied over smtpd/mta_routes.Limits' defaults
    mta_limits: dict[str, dict[str, int]] = field(default_factory=dict)
    # `mta resolver ADDR... [port N]`: the DNS servers lka asks (default: the system's)
    mta_resolver: list[str] = field(default_factory=list)
    mta_resolver_port: int = 53
    # `mta mx-port N`: the port MX relaying connects to (25; a test and ops knob)
    mta_mx_port: int = 25
    macros: dict[str, str] = field(default_factory=dict)
    # pysmtpd's Prometheus endpoint ("metrics listen on ADDR port N"), off when None.
    metrics_address: str | None = None
    metrics_port: int = 0
    # filters (issue 9, smtpd/parse_filter.py, docs/filters.md)
    filter_procs: dict[str, FilterProc] = field(default_factory=dict)
    filters: dict[str, Filter] = field(default_factory=dict)
    filter_timeout: int = 60           # ``smtp limit filter-timeout D``: a filter silent this long is restarted
    # "file:line: X is accepted but not applied yet": statements of the grammar whose
    # feature comes with a later issue.  Logged at start and by smtpd -n, never silent.
    not_applied: list[str] = field(default_factory=list)
    mda_wrappers: dict[str, str] = field(default_factory=dict)    # ``mda wrapper NAME "command"``


def default_hostname(mailname_files=("/etc/mail/mailname", "/etc/mailname")) -> str:
    """The name the daemon gives itself, as OpenSMTPD's getmailname(): the first line
    of a mailname file, else gethostname(3), canonicalised through the resolver when
    it has no dot.  Never socket.getfqdn(): it picks the first alias of the host's
    address, which is "localhost" wherever /etc/hosts maps the name to 127.0.0.1."""
    for path in mailname_files:
        try:
            with open(path) as f:
                name = f.readline().strip()
            if name:
                return name
        except OSError:
            pass
    name = socket.gethostname()
    if "." in name:
        return name
    try:
        infos = socket.getaddrinfo(name, None, flags=socket.AI_CANONNAME)
    except (OSError, UnicodeError):
        return name
    canonical = next((info[3] for info in infos if info[3]), "")
    return canonical or name


def _interfaces() -> dict[str, list[tuple[int, str]]]:
    """Interface name -> [(family, address)] of this machine (rtnetlink: smtpd/netif.py);
    none if netlink cannot be used, and then only literal addresses and localhost
    listen."""
    try:
        return netif.interface_addresses()
    except OSError:
        return {}


def resolve_listener_addresses(listener: Listener,
                               ifaces: dict[str, list[tuple[int, str]]] | None = None) -> list[tuple[int, str]]:
    addr = listener.address
    fams = {"inet4": (socket.AF_INET,), "inet6": (socket.AF_INET6,)}.get(
        listener.family or "", (socket.AF_INET, socket.AF_INET6))
    try:
        ip = ipaddress.ip_address(addr)
        return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, str(ip))]
    except ValueError:
        pass
    if addr == "localhost":
        out = [(f, a) for f, a in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")) if f in fams]
        return out[:1] if socket.AF_INET in fams else out
    if ifaces is None:
        ifaces = _interfaces()
    if addr in ("all", "egress", "any"):
        found = [(f, a) for lst in ifaces.values() for f, a in lst if f in fams]
    else:
        found = [(f, a) for f, a in ifaces.get(addr, []) if f in fams]
    if not found:
        raise ConfigError(listener.file, listener.lineno, f"invalid virtual ip or interface: {addr}")
    return [(f, a) for f, a in found if not a.startswith("fe80")]


def check_config(config: Config, ifaces: dict[str, list[tuple[int, str]]] | None = None,
                 root: Path | None = None) -> None:
    """What smtpd -n (and the parent, at start) checks beyond the grammar: every
    listener names an address or an interface of this machine (``ifaces`` stands in
    for the machine's), and every pki and ca loads as TLS will use it (smtpd/tls.py;
    ``root`` stands in for "/")."""
    for listener in config.listeners:
        if listener.address != "socket":
            resolve_listener_addresses(listener, ifaces)
    from smtpd import tls          # tls imports this module (the model)
    tls.check_tls(config, root)


def encode_config(config: Config) -> bytes:
    """The model as msgpack, for the parent to send at a reload (ConfReloadPrepare)."""
    return msgspec.msgpack.encode(config)


def decode_config(data: bytes) -> Config:
    """The model sent by the parent; raises msgspec.ValidationError if malformed."""
    return msgspec.msgpack.decode(data, type=Config)
