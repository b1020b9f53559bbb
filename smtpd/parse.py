"""smtpd.conf parser (OpenSMTPD 6.4+ grammar).

Line based: a statement per logical line (``\\`` continues it), ``#`` comments,
``name = value`` macros used as ``$name`` (``-D name=value`` wins), quoted
strings, ``<table>`` references and inline ``{ a, b }`` / ``{ k = v }`` tables.
Every error names FILE:LINE, the token found and what was expected.  The files it
names are opened and checked by smtpd/config_files.py (regular, owner, modes); an
include loop is named with its chain of files.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path

from common.durations import parse_duration
from smtpd import parse_table
from smtpd.parse_table import load_table_file  # noqa: F401  (tests and callers read files through it)
from smtpd.config import (
    Action, Ca, Condition, Config, ConfigError, Listener, Pki, Rule, Table, default_hostname,
)
from smtpd import parse_mta
from smtpd.config_files import FileRefused, check_file, read_checked
from smtpd import parse_action
from smtpd import parse_filter
from smtpd.parse_relay import relay_option

OLD_GRAMMAR = {"accept", "deliver", "map", "expire", "ssl", "limit"}
OLD_HINT = ' (pre-6.4 accept/deliver grammar; see smtpd.conf(5): use "action" and "match")'
LOCAL_METHODS = {"mbox", "maildir", "lmtp", "mda", "forward-only", "expand-only"}
_TOKEN = re.compile(r'''\s*(?:("(?:[^"\\]|\\.)*")|('[^']*')|(<[^<>\s]+>)|(=>|[{},=!])|([^\s{},="'<>!]+(?:!?[^\s{},="'<>]*)*))''')
_SIZE = re.compile(r"^(\d+)([kKmMgG]?)[bB]?$")
MAX_INCLUDE_DEPTH = 10
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?")
PKI_MAX = 32                     # parse.y's bound on pki per listener


class Tok(str):
    quoted = False
    ref = False


class Parser:
    def __init__(self, path: str, macros: dict[str, str] | None, root: Path | None = None) -> None:
        # root: where absolute paths (include, table files) are looked up; "/" but
        # in tests that check real-world configs against placeholder files.
        self.root = root
        self.cli_macros = dict(macros or {})
        self.config = Config(file=path, hostname=default_hostname())
        self.config.macros.update(self.cli_macros)
        self.anon = 0
        self.file = path
        self.line = 0
        # the files being read, from the top one: [path, (device, inode), line of the
        # include statement being followed]
        self.reading: list[list] = []

    def not_yet(self, what: str) -> None:
        note = f"{self.file}:{self.line}: {what} is accepted but not applied yet"
        if note not in self.config.not_applied:
            self.config.not_applied.append(note)

    def fs(self, path: Path) -> Path:
        if self.root is not None and path.is_absolute():
            return self.root / path.relative_to("/")
        return path

    # -- lexing -------------------------------------------------------------------------------

    def err(self, message: str) -> ConfigError:
        return ConfigError(self.file, self.line, message)

    def tokenize(self, text: str) -> list[Tok]:
        out: list[Tok] = []
        pos = 0
        text = text.rstrip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise self.err(f"syntax error near {text[pos:pos + 20]!r}")
            pos = m.end()
            dq, sq, ref, punct, word = m.groups()
            if dq is not None or sq is not None:
                t = Tok(re.sub(r"\\(.)", r"\1", dq[1:-1]) if dq is not None else sq[1:-1])
                t.quoted = True
            elif ref is not None:
                t = Tok(ref[1:-1])
                t.ref = True
            elif punct is not None:
                t = Tok(punct)
            else:
                if word.startswith("$"):
                    name = word[1:]
                    if name not in self.config.macros:
                        raise self.err(f"macro '{name}' not defined")
                    word = self.config.macros[name]
                t = Tok(word)
            out.append(t)
        return out

    def logical_lines(self, text: str):
        lines = text.split("\n")
        buf, start = "", 0
        for number, raw in enumerate(lines, 1):
            line = _strip_comment(raw)
            if not buf:
                start = number
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            buf += line
            if buf.strip():
                yield start, buf
            buf = ""
        if buf.strip():
            yield start, buf

    # -- top level ------------------------------------------------------------------------------

    def read_file(self, path: Path, what: str = "", secret: bool = False) -> tuple[str, tuple[int, int]]:
        """The checked text of a file the configuration names, and its identity; an
        error is named by the line that names the file (or by the file, at the top)."""
        try:
            return read_checked(path, secret)
        except FileRefused as exc:
            raise self.err(f"{what}{path}: {exc}" if self.line else str(exc)) from None

    def parse_file(self, path: Path) -> None:
        content, ident = self.read_file(path, "include ")
        # which include statements led here, and whether this file is one of theirs
        chain = " -> ".join(f"{file}:{line}" for file, _, line in self.reading) + f" -> {path}"
        if any(ident == seen for _, seen, _ in self.reading):
            raise self.err(f"include loop: {chain}")
        if len(self.reading) > MAX_INCLUDE_DEPTH:
            raise self.err(f"include: nested more than {MAX_INCLUDE_DEPTH} deep: {chain}")
        self.reading.append([str(path), ident, 0])
        saved = self.file, self.line
        self.file = str(path)
        for lineno, text in self.logical_lines(content):
            self.line = lineno
            m = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$", text)
            if m and not text.lstrip().startswith(("table", "action", "match", "listen")):
                name, value = m.groups()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                    value = value[1:-1]
                if name not in self.cli_macros:
                    self.config.macros[name] = value
                continue
            toks = self.tokenize(text)
            if toks and toks[0] == "include" and not toks[0].quoted:
                if len(toks) != 2:
                    raise self.err("include: expected one quoted path")
                self.reading[-1][2] = lineno
                self.parse_file(self.fs(Path(toks[1])))
                self.file = str(path)
                continue
            self.statement(toks)
        self.reading.pop()
        self.file, self.line = saved

    def statement(self, toks: list[Tok]) -> None:
        head = toks[0]
        handler = {
            "listen": self.p_listen, "table": self.p_table, "action": self.p_action,
            "match": self.p_match, "smtp": self.p_smtp, "queue": self.p_queue,
            "bounce": self.p_bounce, "mta": self.p_mta, "mda": self.p_mda,
            "pki": self.p_pki, "ca": self.p_ca, "filter": self.p_filter, "proc": self.p_proc,
            "admd": self.p_loose, "srs": self.p_loose, "scheduler": self.p_loose,
            "metrics": self.p_metrics,
        }.get(head)
        if handler is None or head.quoted:
            hint = OLD_HINT if head in OLD_GRAMMAR or head == "reject" else ""
            raise self.err(f'syntax error: unexpected "{head}", expected one of: listen, table, '
                           f'action, match, smtp, queue, mta, mda, bounce, pki, ca, filter, proc, '
                           f'admd, srs, scheduler, metrics, include, or a macro{hint}')
        self.current_head = str(head)
        handler(Cursor(self, toks[1:]))

    # -- statements ----------------------------------------------------------------------------------

    def p_listen(self, c: "Cursor") -> None:
        c.expect("on")
        addr = c.word("an address or interface")
        if "/" in addr or (re.match(r"^[\d.x]+$", addr) and not _is_ip(addr)):
            raise self.err(f"invalid virtual ip or interface: {addr}")
        lis = Listener(address=addr, lineno=self.line, file=self.file)
        seen: set[str] = set()
        port_given = False

        def once(option: str, what: str | None = None) -> None:
            # parse.y's LO_* bits: each option at most once per listen line
            if option in seen:
                raise self.err(f"{what or option} already specified")
            seen.add(option)

        while c.more():
            opt = c.word("a listen option")
            if opt in ("inet4", "inet6"):
                lis.family = opt
            elif opt == "port":
                once("port")
                port = c.word("a port")
                lis.port = {"smtp": 25, "smtps": 465, "submission": 587}.get(port) or c.number(port, 1, 65535, "port")
                port_given = True
            elif opt == "hostname":
                once("hostname")
                lis.hostname = c.word("a hostname")
            elif opt == "tag":
                once("tag")
                lis.tag = c.word("a tag")
            elif opt in ("tls", "tls-require", "smtps"):
                once("tls", "TLS mode")
                lis.tls = {"tls": "starttls", "tls-require": "require", "smtps": "smtps"}[opt]
                if opt != "tls" and c.take("verify"):
                    lis.tls_verify = True
            elif opt == "pki":
                if len(lis.pki) == PKI_MAX:
                    raise self.err("too many pki specified")
                name = c.word("a pki name").lower()
                if name not in self.config.pki:
                    raise self.err(f"pki name not found: {name}")
                lis.pki.append(name)
            elif opt == "ca":
                once("ca")
                name = c.word("a ca name").lower()
                if name not in self.config.ca:
                    raise self.err(f"ca name not found: {name}")
                lis.ca = name
            elif opt in ("ciphers", "protocols"):
                once(opt)
                setattr(lis, opt, str(c.word(f"a {opt} string")))
            elif opt in ("auth", "auth-optional"):
                once("auth")
                lis.auth = "required" if opt == "auth" else "optional"
                if c.peek_ref() or c.peek() == "{":
                    lis.auth_table = c.table_ref()
                    parse_table.check_use(self, lis.auth_table, "listen-auth")
            elif opt == "senders":
                once("senders")
                lis.senders = c.table_ref()
                self.check_table_use(lis.senders, "invalid use of table {} as SENDERS parameter", lists=False)
                lis.masquerade = c.take("masquerade")
            elif opt == "hostnames":
                once("hostnames")
                lis.hostnames = c.table_ref()
                self.not_yet('listen option "hostnames"')
            elif opt in ("mask-src", "no-dsn", "received-auth", "proxy-v2"):
                once(opt)
                setattr(lis, opt.replace("-", "_"), True)
            elif opt == "filter":
                once("filter")
                lis.filter = parse_filter.listen_filter(self, c)
            else:
                raise self.err(f'syntax error: unexpected "{opt}" in listen, expected one of: '
                               "inet4, inet6, port, hostname, tag, tls, tls-require, smtps, pki, ca, "
                               "ciphers, protocols, auth, auth-optional, senders, hostnames, filter, "
                               "mask-src, no-dsn, received-auth, proxy-v2")
        if addr != "socket":
            # parse.y create_if_listener: what a TCP listener's options must agree on
            if lis.auth and not lis.tls:
                raise self.err("invalid listen option: auth requires tls/smtps")
            if lis.pki and not lis.tls:
                raise self.err("invalid listen option: pki requires tls/smtps")
            if lis.tls and not lis.pki:
                raise self.err("invalid listen option: pki required for tls/smtps")
            if lis.tls == "smtps" and not port_given:
                lis.port = 465
        elif lis.tls or lis.auth or lis.pki:
            raise self.err("invalid listen option: tls, pki and auth need a TCP listener")
        self.config.listeners.append(lis)

    def check_table_use(self, name: str, message: str, *, lists: bool = True, maps: bool = True) -> None:
        """parse.y's table_check_use for the uses not in parse_table.USES: a table whose
        content is a list cannot answer a mapping lookup, nor a mapping a list one (an
        empty file is both).  ``message`` names the table as ``{}``."""
        kind, _ = parse_table.table_kind_and_services(self.config, name)
        if (kind == "hash" and not maps) or (kind == "list" and not lists):
            raise self.err(message.format(f'"{name}"'))

    def p_table(self, c: "Cursor") -> None:
        name = c.word("a table name")
        if name in self.config.tables:
            raise self.err(f'table "{name}" already defined')
        if c.peek() == "{":
            self.config.tables[name] = c.inline_table(name)
        else:
            spec = c.word("a table backend and path")
            self.config.tables[name] = parse_table.parse_table_spec(self, name, str(spec))
        c.end()

    def p_action(self, c: "Cursor") -> None:
        name = c.word("an action name")
        if name in self.config.actions:
            raise self.err(f'action "{name}" already defined')
        method = c.word("a delivery method (maildir, mbox, lmtp, mda, relay, ...)")
        act = Action(name=name, method=method, lineno=self.line)
        if method not in LOCAL_METHODS and method != "relay":
            raise self.err(f'syntax error: unknown delivery method "{method}"')
        if method not in ("maildir", "relay", "mbox", "lmtp", "mda", "forward-only", "expand-only"):
            self.not_yet(f'delivery method "{method}"')
        if method == "maildir" and c.peek() is not None and (c.peek().quoted or c.peek() not in MAILDIR_OPTIONS):
            act.target = c.word("")
        elif method == "mbox" and c.peek() is not None and c.peek().quoted:
            act.target = c.word("")           # pysmtpd: the mail spool directory (docs/delivery.md)
        elif method in ("lmtp", "mda"):
            act.target = c.word(f"a {method} destination")
            if method == "lmtp" and c.peek() in ("rcpt-to",):
                c.word("")
                act.lmtp_rcpt_to = True
        while c.more():
            opt = c.word("an action option")
            if method in LOCAL_METHODS and opt in ("alias", "virtual", "userbase"):
                setattr(act, opt, c.table_ref())
                parse_table.check_use(self, getattr(act, opt), opt)
            elif method == "maildir" and opt == "junk":
                act.junk = True
            elif method in LOCAL_METHODS and opt in ("user", "wrapper"):
                setattr(act, opt, c.word(f"a {opt}"))
            elif method == "relay" and opt == "host":
                act.host = c.table_ref() if c.peek_ref() else c.word("a relay URL")
            elif method == "relay" and opt == "helo":
                act.helo = c.word("a hostname")
            elif method == "relay" and parse_mta.relay_option(self, c, act, opt):
                pass
            elif method == "relay" and opt == "srs":
                self.not_yet(f'relay option "{opt}"')
            elif method == "relay" and relay_option(self, c, act, opt):
                pass                     # tls, auth, pki, ca, protocols, ciphers (parse_relay.py)
            elif method == "relay" and opt == "domain":
                c.table_ref() if c.peek_ref() else c.word(f"a {opt} value")
                self.not_yet(f'relay option "{opt}"')
            elif method == "relay" and opt == "filter":
                c.name_or_list("a filter name or { list }")
                self.not_yet('relay option "filter"')
            elif opt == "ttl":
                act.ttl = c.duration()
            else:
                raise self.err(f'syntax error: unexpected "{opt}" in action "{name}" ({method})')
        if act.alias and act.virtual:
            raise self.err("alias and virtual are mutually exclusive")
        self.config.actions[name] = act

    def p_match(self, c: "Cursor") -> None:
        conds: list[Condition] = []
        kinds = set()
        while True:
            negate = False
            tok = c.word('"action", "reject" or a match option')
            if tok == "!":
                negate = True
                tok = c.word("a match option after !")
            if tok == "action" and not negate:
                action = c.word("an action name")
                c.end()
                rule = Rule(conds, action, False, self.line)
                break
            if tok == "reject" and not negate:
                c.end()
                rule = Rule(conds, None, True, self.line)
                break
            if tok in kinds:
                raise self.err(f'"{tok}" specified twice')
            kinds.add(tok)
            cond = self.condition(c, tok, negate)
            # `from auth` and `auth` both set parse.y's flag_smtp_auth
            if cond.kind == "auth" or (cond.kind == "from" and cond.what == "auth"):
                if "smtp-auth" in kinds:
                    raise self.err("auth already specified for this rule")
                kinds.add("smtp-auth")
            conds.append(cond)
        if "from" not in kinds:
            rule.conditions.insert(0, Condition("from", "local"))
        if "for" not in kinds:
            rule.conditions.append(Condition("for", "local"))
        self.config.rules.append(rule)

    def condition(self, c: "Cursor", kind: str, negate: bool) -> Condition:
        if kind == "from":
            what = c.word("any, local, socket, src, rdns, auth or mail-from")
            if what in ("any", "local", "socket"):
                return Condition("from", what, negate=negate)
            if what in ("src", "rdns", "auth", "mail-from"):
                regex = c.take("regex")
                table = c.table_ref() if (c.peek_ref() or c.peek() == "{") else None
                if table is None and what in ("src", "mail-from"):
                    table = c.literal_table()
                if what == "auth" and table is not None:
                    self.check_table_use(table, "table {} may not be used for from lookups", maps=False)
                return Condition("from", what, table, negate, regex)
            raise self.err(f'syntax error: unexpected "{what}" after from')
        if kind == "for":
            what = c.word("any, local, domain or rcpt-to")
            if what in ("any", "local"):
                return Condition("for", what, negate=negate)
            if what in ("domain", "rcpt-to"):
                regex = c.take("regex")
                table = c.table_ref() if (c.peek_ref() or c.peek() == "{") else c.literal_table()
                return Condition("for", what, table, negate, regex)
            raise self.err(f'syntax error: unexpected "{what}" after for')
        if kind in ("tag", "helo", "mail-from", "rcpt-to", "auth"):
            regex = c.take("regex")
            if kind == "auth" and not (c.peek_ref() or c.peek() == "{"):
                if regex:
                    raise self.err("syntax error: auth regex needs a <table>")
                return Condition(kind, kind, None, negate, regex)
            table = c.table_ref() if (c.peek_ref() or c.peek() == "{") else c.literal_table()
            if kind == "auth" and regex:
                self.check_table_use(table, "table {} may not be used for auth lookups", maps=False)
            return Condition(kind, kind, table, negate, regex)
        if kind == "tls":
            return Condition("tls", "tls", negate=negate)
        raise self.err(f'syntax error: unexpected "{kind}", expected one of: action, reject, '
                       "from, for, tag, helo, auth, mail-from, rcpt-to, tls")

    def p_smtp(self, c: "Cursor") -> None:
        opt = c.word("an smtp option")
        if opt == "max-message-size":
            self.config.max_message_size = c.size()
        elif opt == "limit":
            while c.more():
                key = c.word("a limit")
                if key == "max-mails":
                    self.config.smtp_max_mails = c.number(c.word("a number"), 1, 1 << 31)
                elif key == "max-rcpt":
                    self.config.smtp_max_rcpt = c.number(c.word("a number"), 1, 1 << 31)
                elif key == "max-sessions":
                    self.config.smtp_max_sessions = c.number(c.word("a number"), 1, 1 << 20)
                elif key == "max-sessions-per-address":
                    self.config.smtp_max_sessions_per_address = c.number(c.word("a number"), 1, 1 << 20)
                elif key == "command-timeout":
                    self.config.smtp_command_timeout = c.duration()
                elif key == "data-timeout":
                    self.config.smtp_data_timeout = c.duration()
                elif key == "filter-timeout":
                    self.config.filter_timeout = c.duration()
                else:
                    raise self.err(f'syntax error: unexpected "{key}" in smtp limit')
        elif opt == "sub-addr-delim":
            delim = c.word("a character")
            if len(delim) != 1:
                raise self.err("sub-addr-delim must be one character")
            self.config.sub_addr_delim = delim
        elif opt == "ciphers":
            self.config.tls_ciphers = str(c.word("a cipher list"))
        else:
            raise self.err(f'syntax error: unexpected "{opt}" after smtp, expected one of: '
                           "max-message-size, limit, sub-addr-delim, ciphers")
        c.end()

    def p_queue(self, c: "Cursor") -> None:
        opt = c.word("a queue option")
        if opt == "ttl":
            self.config.queue_ttl = c.duration()
        elif opt == "compression":
            self.not_yet('"queue compression"')
        elif opt == "encryption":
            if c.more():
                key = c.word("a key")
                if key not in ("stdin", "-") and not re.fullmatch(r"[0-9A-Fa-f]{64}|.{32}", key):
                    raise self.err("crypto_setup:invalid key for queue encryption")
            self.not_yet('"queue encryption"')
        else:
            raise self.err(f'syntax error: unexpected "{opt}" after queue')
        c.end()

    def p_bounce(self, c: "Cursor") -> None:
        c.expect("warn-interval")
        values = [c.duration()]
        while c.take(","):
            values.append(c.duration())
        if len(values) > 4:
            raise self.err("at most 4 bounce warn-intervals")
        self.config.bounce_warn_interval = values
        c.end()

    def p_mta(self, c: "Cursor") -> None:
        opt = c.word("max-deferred, limit, resolver or mx-port")
        if opt == "max-deferred":
            self.config.mta_max_deferred = c.number(c.word("a number"), 0, 1 << 31)
            c.end()
        elif parse_mta.p_mta_option(self, c, str(opt)):
            pass
        else:
            raise self.err(f'syntax error: unexpected "{opt}" after mta')

    def p_pki(self, c: "Cursor") -> None:
        """``pki NAME cert FILE | key FILE | dhe none|auto|legacy``, several per line
        allowed as parse.y's pki_params; the files are loaded by smtpd/tls.py's check."""
        name = self.tls_name(c.word("a pki name"))
        pki = self.config.pki.setdefault(name, Pki(name, lineno=self.line, file=self.file))
        while True:
            kw = c.word('"cert", "key" or "dhe"')
            if kw in ("cert", "key"):
                setattr(pki, kw, str(c.word("a file")))
            elif kw == "dhe":
                value = c.word("dhe parameters (none, auto, legacy)")
                if value.lower() not in ("none", "auto", "legacy"):
                    raise self.err(f"invalid DHE keyword: {value}")
                pki.dhe = value.lower()
            else:
                raise self.err(f'syntax error: unexpected "{kw}", expected "cert", "key" or "dhe"')
            if not c.more():
                break

    def p_ca(self, c: "Cursor") -> None:
        name = self.tls_name(c.word("a ca name"))
        ca = self.config.ca.setdefault(name, Ca(name, lineno=self.line, file=self.file))
        c.expect("cert")
        ca.cert = str(c.word("a file"))
        c.end()

    def tls_name(self, name: str) -> str:
        # parse.y: a pki or ca name is a host name (res_hnok) or the catch-all "*"
        if name != "*" and not _HOSTNAME.fullmatch(name):
            raise self.err(f"not a valid domain name: {name}")
        return name.lower()

    def p_metrics(self, c: "Cursor") -> None:
        """pysmtpd's ``metrics listen on ADDRESS port N``: the Prometheus endpoint
        (smtpd/metrics.py), on a loopback address only."""
        c.expect("listen")
        c.expect("on")
        address = str(c.word("a loopback address"))
        if address == "localhost":
            address = "127.0.0.1"
        if not _is_ip(address) or not ipaddress.ip_address(address).is_loopback:
            raise self.err(f"metrics: {address} is not a loopback address "
                           "(the counters are served to anyone who can connect)")
        c.expect("port")
        port = c.number(c.word("a port"), 1, 65535, "port")
        c.end()
        if self.config.metrics_address is not None:
            raise self.err("metrics listen on: already defined")
        self.config.metrics_address, self.config.metrics_port = address, port

    def p_mda(self, c: "Cursor") -> None:
        parse_action.p_mda(self, c)           # mda wrapper (smtpd/parse_action.py)

    def p_filter(self, c: "Cursor") -> None:
        parse_filter.parse_filter(self, c)          # smtpd/parse_filter.py: issue 9's grammar

    def p_proc(self, c: "Cursor") -> None:
        parse_filter.parse_proc(self, c)

    def p_loose(self, c: "Cursor") -> None:
        """Statements accepted and checked only for shape until their issue lands."""
        if not c.more():
            raise self.err("syntax error: statement is incomplete")
        head = self.current_head
        c.rest()
        self.not_yet(f'"{head}" statement')


class Cursor:
    def __init__(self, parser: Parser, toks: list[Tok]) -> None:
        self.p = parser
        self.toks = toks
        self.i = 0

    def more(self) -> bool:
        return self.i < len(self.toks)

    def peek(self) -> Tok | None:
        return self.toks[self.i] if self.more() else None

    def peek_ref(self) -> bool:
        t = self.peek()
        return t is not None and t.ref

    def word(self, expected: str) -> Tok:
        if not self.more():
            raise self.p.err(f"syntax error: unexpected end of line, expected {expected}")
        t = self.toks[self.i]
        self.i += 1
        return t

    def name_or_list(self, expected: str) -> list[str]:
        if not self.take("{"):
            return [str(self.word(expected))]
        names = []
        while (t := self.word("a name or }")) != "}":
            if t != ",":
                names.append(str(t))
        return names

    def take(self, word: str) -> bool:
        if self.peek() == word:
            self.i += 1
            return True
        return False

    def expect(self, word: str) -> None:
        t = self.word(f'"{word}"')
        if t != word:
            raise self.p.err(f'syntax error: unexpected "{t}", expected "{word}"')

    def end(self) -> None:
        if self.more():
            raise self.p.err(f'syntax error: unexpected "{self.peek()}", expected end of line')

    def rest(self) -> list[Tok]:
        out = self.toks[self.i:]
        self.i = len(self.toks)
        return out

    def number(self, text: str, lo: int, hi: int, what: str = "number") -> int:
        if not text.isdigit() or not lo <= int(text) <= hi:
            raise self.p.err(f'invalid {what} "{text}" (expected {lo}..{hi})')
        return int(text)

    def size(self) -> int:
        t = self.word("a size")
        m = _SIZE.match(t)
        if not m:
            raise self.p.err(f'invalid size "{t}"')
        return int(m.group(1)) * {"": 1, "k": 1024, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]

    def duration(self) -> int:
        t = self.word("a duration (30s, 5m, 4h, 2d)")
        try:
            return parse_duration(t)
        except ValueError:
            raise self.p.err(f'invalid duration "{t}"') from None

    def table_ref(self) -> str:
        if self.peek() == "{":
            p = self.p
            p.anon += 1
            name = f"anon:{p.line}:{p.anon}"
            p.config.tables[name] = self.inline_table(name)
            return name
        t = self.word("a <table>")
        if not t.ref:
            raise self.p.err(f'syntax error: unexpected "{t}", expected a <table>')
        if t not in self.p.config.tables and t not in SPECIAL_TABLES:
            raise self.p.err(f"undefined table: <{t}>")
        return str(t)

    def literal_table(self) -> str:
        t = self.word("a <table>, { list } or a quoted value")
        p = self.p
        p.anon += 1
        name = f"anon:{p.line}:{p.anon}"
        p.config.tables[name] = Table(name, "static", None, [str(t)], p.line)
        return name

    def inline_table(self, name: str) -> Table:
        self.expect("{")
        items: list[str] = []
        pairs: dict[str, str] = {}
        while True:
            t = self.word("a value or }")
            if t == "}":
                break
            if t == ",":
                continue
            if self.take("=") or self.take("=>"):
                pairs[str(t)] = str(self.word("a value"))
            else:
                items.append(str(t))
        if items and pairs:
            raise self.p.err("a table is either a list or a mapping, not both")
        return Table(name, "static", None, pairs if pairs else items, self.p.line)


MAILDIR_OPTIONS = {"junk", "alias", "virtual", "userbase", "user", "wrapper", "ttl"}
SPECIAL_TABLES = {"localhost", "anyhost", "localnames", "anydestination", "getpwnam"}


def check_secret_file(path: str | Path, parser: Parser) -> None:
    """For a file that holds secrets and that another layer reads (a pki key): a
    regular file, owned by root or smtpd's user, mode at most 0740 (ssl.c's
    ssl_load_key); else a ConfigError at the line being parsed."""
    path = parser.fs(Path(path))
    try:
        check_file(path, secret=True)
    except FileRefused as exc:
        raise parser.err(f"{path}: {exc}") from None


def _strip_comment(line: str) -> str:
    out, quote = [], None
    for ch in line:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            break
        out.append(ch)
    return "".join(out)


def _is_ip(text: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def parse_config(path: str | Path, macros: dict[str, str] | None = None,
                 root: Path | None = None) -> Config:
    parser = Parser(str(path), macros, root)
    parser.parse_file(Path(path))
    config = parser.config
    for rule in config.rules:
        if rule.action is not None and rule.action not in config.actions:
            raise ConfigError(config.file, rule.lineno, f'undefined action "{rule.action}"')
    if not config.rules:
        raise ConfigError(config.file, parser.line or None, "no rules, nothing to do")
    parse_action.check_actions(config)
    return _plain(config)


def _plain(obj):
    """Tokens carry parse-time attributes; the model holds plain values, which every
    process can pickle, compare and send in a typed message."""
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, _plain(getattr(obj, f.name)))
    return obj


if __name__ == "__main__":
    import sys
    try:
        parse_config(sys.argv[1])
        print("configuration OK")
    except ConfigError as exc:
        print(exc)
        raise SystemExit(1)
