"""OpenSMTPD 6.8's answers inside TLS, read from its source because its binary cannot say them.

Debian bookworm's opensmtpd 6.8.0p2 fails every TLS handshake with OpenSSL 3 (the server
logs ``io-error: ... EVP lib``; upstream issues OpenSMTPD#1171 and #1239, fixed only in 7.x),
whatever the key type. So the recorded transcripts stop at ``220 2.0.0 Ready to start TLS``
(or at the SMTPS handshake). What follows the handshake is written here from
usr.sbin/smtpd/smtp_session.c at tag v6.8.0p2 (smtp_proceed_ehlo, smtp_check_auth,
smtp_check_starttls, smtp_check_mail_from, smtp_rfc4954_auth_plain/login,
smtp_auth_failure_resume, smtp_reply's failed-command lines, the IO_TLSREADY log line) and
esc.c; each entry names the function it follows. Everything before the handshake stays as
recorded. ``complete()`` joins the two; results so completed say so (``source``).
"""
from __future__ import annotations

from tests.oracle.transcripts import AUTH_OK, BY_NAME, Exchange, Reply, Result

HELLO = "mail.example.test Hello client.test [127.0.0.1], pleased to meet you"
# smtp_proceed_ehlo: after TLS no STARTTLS (SF_SECURE); AUTH PLAIN LOGIN where the listener
# has auth and the session is secure and not yet authenticated.
EHLO_SECURE = [HELLO, "8BITMIME", "ENHANCEDSTATUSCODES", "SIZE 20000", "DSN", "HELP"]
EHLO_SECURE_AUTH = EHLO_SECURE[:-1] + ["AUTH PLAIN LOGIN", "HELP"]

OK_250 = (250, "2.0.0", "Ok")
RCPT_OK = (250, "2.1.5", "Destination address valid: Recipient ok")
BYE = (221, "2.0.0", "Bye")
AUTH_SUCCEEDED = (235, "2.0.0", "Authentication succeeded")
AUTH_FAILED = (535, "", "Authentication failed")            # smtp_auth_failure_resume
SYNTAX_ERROR = (501, "5.5.2", "Syntax error: Syntax error")  # smtp_rfc4954_auth_*: abort
MUST_AUTH = (530, "5.5.1", "Invalid command: Must issue an AUTH command first")
USERNAME = (334, "", "VXNlcm5hbWU6")
PASSWORD = (334, "", "UGFzc3dvcmQ6")

TLS_LOG = "smtp tls ciphers=<ciphers>"
QUIT_LOG = "smtp disconnected reason=quit"


def failed(command: str, reply: tuple) -> str:
    code, enhanced, text = reply
    shown = f"{code} {enhanced} {text}" if enhanced else f"{code} {text}"
    return f'smtp failed-command command="{command}" result="{shown}"'


def ehlo(auth: bool) -> list:
    return [("EHLO client.test", [(250, "", line) for line in (EHLO_SECURE_AUTH if auth else EHLO_SECURE)])]


def one(sent: str, reply: tuple) -> tuple:
    return (sent, [reply])


AUTH_LINE = AUTH_OK.shown()
QUIT = one("QUIT\\r\\n", BYE)

