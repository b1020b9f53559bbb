"""Real OpenSMTPD filters, unchanged, in front of pysmtpd and of OpenSMTPD 6.8 (the oracle):
the same configuration and the same checks on what each delivers.

* filter-dkimsign (Debian's opensmtpd-filter-dkimsign, C, on libopensmtpd): signs each
  message; the signature is verified with dkimpy against the public key (a wrong body fails).
* filter-senderscore (Debian's opensmtpd-filter-senderscore, Go, its own protocol code): asks
  DNS for the client's reputation (the private loopback DNS of tests/filter_programs.py
  answers); below 50 it disconnects at connect with its own text, below 80 it junks
  (X-Spam: Yes) and with -scoreHeader it adds X-SenderScore.
* a filter built here against libopensmtpd (OpenSMTPD's filter library): refuses a recipient
  with its text, adds a header of what the library learnt from the report events, and
  rewrites a word in the body (data-line in both directions).
* all three in one chain on one listener.

Every package comes from Debian's registry (apt-get download, never installed): one that
cannot be had fails the test with the reason.  The oracle, where it cannot run (not root, no
registry outside CI), skips with the reason, as in tests/e2e/test_fidelity.py.
"""
from __future__ import annotations

import base64
import re
import shutil
import smtplib
import subprocess

import pytest

from tests.conftest import free_port
from tests.e2e.sink import Sink
from tests.filter_programs import (
    SERVERS, FilterUnavailable, private_dns, debian_filter, libopensmtpd_filter, relay_config,
    shared_dir, start_server)

HOSTNAME = "mx.example.test"
SELECTOR = "pysmtpd"
BLOCK_TEXT = "550 your IP reputation is too low for this MX"      # filter-senderscore's own
# filter-senderscore reads the score from the last byte of an A record of
# <reversed address>.score.senderscore.com: 127.0.0.1 gets 60 (junked), 127.0.0.2 gets 20 (blocked).
DNS_RECORDS = {
    "1.0.0.127.score.senderscore.com": {"A": ["127.0.4.60"]},
    "2.0.0.127.score.senderscore.com": {"A": ["127.0.4.20"]},
}

TAGGER_SOURCE = r"""
/* A filter written against OpenSMTPD's filter library (libopensmtpd): it refuses recipients
 * named blocked@..., prepends to each message a header made of what the library learnt from
 * the report events (link-connect, link-identify, tx-mail, tx-rcpt), and rewrites the word
 * CONFIDENTIAL in data lines. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <opensmtpd.h>

struct message {
	int	header_written;
};

static void *
message_new(struct osmtpd_ctx *ctx)
{
	struct message *m;

	if ((m = calloc(1, sizeof(*m))) == NULL)
		osmtpd_err(1, "calloc");
	return m;
}

static void
message_free(struct osmtpd_ctx *ctx, void *data)
{
	free(data);
}

static void
on_rcpt(struct osmtpd_ctx *ctx, const char *rcpt)
{
	if (strncmp(rcpt, "blocked@", 8) == 0)
		osmtpd_filter_reject(ctx, 550, "5.7.1 libopensmtpd filter refuses %s", rcpt);
	else
		osmtpd_filter_proceed(ctx);
}

static void
on_dataline(struct osmtpd_ctx *ctx, const char *line)
{
	struct message *m = ctx->local_message;
	char rcpts[1024] = "";
	const char *word, *identity = ctx->identity;
	size_t i, used = 0;

	if (!m->header_written) {
		for (i = 0; ctx->rcptto != NULL && ctx->rcptto[i] != NULL &&
		    used < sizeof(rcpts); i++)
			used += snprintf(rcpts + used, sizeof(rcpts) - used, "%s%s",
			    i > 0 ? "," : "", ctx->rcptto[i]);
		/* libopensmtpd 0.7 reads protocol 0.6's link-identify (OpenSMTPD 6.8) as one
		 * field, "EHLO|name": keep the name */
		if (identity != NULL && strchr(identity, '|') != NULL)
			identity = strchr(identity, '|') + 1;
		osmtpd_filter_dataline(ctx, "X-Libopensmtpd-Filter: helo=%s mail-from=<%s> "
		    "rcpt-to=%s rdns=%s fcrdns=%s",
		    identity ? identity : "(none)",
		    ctx->mailfrom ? ctx->mailfrom : "(none)", rcpts,
		    ctx->rdns ? ctx->rdns : "(none)",
		    ctx->fcrdns == OSMTPD_STATUS_OK ? "pass" :
		    ctx->fcrdns == OSMTPD_STATUS_PERMFAIL ? "fail" : "error");
		m->header_written = 1;
	}
	if (strcmp(line, ".") == 0) {
		m->header_written = 0;
		osmtpd_filter_dataline(ctx, ".");
		return;
	}
	if ((word = strstr(line, "CONFIDENTIAL")) != NULL)
		osmtpd_filter_dataline(ctx, "%.*s[redacted]%s", (int)(word - line), line,
		    word + strlen("CONFIDENTIAL"));
	else
		osmtpd_filter_dataline(ctx, "%s", line);
}

int
main(int argc, char *argv[])
{
	osmtpd_need(OSMTPD_NEED_IDENTITY | OSMTPD_NEED_MAILFROM | OSMTPD_NEED_RCPTTO |
	    OSMTPD_NEED_RDNS | OSMTPD_NEED_FCRDNS);
	osmtpd_local_message(message_new, message_free);
	osmtpd_register_filter_rcptto(on_rcpt);
	osmtpd_register_filter_dataline(on_dataline);
	osmtpd_run();
	return 0;
}
"""


