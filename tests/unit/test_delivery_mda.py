"""The mda command: OpenSMTPD's environment, exit statuses, timeout, and that the
message goes to its standard input whole."""
from __future__ import annotations


from smtpd import delivery_mda
from tests.unit.delivery_helpers import body
from smtpd.delivery_mda import environment, run, status_of


ENV = environment(home="/", username="alice", sender="", rcpt="alice+x@example.test",
                  dest="alice@example.test", subaddress="x")


def test_environment_is_mda_unpriv_s():
    assert ENV == {"PATH": delivery_mda.DEFAULT_PATH, "DOMAIN": "example.test", "HOME": "/",
                   "ORIGINAL_RECIPIENT": "alice+x@example.test", "RECIPIENT": "alice@example.test",
                   "SHELL": "/bin/sh", "LOCAL": "alice+x", "LOGNAME": "alice", "USER": "alice",
                   "SENDER": "", "EXTENSION": "x"}
    no_tag = environment(home="/h", username="u", sender="s@x", rcpt="u@d", dest="u@d", subaddress="")
    assert "EXTENSION" not in no_tag and no_tag["SENDER"] == "s@x"


def test_status_mapping_as_smtpd_c():
    assert status_of(0, b"", "") == ("ok", "")
    assert status_of(0, b"", "mda exited prematurely") == ("tempfail", "mda exited prematurely")
    assert status_of(75, b"busy\n", "") == ("tempfail", "Error (temporary failure: busy)")
    assert status_of(71, b"", "")[0] == "tempfail"
    assert status_of(67, b"x\nno such user\n\n", "") == ("permfail", "Error (user unknown: no such user)")
    assert status_of(1, b"", "") == ("permfail", "Error (exited abnormally)")
    assert status_of(-9, b"", "") == ("tempfail", "terminated; signal 9")


def test_message_on_stdin_and_exit_status(tmp_path):
    out = tmp_path / "got"
    status = run(f"cat > {out}; echo done; exit 0", body(b"Subject: s\n\nbody\n", b"Delivered-To: a@x\n"),
                 ENV, str(tmp_path))
    assert status == ("ok", "")
    assert out.read_bytes() == b"Delivered-To: a@x\nSubject: s\n\nbody\n"
    assert run("cat >/dev/null; echo nope >&2; exit 77", body(b"x\n"), ENV, "/") == \
        ("permfail", "Error (permission denied: nope)")


def test_a_command_that_does_not_read_a_big_message(tmp_path):
    # it exits 0 without reading: the message did not all go in, so not delivered
    status, error = run("exit 0", body(b"x" * (4 << 20)), ENV, "/")
    assert (status, error) == ("tempfail", "mda exited prematurely")


def test_timeout_kills_the_command_group(tmp_path):
    status, error = run("sleep 30 & sleep 30", body(b"x\n"), ENV, "/", timeout=0.5)
    assert (status, error) == ("tempfail", "terminated; timeout")


def test_home_that_cannot_be_entered_runs_in_root(tmp_path):
    out = tmp_path / "pwd"
    assert run(f"cat >/dev/null; pwd > {out}", body(b"x\n"), ENV, str(tmp_path / "missing"))[0] == "ok"
    assert out.read_text().strip() == "/"