# transcript -> (exchanges after the handshake, log lines after "smtp connected")
AFTER_TLS: dict[str, tuple[list, list[str]]] = {
    "starttls-ehlo": (ehlo(True) + [QUIT], [TLS_LOG, QUIT_LOG]),
    # smtp_check_starttls: SF_SECURE
    "starttls-twice": (ehlo(True) + [one("STARTTLS\\r\\n", (503, "5.5.1", "Invalid command: Channel already secured")), QUIT],
                       [TLS_LOG, failed("STARTTLS", (503, "5.5.1", "Invalid command: Channel already secured")), QUIT_LOG]),
    # smtp_check_mail_from: F_AUTH_REQUIRE without SF_AUTHENTICATED
    "mail-before-auth": (ehlo(True) + [one("MAIL FROM:<sender@client.test>\\r\\n", MUST_AUTH), QUIT],
                         [TLS_LOG, failed("MAIL FROM:<sender@client.test>", MUST_AUTH), QUIT_LOG]),
    "auth-plain-ok": (ehlo(True) + [one(AUTH_LINE, AUTH_SUCCEEDED), one("MAIL FROM:<sender@client.test>\\r\\n", OK_250),
                                    one("RCPT TO:<alice@example.test>\\r\\n", RCPT_OK), QUIT],
                      [TLS_LOG, "smtp authentication user=alice result=ok", QUIT_LOG]),
    # the 535 is sent while the state is still AUTH_INIT: "AUTH PLAIN (...)" in the log
    "auth-plain-bad": (ehlo(True) + [one("AUTH PLAIN <alice, wrong>", AUTH_FAILED),
                                     one("MAIL FROM:<sender@client.test>\\r\\n", MUST_AUTH), QUIT],
                       [TLS_LOG, "smtp authentication user=alice result=permfail",
                        failed("AUTH PLAIN (...)", AUTH_FAILED), failed("MAIL FROM:<sender@client.test>", MUST_AUTH),
                        QUIT_LOG]),
    "auth-plain-unknown-user": (ehlo(True) + [one("AUTH PLAIN <mallory>", AUTH_FAILED), QUIT],
                                [TLS_LOG, "smtp authentication user=mallory result=permfail",
                                 failed("AUTH PLAIN (...)", AUTH_FAILED), QUIT_LOG]),
    "auth-plain-challenge": (ehlo(True) + [one("AUTH PLAIN\\r\\n", (334, "", "")), one("<alice, password>", AUTH_SUCCEEDED), QUIT],
                             [TLS_LOG, "smtp authentication user=alice result=ok", QUIT_LOG]),
    "auth-login-ok": (ehlo(True) + [one("AUTH LOGIN\\r\\n", USERNAME), one("<alice>", PASSWORD),
                                    one("<password>", AUTH_SUCCEEDED), one("MAIL FROM:<sender@client.test>\\r\\n", OK_250), QUIT],
                      [TLS_LOG, "smtp authentication user=alice result=ok", QUIT_LOG]),
    "auth-login-bad": (ehlo(True) + [one("AUTH LOGIN\\r\\n", USERNAME), one("<alice>", PASSWORD),
                                     one("<wrong>", AUTH_FAILED), QUIT],
                       [TLS_LOG, "smtp authentication user=alice result=permfail",
                        failed("AUTH LOGIN (password)", AUTH_FAILED), QUIT_LOG]),
    # "*" is not base64: smtp_rfc4954_auth_login aborts with a syntax error in STATE_AUTH_USERNAME
    "auth-cancelled": (ehlo(True) + [one("AUTH LOGIN\\r\\n", USERNAME), one("*\\r\\n", SYNTAX_ERROR), QUIT],
                       [TLS_LOG, failed("AUTH LOGIN (username)", SYNTAX_ERROR), QUIT_LOG]),
    "auth-bad-base64": (ehlo(True) + [one("AUTH PLAIN !!!\\r\\n", SYNTAX_ERROR), QUIT],
                        [TLS_LOG, failed("AUTH PLAIN (...)", SYNTAX_ERROR), QUIT_LOG]),
    # smtp_proceed_auth: ESC_SECURITY_FEATURES_NOT_SUPPORTED is 5.7.4; smtp_check_auth: no argument
    "auth-unknown-mechanism": (
        ehlo(True) + [one("AUTH CRAM-MD5\\r\\n", (504, "5.7.4", 'Security features not supported: AUTH method "CRAM-MD5" not supported')),
                      one("AUTH\\r\\n", (501, "5.5.4", "Invalid command arguments: No parameters given")), QUIT],
        [TLS_LOG, failed("AUTH CRAM-MD5", (504, "5.7.4", 'Security features not supported: AUTH method \\"CRAM-MD5\\" not supported')),
         failed("AUTH", (501, "5.5.4", "Invalid command arguments: No parameters given")), QUIT_LOG]),
    # smtp_check_auth; the failed-command line shows the command as sent, credentials included
    "auth-twice": (ehlo(True) + [one(AUTH_LINE, AUTH_SUCCEEDED), one(AUTH_LINE, (503, "5.5.1", "Invalid command: Already authenticated")), QUIT],
                   [TLS_LOG, "smtp authentication user=alice result=ok",
                    failed(AUTH_LINE.removesuffix("\\r\\n"), (503, "5.5.1", "Invalid command: Already authenticated")), QUIT_LOG]),
    "auth-in-transaction": (ehlo(True) + [one(AUTH_LINE, AUTH_SUCCEEDED), one("MAIL FROM:<sender@client.test>\\r\\n", OK_250),
                                          one(AUTH_LINE, (503, "5.5.1", "Invalid command: Command not allowed at this point.")), QUIT],
                            [TLS_LOG, "smtp authentication user=alice result=ok",
                             failed(AUTH_LINE.removesuffix("\\r\\n"), (503, "5.5.1", "Invalid command: Command not allowed at this point.")),
                             QUIT_LOG]),
    "require-after-tls": (ehlo(False) + [one("MAIL FROM:<sender@client.test>\\r\\n", OK_250),
                                         one("RCPT TO:<alice@example.test>\\r\\n", RCPT_OK), QUIT],
                          [TLS_LOG, QUIT_LOG]),
}