def _programs() -> dict:
    try:
        return {
            "dkimsign": debian_filter("opensmtpd-filter-dkimsign", "filter-dkimsign"),
            "senderscore": debian_filter("opensmtpd-filter-senderscore", "filter-senderscore"),
            "tagger": libopensmtpd_filter("tagger", TAGGER_SOURCE),
        }
    except FilterUnavailable as exc:
        pytest.fail(f"filter program unavailable: {exc}")


def _dkim_key(directory) -> tuple[str, bytes]:
    """(private key path, public key DER) made with openssl; readable by the filter's user."""
    key = directory / "dkim.key"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True,
                   timeout=60)
    key.chmod(0o644)
    der = subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"],
                         check=True, capture_output=True, timeout=60).stdout
    return str(key), der


def _config(ports: dict[str, int], sink_port: int, programs: dict, key: str) -> str:
    listen = f"listen on 127.0.0.1 port {{}} hostname {HOSTNAME} filter {{}}"
    return "\n".join([
        f'filter "dkim" proc-exec "{programs["dkimsign"]} -d example.test -s {SELECTOR} -k {key}"',
        f'filter "tagger" proc-exec "{programs["tagger"]}"',
        f'filter "senderscore" proc-exec "{programs["senderscore"]} -blockBelow 50 -junkBelow 80 '
        '-scoreHeader"',
        'filter "all" chain { "tagger", "senderscore", "dkim" }',
        listen.format(ports["dkim"], '"dkim"'),
        listen.format(ports["tagger"], '"tagger"'),
        listen.format(ports["senderscore"], '"senderscore"'),
        listen.format(ports["chain"], '"all"'),
    ]) + "\n" + relay_config(sink_port)


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    with private_dns(DNS_RECORDS) as server:
        yield server


