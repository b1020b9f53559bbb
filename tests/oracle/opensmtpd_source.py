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

Checked once against a live OpenSMTPD 7.8.0p1 built from source (same session code on these
paths): all 18 transcripts agreed (docs/smtp-fidelity.md says how to repeat it).
"""
from __future__ import annotations

from tests.oracle.environment import HOSTNAME, MAX_MESSAGE_SIZE
from tests.oracle.transcripts import AUTH_OK, BY_NAME, Exchange, Reply, Result

HELLO = f"{HOSTNAME} Hello client.test [127.0.0.1], pleased to meet you"


def failed(command: str, reply: Reply) -> str:
    """smtp_reply's log line of a 4xx/5xx: the result as sent, not escaped."""
    return f'smtp failed-command command="{command}" result="{reply.shown()[0]}"'


def r(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code, enhanced, [text])


# smtp_proceed_ehlo: after TLS no STARTTLS (SF_SECURE); AUTH PLAIN LOGIN where the listener has
# auth and the session is secure and not yet authenticated.
EHLO_SECURE = Reply(250, "", [HELLO, "8BITMIME", "ENHANCEDSTATUSCODES", f"SIZE {MAX_MESSAGE_SIZE}", "DSN", "HELP"])
EHLO_SECURE_AUTH = Reply(250, "", EHLO_SECURE.lines[:-1] + ["AUTH PLAIN LOGIN", "HELP"])
OK_250 = r(250, "2.0.0", "Ok")
RCPT_OK = r(250, "2.1.5", "Destination address valid: Recipient ok")
BYE = r(221, "2.0.0", "Bye")
AUTH_SUCCEEDED = r(235, "2.0.0", "Authentication succeeded")
AUTH_FAILED = r(535, "", "Authentication failed")               # smtp_auth_failure_resume
SYNTAX_ERROR = r(501, "5.5.2", "Syntax error: Syntax error")     # smtp_rfc4954_auth_*: abort
USERNAME = r(334, "", "VXNlcm5hbWU6")
PASSWORD = r(334, "", "UGFzc3dvcmQ6")
# smtp_check_mail_from: F_AUTH_REQUIRE without SF_AUTHENTICATED
MUST_AUTH = r(530, "5.5.1", "Invalid command: Must issue an AUTH command first")
# smtp_check_starttls / smtp_check_auth
SECURED = r(503, "5.5.1", "Invalid command: Channel already secured")
NOT_SUPPORTED = r(503, "5.5.1", "Invalid command: Command not supported")
ALREADY_AUTH = r(503, "5.5.1", "Invalid command: Already authenticated")
NOT_NOW = r(503, "5.5.1", "Invalid command: Command not allowed at this point.")
NO_PARAMETERS = r(501, "5.5.4", "Invalid command arguments: No parameters given")
# smtp_proceed_auth: ESC_SECURITY_FEATURES_NOT_SUPPORTED is 5.7.4
NO_CRAM_MD5 = r(504, "5.7.4", 'Security features not supported: AUTH method "CRAM-MD5" not supported')

MAIL = "MAIL FROM:<sender@client.test>"
AUTH_LINE = AUTH_OK.shown().removesuffix("\\r\\n")
TLS_LOG = "smtp tls ciphers=<ciphers>"                          # IO_TLSREADY
QUIT_LOG = "smtp disconnected reason=quit"
AUTH_OK_LOG = "smtp authentication user=alice result=ok"
AUTH_BAD_LOG = "smtp authentication user=alice result=permfail"