GREETING = ("", [(220, "", "mail.example.test ESMTP OpenSMTPD")])
# smtps: the listener has no F_STARTTLS, so STARTTLS is "not supported"; AUTH is offered (auth-optional)
AFTER_SMTPS: dict[str, tuple[list, list[str]]] = {
    "smtps-ehlo": ([GREETING] + ehlo(True) + [one("STARTTLS\\r\\n", (503, "5.5.1", "Invalid command: Command not supported")), QUIT],
                   [TLS_LOG, failed("STARTTLS", (503, "5.5.1", "Invalid command: Command not supported")), QUIT_LOG]),
    "smtps-auth": ([GREETING] + ehlo(True) + [one(AUTH_LINE, AUTH_SUCCEEDED), one("MAIL FROM:<sender@client.test>\\r\\n", OK_250),
                                              one("RCPT TO:<alice@example.test>\\r\\n", RCPT_OK), QUIT],
                   [TLS_LOG, "smtp authentication user=alice result=ok", QUIT_LOG]),
    "smtps-without-auth": ([GREETING] + ehlo(True) + [one("MAIL FROM:<sender@client.test>\\r\\n", OK_250),
                                                      one("RCPT TO:<alice@example.test>\\r\\n", RCPT_OK), QUIT],
                           [TLS_LOG, QUIT_LOG]),
}

SOURCE = "usr.sbin/smtpd/smtp_session.c v6.8.0p2 (the binary cannot complete TLS with OpenSSL 3)"


def _exchanges(spec: list) -> list[Exchange]:
    return [Exchange(sent, [Reply(code, enh, [text]) for code, enh, text in replies]) for sent, replies in spec]


def _merge_ehlo(exchanges: list[Exchange]) -> list[Exchange]:
    """One EHLO reply of many lines, not one reply per line."""
    for ex in exchanges:
        if ex.sent == "EHLO client.test" and len(ex.replies) > 1:
            ex.replies = [Reply(250, "", [r.lines[0] for r in ex.replies])]
            ex.sent = "EHLO client.test\\r\\n"
    return exchanges


def complete(result: Result) -> tuple[Result, str]:
    """The recorded result with what follows a failed TLS handshake taken from the source;
    returns (result, "" or SOURCE)."""
    steps = BY_NAME[result.name].steps
    if result.name in AFTER_SMTPS:
        spec, log = AFTER_SMTPS[result.name]
        after = _sent_as_played(_merge_ehlo(_exchanges(spec))[1:], steps)
        greeting = _exchanges([GREETING])[0]
        return Result(result.name, result.listener, [greeting, *after], "closed",
                      ["smtp connected address=127.0.0.1 host=localhost", *log]), SOURCE
    if result.name not in AFTER_TLS:
        return result, ""
    spec, log = AFTER_TLS[result.name]
    kept = []
    for ex in result.exchanges:
        kept.append(ex)
        if ex.event.startswith("tls failed"):
            break
    else:
        return result, ""                           # the handshake worked: nothing to fill in
    kept[-1] = Exchange(kept[-1].sent, kept[-1].replies, "tls ok")
    after = _sent_as_played(_merge_ehlo(_exchanges(spec)), steps[len(kept) - 1:])
    return Result(result.name, result.listener, kept + after, "closed",
                  [result.log[0], *log]), SOURCE


def _sent_as_played(exchanges: list[Exchange], steps) -> list[Exchange]:
    assert len(exchanges) == len(steps), "source reference out of step with its transcript"
    for ex, step in zip(exchanges, steps):
        ex.sent = step.shown()
    return exchanges