@pytest.fixture(scope="module")
def keys():
    directory = shared_dir("pysmtpd-dkim-")
    try:
        yield _dkim_key(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module", params=SERVERS)
def server(request, tmp_path_factory, dns, keys, privsep_users):
    programs = _programs()
    base = tmp_path_factory.mktemp(request.param)
    ports = {name: free_port() for name in ("dkim", "tagger", "senderscore", "chain")}
    sink_port = free_port()
    srv = start_server(request.param, base, _config(ports, sink_port, programs, keys[0]), ports, dns,
                       Sink(sink_port))
    try:
        yield srv
    finally:
        srv.stop()


MESSAGE = ("From: Alice <alice@example.test>\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
           "Date: Thu, 03 Dec 2026 04:00:00 +0000\r\nMessage-ID: <{subject}@example.test>\r\n\r\n"
           "Hello Bob,\r\nthe CONFIDENTIAL plan is ready.\r\n.leading dot line\r\n")


def _send(port: int, subject: str, rcpts=("bob@example.test",), source: str = "127.0.0.1"):
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as s:
        s.ehlo("client.example.test")
        assert s.mail("alice@example.test")[0] == 250
        replies = {rcpt: s.rcpt(rcpt) for rcpt in rcpts}
        code, text = s.data(MESSAGE.format(subject=subject).encode())
        assert code == 250, (code, text)
    return replies


def _verify_dkim(message: bytes, public_der: bytes) -> bool:
    import dkim

    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public_der)

    def dnsfunc(name, timeout=5):
        assert name in (f"{SELECTOR}._domainkey.example.test.".encode(),
                        f"{SELECTOR}._domainkey.example.test".encode()), name
        return record
    # as it travelled: CRLF lines (the Maildir keeps LF)
    wire = re.sub(rb"\r?\n", b"\r\n", message)
    return dkim.verify(wire, dnsfunc=dnsfunc)


def _header(message: bytes, name: str) -> list[str]:
    head = message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode()
    unfolded = re.sub(r"\n[ \t]+", " ", head)
    return [line.split(":", 1)[1].strip() for line in unfolded.splitlines()
            if line.lower().startswith(name.lower() + ":")]


def test_dkimsign_signs_and_the_signature_verifies(server, keys):
    _send(server.ports["dkim"], "dkim-only")
    message = server.delivered("dkim-only")
    signatures = _header(message, "DKIM-Signature")
    assert len(signatures) == 1, message.decode()
    tags = dict(t.strip().split("=", 1) for t in signatures[0].split(";") if "=" in t)
    assert tags["d"] == "example.test" and tags["s"] == SELECTOR and tags["a"] == "rsa-sha256"
    assert _verify_dkim(message, keys[1]), message.decode()
    # the verification is not vacuous: the same message with its body changed fails
    assert not _verify_dkim(message.replace(b"Hello Bob", b"Hello Eve"), keys[1])


def test_libopensmtpd_filter_refuses_tags_and_rewrites(server):
    replies = _send(server.ports["tagger"], "tagger",
                    rcpts=("bob@example.test", "blocked@example.test"))
    assert replies["bob@example.test"][0] == 250
    assert replies["blocked@example.test"] == (
        550, b"5.7.1 libopensmtpd filter refuses blocked@example.test")
    message = server.delivered("tagger")
    # the library lists every RCPT TO it was asked to filter, the refused one too
    assert _header(message, "X-Libopensmtpd-Filter") == [
        "helo=client.example.test mail-from=<alice@example.test> "
        "rcpt-to=bob@example.test,blocked@example.test rdns=localhost fcrdns=pass"], message.decode()
    body = message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]
    assert b"the [redacted] plan is ready." in body and b"CONFIDENTIAL" not in body
    assert b"\n.leading dot line\n" in body          # dot-stuffing undone once, not twice


def test_senderscore_junks_and_scores_from_dns(server, dns):
    _send(server.ports["senderscore"], "senderscore")
    message = server.delivered("senderscore")
    assert _header(message, "X-SenderScore") == ["60"], message.decode()
    assert [v.lower() for v in _header(message, "X-Spam")] == ["yes"], message.decode()
    assert ("1.0.0.127.score.senderscore.com.", "A") in dns.queries


def test_senderscore_disconnects_a_low_reputation_client_with_its_text(server):
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP("127.0.0.1", server.ports["senderscore"], timeout=30,
                     source_address=("127.0.0.2", 0))
    assert (refused.value.smtp_code, refused.value.smtp_error.decode()) == (
        int(BLOCK_TEXT[:3]), BLOCK_TEXT[4:])


def test_three_filters_in_one_chain(server, keys):
    replies = _send(server.ports["chain"], "chained", rcpts=("bob@example.test", "blocked@example.test"))
    assert replies["blocked@example.test"][0] == 550
    message = server.delivered("chained")
    assert len(_header(message, "X-Libopensmtpd-Filter")) == 1
    assert _header(message, "X-SenderScore") == ["60"]
    assert b"[redacted]" in message
    assert _verify_dkim(message, keys[1]), message.decode()
