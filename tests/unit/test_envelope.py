import pytest

from common import envelope as codec
from common.envelope import Envelope, EnvelopeError

OPENSMTPD_68 = b"""version: 3
dispatcher: sink
type: mta
smtpname: vm
helo: vm
hostname: localhost
sockaddr: 127.0.0.1
sender: s@src.test
rcpt: r@sink.test
dest: r@sink.test
ctime: 1795538835
last-try: 0
last-bounce: 0
ttl: 0
retry: 0
dsn-notify: 0
"""


def test_reads_an_envelope_written_by_opensmtpd_and_writes_it_back_identically():
    env = codec.load(OPENSMTPD_68, 0xB183B2D0B6C6F9AE)
    assert env.dispatcher == "sink" and env.sender == "s@src.test" and env.ctime == 1795538835
    assert env.msgid == 0xB183B2D0
    assert codec.dump(env) == OPENSMTPD_68


def test_round_trip_of_every_field():
    env = Envelope(id=5 << 32 | 7, dispatcher="local", tag="T", type="mda", smtpname="mx",
                   helo="h", hostname="rdns", username="u", errorline="451 4.0.0 later",
                   sockaddr="[::1]", sender="", rcpt="a@b", dest="c@d", ctime=1, last_try=2,
                   last_bounce=3, ttl=4, retry=5, flags=["authenticated", "internal"],
                   dsn_notify=6, dsn_ret="HDRS", dsn_envid="E", dsn_orcpt="rfc822;a@b",
                   esc_class=4, esc_code=20, mda_exec="", mda_subaddress="tag", mda_user="a")
    assert codec.load(codec.dump(env), env.id) == env


def test_empty_values_are_omitted_and_null_sender_round_trips():
    env = Envelope(dispatcher="x", type="mta", sender="", rcpt="a@b", dest="a@b")
    text = codec.dump(env).decode()
    assert "sender:" not in text and "errorline" not in text and "esc-class" not in text
    assert codec.load(codec.dump(env)).sender == ""


@pytest.mark.parametrize("data", [
    b"version: 2\ndispatcher: x\ntype: mta\n",
    b"version: 3\ndispatcher: x\ntype: mta\nfoo: bar\n",
    b"version: 3\ndispatcher: x\ntype: warp\n",
    b"version: 3\ndispatcher: x\ntype: mta\nretry: many\n",
    b"version: 3\ndispatcher: x\ntype: mta\nno colon here\n",
    b"version: 3\ntype: mta\n",
    b"version: 3\ndispatcher: x\n type: mta\n",          # a key starts its line
    b"version: 3\ndispatcher: x\ntype mta: x\n",
    b"version: 3\ndispatcher: x\n: mta\n",
    b"\xff\xfe",
    b"",
])
def test_corrupt_envelopes_are_refused(data):
    with pytest.raises(EnvelopeError):
        codec.load(data)


def test_a_line_break_in_a_value_cannot_inject_keys():
    env = Envelope(dispatcher="x", errorline="bad\ndispatcher: evil")
    with pytest.raises(EnvelopeError):
        codec.dump(env)


def test_keys_are_case_insensitive_and_old_bounce_type_names_map():
    env = codec.load(b"Version: 3\nDISPATCHER: x\ntype: bounce\nbounce-type: error\n")
    assert env.bounce_type == "failed"


def test_blanks_around_the_colon_and_the_value_are_ignored():
    env = codec.load(b"version : 3\ndispatcher:x\ntype  :   mta  \nretry:\t2\n")
    assert (env.dispatcher, env.type, env.retry) == ("x", "mta", 2)
