"""smtpd/mta.py message_id: the Message-ID of the delivery line, read off the header
only, the same value as a plain line-by-line reading of the whole message."""
from hypothesis import given, settings, strategies as st

from smtpd.mta import message_id


def line_by_line(message: bytes) -> str:
    """The reference: line ends normalised, header cut at the first empty line, each
    line read in turn."""
    head = message[:64 * 1024].replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    value = None
    for line in head.split(b"\n"):
        if value is not None and line[:1] in (b" ", b"\t"):
            value += line.strip()
            continue
        if value is not None:
            break
        name, sep, rest = line.partition(b":")
        if sep and name.strip().lower() == b"message-id":
            value = rest.strip()
    return value.decode("utf-8", "replace") if value else ""


def test_message_id_examples():
    assert message_id(b"From: a\nMessage-ID: <1@x>\nTo: b\n\nbody\n") == "<1@x>"
    assert message_id(b"Message-Id:\r\n <2@x>\r\n\r\nMessage-ID: <3@x>\r\n") == "<2@x>"
    assert message_id(b"Subject: x\n\nMessage-ID: <in the body>\n") == ""
    assert message_id(b"In-Reply-To: <message-id@x>\nMESSAGE-ID : <4@x>\n\n") == "<4@x>"
    assert message_id(b"") == ""


def test_message_id_is_the_line_by_line_value():
    pieces = st.sampled_from([b"Message-ID", b"message-id", b"To", b":", b" ", b"\t", b"<a@b>",
                              b"\n", b"\r\n", b"\r", b"\n\n", b"\n\r\n", b"x", b"message-idx"])

    @settings(max_examples=500, deadline=None)
    @given(st.lists(pieces, max_size=16))
    def same(parts):
        message = b"".join(parts)
        assert message_id(message) == line_by_line(message)

    same()