# transcript -> (one reply per step after the handshake, log lines after "smtp connected")
AFTER_TLS: dict[str, tuple[list[Reply], list[str]]] = {
    "starttls-ehlo": ([EHLO_SECURE_AUTH, BYE], [TLS_LOG, QUIT_LOG]),
    "starttls-twice": ([EHLO_SECURE_AUTH, SECURED, BYE],
                       [TLS_LOG, failed("STARTTLS", SECURED), QUIT_LOG]),
    "mail-before-auth": ([EHLO_SECURE_AUTH, MUST_AUTH, BYE],
                         [TLS_LOG, failed(MAIL, MUST_AUTH), QUIT_LOG]),
    "auth-plain-ok": ([EHLO_SECURE_AUTH, AUTH_SUCCEEDED, OK_250, RCPT_OK, BYE],
                      [TLS_LOG, AUTH_OK_LOG, QUIT_LOG]),
    # The 535 goes out (after a random pause) while the state is still AUTH_INIT, so the log
    # line names "AUTH PLAIN (...)"; AUTH LOGIN's names "(username)" or "(password)" likewise.
    "auth-plain-bad": ([EHLO_SECURE_AUTH, AUTH_FAILED, MUST_AUTH, BYE],
                       [TLS_LOG, AUTH_BAD_LOG, failed("AUTH PLAIN (...)", AUTH_FAILED),
                        failed(MAIL, MUST_AUTH), QUIT_LOG]),
    "auth-plain-unknown-user": ([EHLO_SECURE_AUTH, AUTH_FAILED, BYE],
                                [TLS_LOG, "smtp authentication user=mallory result=permfail",
                                 failed("AUTH PLAIN (...)", AUTH_FAILED), QUIT_LOG]),
    "auth-plain-challenge": ([EHLO_SECURE_AUTH, r(334, "", ""), AUTH_SUCCEEDED, BYE],
                             [TLS_LOG, AUTH_OK_LOG, QUIT_LOG]),
    "auth-login-ok": ([EHLO_SECURE_AUTH, USERNAME, PASSWORD, AUTH_SUCCEEDED, OK_250, BYE],
                      [TLS_LOG, AUTH_OK_LOG, QUIT_LOG]),
    "auth-login-bad": ([EHLO_SECURE_AUTH, USERNAME, PASSWORD, AUTH_FAILED, BYE],
                       [TLS_LOG, AUTH_BAD_LOG, failed("AUTH LOGIN (password)", AUTH_FAILED), QUIT_LOG]),
    # "*" is not base64: smtp_rfc4954_auth_login aborts with a syntax error
    "auth-cancelled": ([EHLO_SECURE_AUTH, USERNAME, SYNTAX_ERROR, BYE],
                       [TLS_LOG, failed("AUTH LOGIN (username)", SYNTAX_ERROR), QUIT_LOG]),
    "auth-bad-base64": ([EHLO_SECURE_AUTH, SYNTAX_ERROR, BYE],
                        [TLS_LOG, failed("AUTH PLAIN (...)", SYNTAX_ERROR), QUIT_LOG]),
    "auth-unknown-mechanism": ([EHLO_SECURE_AUTH, NO_CRAM_MD5, NO_PARAMETERS, BYE],
                               [TLS_LOG, failed("AUTH CRAM-MD5", NO_CRAM_MD5),
                                failed("AUTH", NO_PARAMETERS), QUIT_LOG]),
    # outside those states the failed-command line shows the command as sent, credentials too
    "auth-twice": ([EHLO_SECURE_AUTH, AUTH_SUCCEEDED, ALREADY_AUTH, BYE],
                   [TLS_LOG, AUTH_OK_LOG, failed(AUTH_LINE, ALREADY_AUTH), QUIT_LOG]),
    "auth-in-transaction": ([EHLO_SECURE_AUTH, AUTH_SUCCEEDED, OK_250, NOT_NOW, BYE],
                            [TLS_LOG, AUTH_OK_LOG, failed(AUTH_LINE, NOT_NOW), QUIT_LOG]),
    "require-after-tls": ([EHLO_SECURE, OK_250, RCPT_OK, BYE], [TLS_LOG, QUIT_LOG]),
}

GREETING = r(220, "", f"{HOSTNAME} ESMTP OpenSMTPD")
# smtps (smtp_tls_verified): "connected", then the handshake, then the banner. The listener has
# no F_STARTTLS, so STARTTLS is "not supported"; AUTH is offered (auth-optional).
AFTER_SMTPS: dict[str, tuple[list[Reply], list[str]]] = {
    "smtps-ehlo": ([EHLO_SECURE_AUTH, NOT_SUPPORTED, BYE],
                   [TLS_LOG, failed("STARTTLS", NOT_SUPPORTED), QUIT_LOG]),
    "smtps-auth": ([EHLO_SECURE_AUTH, AUTH_SUCCEEDED, OK_250, RCPT_OK, BYE],
                   [TLS_LOG, AUTH_OK_LOG, QUIT_LOG]),
    "smtps-without-auth": ([EHLO_SECURE_AUTH, OK_250, RCPT_OK, BYE], [TLS_LOG, QUIT_LOG]),
}

SOURCE = "usr.sbin/smtpd/smtp_session.c v6.8.0p2 (the binary cannot complete TLS with OpenSSL 3)"


def _played(replies: list[Reply], steps) -> list[Exchange]:
    assert len(replies) == len(steps), "source reference out of step with its transcript"
    return [Exchange(step.shown(), [reply]) for reply, step in zip(replies, steps)]


def complete(result: Result) -> tuple[Result, str]:
    """The recorded result with what follows a failed TLS handshake taken from the source;
    returns (result, "" or SOURCE)."""
    steps = BY_NAME[result.name].steps
    if result.name in AFTER_SMTPS:
        replies, log = AFTER_SMTPS[result.name]
        greeting = Exchange("", [GREETING])          # the runner marks only a failed handshake
        return Result(result.name, result.listener, [greeting, *_played(replies, steps)], "closed",
                      ["smtp connected address=127.0.0.1 host=localhost", *log]), SOURCE
    if result.name not in AFTER_TLS:
        return result, ""
    replies, log = AFTER_TLS[result.name]
    kept = []
    for ex in result.exchanges:
        kept.append(ex)
        if ex.event.startswith("tls failed"):
            break
    else:
        return result, ""                           # the handshake worked: nothing to fill in
    kept[-1] = Exchange(kept[-1].sent, kept[-1].replies, "tls ok")
    return Result(result.name, result.listener, kept + _played(replies, steps[len(kept) - 1:]),
                  "closed", [result.log[0], *log]), SOURCE
