"""Tests for smtpd.maildir (Maildir delivery, delivery headers, loop detection)."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import pytest

from smtpd import maildir as md
from smtpd.maildir import (
    MaildirError,
    deliver_maildir,
    has_delivered_to_loop,
    is_spam,
    maildir_unique_name,
    prepend_delivery_headers,
)

MSG = b"From: a@example.org\nTo: b@example.org\nSubject: hi\n\nbody line\n"
SPAM = b"From: a@example.org\nX-Spam: Yes\nSubject: buy\n\nbody\n"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _files(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


# --- successful delivery ------------------------------------------------------------------------

def test_creates_structure_and_delivers(tmp_path: Path) -> None:
    box = tmp_path / "home" / "bob" / "Maildir"
    out = Path(deliver_maildir(box, MSG))
    for sub in ("cur", "new", "tmp"):
        assert (box / sub).is_dir()
        assert _mode(box / sub) == 0o700
    assert _mode(box) == 0o700
    assert _mode(tmp_path / "home") == 0o700  # intermediate directories too (mkdirs 0700)
    assert out.parent == box / "new"
    assert out.read_bytes() == MSG
    assert _mode(out) == 0o600
    assert _files(box / "tmp") == []
    assert _files(box / "cur") == []


def test_accepts_str_path_and_existing_maildir(tmp_path: Path) -> None:
    box = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    out = deliver_maildir(str(box), MSG)
    assert isinstance(out, str)
    assert Path(out).read_bytes() == MSG


def test_content_written_exactly(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096 + b"\r\nmixed\nendings\r\n"  # ~1 MiB, binary-safe
    out = Path(deliver_maildir(tmp_path / "M", data))
    assert out.read_bytes() == data


def test_partial_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data[:7]))

    monkeypatch.setattr(md.os, "write", short_write)
    out = Path(deliver_maildir(tmp_path / "M", MSG))
    assert out.read_bytes() == MSG


def test_empty_message(tmp_path: Path) -> None:
    out = Path(deliver_maildir(tmp_path / "M", b""))
    assert out.read_bytes() == b""


def test_file_is_fsynced_before_rename_and_dir_after(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    box = tmp_path / "M"
    deliver_maildir(box, MSG)  # create the structure first
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def rename(*a: object, **kw: object) -> None:
        events.append("rename")
        real_rename(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(md.os, "fsync", fsync)
    monkeypatch.setattr(md.os, "rename", rename)
    deliver_maildir(box, MSG)
    assert events == ["fsync-file", "rename", "fsync-dir"]


# --- unique names ---------------------------------------------------------------------------------

NAME_RE = re.compile(r"(\d+)\.M(\d+)P(\d+)Q(\d+)\.([^/:]+?)(,S=(\d+))?")


def test_unique_name_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(md.socket, "gethostname", lambda: "mx1.example.org")
    name = maildir_unique_name(42)
    m = NAME_RE.fullmatch(name)
    assert m, name
    assert m[3] == str(os.getpid())
    assert m[5] == "mx1.example.org"
    assert m[7] == "42"
    assert 0 <= int(m[2]) < 1_000_000
    assert NAME_RE.fullmatch(maildir_unique_name())[6] is None  # type: ignore[index]


def test_hostname_slash_and_colon_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(md.socket, "gethostname", lambda: "odd/host:name")
    name = maildir_unique_name()
    assert name.endswith(".odd\\057host\\072name")
    assert "/" not in name and ":" not in name


def test_unique_names_under_rapid_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Freeze the clock: only the counter can tell the names apart.
    monkeypatch.setattr(md.time, "time_ns", lambda: 1_700_000_000_123_456_000)
    names = {maildir_unique_name() for _ in range(1000)}
    assert len(names) == 1000
    paths = {deliver_maildir(tmp_path / "M", MSG) for _ in range(200)}
    assert len(paths) == 200
    assert len(_files(tmp_path / "M" / "new")) == 200


def test_collision_in_tmp_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = tmp_path / "M"
    deliver_maildir(box, MSG)
    names = iter(["dup", "dup", "fresh"])
    monkeypatch.setattr(md, "maildir_unique_name", lambda size=None: next(names))
    (box / "tmp" / "dup").write_bytes(b"stale")
    out = deliver_maildir(box, MSG)
    assert out == f"{box}/new/fresh"
    assert (box / "tmp" / "dup").read_bytes() == b"stale"  # never overwritten


# --- junk routing -------------------------------------------------------------------------------

def test_junk_routes_spam(tmp_path: Path) -> None:
    box = tmp_path / "M"
    out = Path(deliver_maildir(box, SPAM, junk=True))
    assert out.parent == box / ".Junk" / "new"
    assert out.read_bytes() == SPAM
    for sub in ("cur", "new", "tmp"):
        assert (box / sub).is_dir()
        assert (box / ".Junk" / sub).is_dir()
        assert _mode(box / ".Junk" / sub) == 0o700
    assert _mode(box / ".Junk") == 0o700
    assert _files(box / "new") == []


def test_junk_option_off_keeps_spam_in_inbox(tmp_path: Path) -> None:
    out = Path(deliver_maildir(tmp_path / "M", SPAM))
    assert out.parent == tmp_path / "M" / "new"
    assert not (tmp_path / "M" / ".Junk").exists()


def test_junk_option_ham_goes_to_inbox(tmp_path: Path) -> None:
    out = Path(deliver_maildir(tmp_path / "M", MSG, junk=True))
    assert out.parent == tmp_path / "M" / "new"


@pytest.mark.parametrize("msg, expected", [
    (b"X-Spam: yes\n\nb", True),
    (b"x-spam:YES\n\nb", True),
    (b"X-SPAM:   yes  \r\n\r\nb", True),
    (b"X-Spam: no\n\nb", False),
    (b"X-Spam-Flag: YES\n\nb", False),
    (b"X-Spam: yes please\n\nb", False),
    (b"Subject: x\n\nX-Spam: yes\n", False),   # body only
    (b"Subject: x\r\n\r\nX-Spam: yes\r\n", False),
    (b"Subject: x\nX-Spam:\n yes\n\nb", True),  # folded
    (b"X-Spam: yes", True),                     # headers only, no body
    (b"", False),
])
def test_is_spam(msg: bytes, expected: bool) -> None:
    assert is_spam(msg) is expected


# --- error mapping -------------------------------------------------------------------------------

def test_relative_path_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MaildirError) as ei:
        deliver_maildir("Maildir", MSG)
    assert ei.value.temporary is False
    assert "absolute" in ei.value.text
    assert not (tmp_path / "Maildir").exists()


@pytest.mark.parametrize("rel", ["../x", "a/../../b", "a/..", "a/../b"])
def test_dotdot_refused(tmp_path: Path, rel: str) -> None:
    with pytest.raises(MaildirError) as ei:
        deliver_maildir(f"{tmp_path}/{rel}", MSG)
    assert ei.value.temporary is False
    assert ".." in ei.value.text


def test_dots_inside_names_are_fine(tmp_path: Path) -> None:
    out = deliver_maildir(tmp_path / "a..b" / "...x", MSG)
    assert Path(out).read_bytes() == MSG


def test_nul_in_path_refused(tmp_path: Path) -> None:
    with pytest.raises(MaildirError) as ei:
        deliver_maildir(f"{tmp_path}/a\0b", MSG)
    assert ei.value.temporary is False


def test_maildir_symlink_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    deliver_maildir(real, MSG)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(MaildirError) as ei:
        deliver_maildir(link, MSG)
    assert ei.value.temporary is False
    assert "symbolic link" in ei.value.text
    assert len(_files(real / "new")) == 1


def test_dangling_symlink_refused(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(MaildirError) as ei:
        deliver_maildir(link, MSG)
    assert ei.value.temporary is False
    assert not (tmp_path / "nowhere").exists()


def test_subdirectory_symlink_refused(tmp_path: Path) -> None:
    box = tmp_path / "M"
    (box / "cur").mkdir(parents=True)
    (box / "tmp").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (box / "new").symlink_to(elsewhere)
    with pytest.raises(MaildirError) as ei:
        deliver_maildir(box, MSG)
    assert ei.value.temporary is False
    assert _files(elsewhere) == []
    assert _files(box / "tmp") == []


def test_maildir_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "M"
    f.write_bytes(b"x")
    with pytest.raises(MaildirError) as ei:
        deliver_maildir(f, MSG)
    assert ei.value.temporary is False
    assert ei.value.errno == errno.ENOTDIR
    assert "not a directory" in ei.value.text


def test_path_under_a_regular_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"x")
    with pytest.raises(MaildirError) as ei:
        deliver_maildir(f / "Maildir", MSG)
    assert ei.value.temporary is False
    assert ei.value.errno == errno.ENOTDIR


def test_subdirectory_is_a_file(tmp_path: Path) -> None:
    box = tmp_path / "M"
    box.mkdir()
    (box / "new").write_bytes(b"")
    with pytest.raises(MaildirError) as ei:
        deliver_maildir(box, MSG)
    assert ei.value.temporary is False


def test_missing_without_create_is_temporary(tmp_path: Path) -> None:
    with pytest.raises(MaildirError) as ei:
        deliver_maildir(tmp_path / "M", MSG, create=False)
    assert ei.value.temporary is True
    assert not (tmp_path / "M").exists()


def test_missing_subdir_without_create(tmp_path: Path) -> None:
    box = tmp_path / "M"
    (box / "new").mkdir(parents=True)
    (box / "cur").mkdir()
    with pytest.raises(MaildirError) as ei:
        deliver_maildir(box, MSG, create=False)
    assert ei.value.temporary is True
    assert not (box / "tmp").exists()


def test_existing_maildir_without_create(tmp_path: Path) -> None:
    box = tmp_path / "M"
    deliver_maildir(box, MSG)
    assert Path(deliver_maildir(box, MSG, create=False)).read_bytes() == MSG


def _oserror(code: int):
    def fail(*a: object, **kw: object):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize("code, temporary", [
    (errno.ENOSPC, True),
    (errno.EDQUOT, True),
    (errno.EIO, True),
    (errno.EAGAIN, True),
    (errno.EMFILE, True),
    (errno.EACCES, False),
    (errno.EPERM, False),
    (errno.EFBIG, False),
])
def test_write_errors_mapped_and_tmp_cleaned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             code: int, temporary: bool) -> None:
    box = tmp_path / "M"
    monkeypatch.setattr(md.os, "write", _oserror(code))
    with pytest.raises(MaildirError) as ei:
        deliver_maildir(box, MSG)
    assert ei.value.temporary is temporary
    assert ei.value.errno == code
    assert os.strerror(code) in ei.value.text
    assert _files(box / "tmp") == []
    assert _files(box / "new") == []


def test_enospc_after_partial_write_cleans_tmp(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls = {"n": 0}

    def write(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data[:5]))

    monkeypatch.setattr(md.os, "write", write)
    box = tmp_path / "M"
    with pytest.raises(MaildirError) as ei:
        deliver_maildir(box, MSG)
    assert ei.value.temporary is True
    assert _files(box / "tmp") == []


def test_file_fsync_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = tmp_path / "M"
    deliver_maildir(box, MSG)
    before = _files(box / "new")
    monkeypatch.setattr(md.os, "fsync", _oserror(errno.EIO))
    with pytest.raises(MaildirError) as ei:
        deliver_maildir(box, MSG)
    assert ei.value.temporary is True
    assert _files(box / "tmp") == []
    assert _files(box / "new") == before


def test_rename_failure_cleans_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = tmp_path / "M"
    monkeypatch.setattr(md.os, "rename", _oserror(errno.EACCES))
    with pytest.raises(MaildirError) as ei:
        deliver_maildir(box, MSG)
    assert ei.value.temporary is False
    assert _files(box / "tmp") == []
    assert _files(box / "new") == []


def test_directory_fsync_failure_withdraws_message(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    box = tmp_path / "M"
    deliver_maildir(box, MSG)
    before = _files(box / "new")
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(md.os, "fsync", fsync)
    with pytest.raises(MaildirError) as ei:
        deliver_maildir(box, MSG)
    assert ei.value.temporary is True
    assert _files(box / "tmp") == []
    assert _files(box / "new") == before


def test_create_error_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = tmp_path / "M"
    deliver_maildir(box, MSG)
    real_open = os.open

    def open_(path, flags, *a, **kw):  # type: ignore[no-untyped-def]
        if flags & os.O_CREAT:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(md.os, "open", open_)
    with pytest.raises(MaildirError) as ei:
        deliver_maildir(box, MSG)
    assert ei.value.temporary is True
    assert _files(box / "tmp") == []


def test_mkdir_error_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(md.os, "mkdir", _oserror(errno.EACCES))
    with pytest.raises(MaildirError) as ei:
        deliver_maildir(tmp_path / "M", MSG)
    assert ei.value.temporary is False


def test_unexpected_exception_still_cleans_tmp(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object) -> int:
        raise KeyboardInterrupt

    box = tmp_path / "M"
    monkeypatch.setattr(md.os, "write", boom)
    with pytest.raises(KeyboardInterrupt):
        deliver_maildir(box, MSG)
    assert _files(box / "tmp") == []


def test_no_descriptor_leak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.exists():
        pytest.skip("needs /proc")
    box = tmp_path / "M"
    deliver_maildir(box, MSG)
    before = len(os.listdir(fd_dir))
    for _ in range(20):
        deliver_maildir(box, SPAM, junk=True)
    monkeypatch.setattr(md.os, "write", _oserror(errno.ENOSPC))
    for _ in range(20):
        with pytest.raises(MaildirError):
            deliver_maildir(box, MSG)
    assert len(os.listdir(fd_dir)) == before


def test_error_repr_and_str() -> None:
    err = MaildirError(True, "disk full")
    assert str(err) == "disk full"
    assert err.temporary is True and err.text == "disk full" and err.errno is None
    assert "temporary=True" in repr(err)


# --- delivery headers -----------------------------------------------------------------------------

def test_prepend_headers() -> None:
    out = prepend_delivery_headers(MSG, sender="a@example.org", dest="bob@example.org")
    assert out == b"Return-Path: <a@example.org>\nDelivered-To: bob@example.org\n" + MSG


def test_prepend_headers_null_sender() -> None:
    out = prepend_delivery_headers(MSG, sender="", dest="bob@example.org")
    assert out == b"Delivered-To: bob@example.org\n" + MSG


def test_prepend_headers_follow_crlf() -> None:
    msg = b"Subject: x\r\n\r\nbody\r\n"
    out = prepend_delivery_headers(msg, sender="a@b", dest="c@d")
    assert out == b"Return-Path: <a@b>\r\nDelivered-To: c@d\r\n" + msg


@pytest.mark.parametrize("sender, dest", [("a\n@b", "c@d"), ("a@b", "c@d\r\nX-Evil: 1"),
                                          ("a@b", ""), ("a\0@b", "c@d")])
def test_prepend_headers_rejects_injection(sender: str, dest: str) -> None:
    with pytest.raises(ValueError):
        prepend_delivery_headers(MSG, sender=sender, dest=dest)


def test_prepended_message_loops_back() -> None:
    out = prepend_delivery_headers(MSG, sender="a@b", dest="Bob@Example.org")
    assert has_delivered_to_loop(out, "bob@example.org")
    assert not has_delivered_to_loop(MSG, "bob@example.org")


# --- loop detection -------------------------------------------------------------------------------

@pytest.mark.parametrize("msg, expected", [
    (b"Delivered-To: bob@example.org\n\nbody\n", True),
    (b"delivered-to:BOB@EXAMPLE.ORG\n\nbody\n", True),
    (b"Delivered-To:   bob@example.org   \r\nSubject: x\r\n\r\nbody\r\n", True),
    (b"Delivered-To: <bob@example.org>\n\nbody\n", True),
    (b"Subject: x\nDelivered-To: other@example.org\nDelivered-To: bob@example.org\n\n", True),
    (b"Delivered-To: bob@example.org.evil\n\nbody\n", False),
    (b"Delivered-To: xbob@example.org\n\nbody\n", False),
    (b"X-Delivered-To: bob@example.org\n\nbody\n", False),
    (b"Subject: x\n\nDelivered-To: bob@example.org\n", False),   # in the body only
    (b"Subject: x\r\n\r\nDelivered-To: bob@example.org\r\n", False),
    (b"Subject: forwarded\n\n> Delivered-To: bob@example.org\n", False),
    (b"", False),
])
def test_loop_detection(msg: bytes, expected: bool) -> None:
    assert has_delivered_to_loop(msg, "bob@example.org") is expected


def test_loop_detection_trims_dest() -> None:
    assert has_delivered_to_loop(b"Delivered-To: bob@x\n\n", "  Bob@X ")
    assert not has_delivered_to_loop(b"Delivered-To: \n\n", "")
