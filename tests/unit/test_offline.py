"""Reading sendmail's offline files (smtpd/offline.py), without the daemon."""
from __future__ import annotations

import os
import pwd

import pytest

from common.submission import parse_args
from smtpd.offline import OfflineError, qualify, read_file


def _summary(args):
    opts = parse_args(args)
    return opts.sender, opts.by_headers, opts.recipients


def test_sendmail_arguments():
    assert _summary(["-f", "a@b.test", "-oi", "--", "x@y.test", "z"]) == ("a@b.test", False, ["x@y.test", "z"])
    assert _summary(["-fa@b.test", "-t", "-F", "Full Name", "r@x.test"]) == ("a@b.test", True, ["r@x.test"])
    assert _summary(["-r", "bounce@b.test", "-i", "-v"]) == ("bounce@b.test", False, [])
    assert qualify("bob", "mx.test") == "bob@mx.test" and qualify("<a@b>", "mx.test") == "a@b"


def write(tmp_path, text: str, name: str = "f"):
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def test_read_file_by_arguments_and_by_headers(tmp_path):
    owner = pwd.getpwuid(os.getuid())
    msg = read_file(write(tmp_path, "-oi|-F|Full Name|--|alice\nSubject: s\n\nbody\n"), "mx.test", 10_000)
    assert msg.sender == f"{owner.pw_name}@mx.test" and msg.recipients == ["alice@mx.test"]
    assert msg.uid == owner.pw_uid
    assert msg.data == f"From: Full Name <{owner.pw_name}@mx.test>\nSubject: s\n\nbody\n".encode()
    msg = read_file(write(tmp_path, "-t|-f|me@x.test\nFrom: me@x.test\nTo: A <a@x.test>, b@x.test\n"
                                    "Bcc: hidden@x.test,\n  also@x.test\nSubject: s\n\nbody\nTo: not@x.test\n"),
                    "mx.test", 10_000)
    assert msg.sender == "me@x.test"
    assert msg.recipients == ["a@x.test", "b@x.test", "hidden@x.test", "also@x.test"]
    assert b"Bcc" not in msg.data and b"also@x.test" not in msg.data and b"To: not@x.test" in msg.data
    assert read_file(write(tmp_path, ""), "mx.test", 10_000) is None


def test_refused_files(tmp_path):
    with pytest.raises(OfflineError, match="no recipient"):
        read_file(write(tmp_path, "-f|a@b.test\nSubject: s\n\nx\n"), "mx.test", 10_000)
    with pytest.raises(OfflineError, match="no argument line"):
        read_file(write(tmp_path, "no newline at all"), "mx.test", 10_000)
    target = write(tmp_path, "--|a@b.test\n\nx\n", "target")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OfflineError, match="symbolic link"):
        read_file(tmp_path / "link", "mx.test", 10_000)
    os.link(target, tmp_path / "hard")
    with pytest.raises(OfflineError, match="hard links"):
        read_file(target, "mx.test", 10_000)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OfflineError, match="not a regular file"):
        read_file(tmp_path / "fifo", "mx.test", 10_000)
