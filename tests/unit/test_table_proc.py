"""Proc tables (smtpd/table/proc.py) against real table programs speaking protocol 0.1:
one in Python and one in shell (tests/table_programs.py), run as lka runs them."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from smtpd.table import TableUnavailable
from smtpd.table import proc as table_proc
from smtpd.table.proc import ProcTable
from tests.table_programs import python_for_tables, write_programs

DATA = """alias team alice, bob
alias postmaster root
domain example.test example.test
credentials alice alice:$2b$08$hash
source any 192.0.2.1
source any 192.0.2.2
"""


@pytest.fixture
def programs(tmp_path):
    py, sh = write_programs(tmp_path)
    data = tmp_path / "data"
    data.write_text(DATA)
    domains = tmp_path / "domains"
    domains.write_text("example.test\nexample.org\n")
    python = python_for_tables()
    return {"py": ("py", (python, [python, str(py), str(data)])),
            "sh": ("sh", (str(sh), ["shtable", str(domains)]))}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@contextlib.asynccontextmanager
async def opened(name: str, type_: str, command):
    """A proc table opened as lka opens it, closed (its program ended) afterwards."""
    table = ProcTable(name, type_, None, command)
    table.bind_loop()
    await table.open()
    try:
        yield table
    finally:
        await table.close()


def test_python_program_answers_every_request(programs):
    async def scenario():
        async with opened("pytable", "proc-exec", programs["py"][1]) as table:
            assert table.registered == {"alias", "domain", "credentials", "source"}
            assert await table.lookup("alias", "TEAM") == "alice, bob"      # keys lowercased
            assert await table.lookup("virtual", "postmaster") == "root"   # sent as alias
            assert await table.lookup("alias", "nobody") is None
            assert await table.check("domain", "example.test") is True
            assert await table.check("domain", "example.com") is False
            assert [await table.fetch("source") for _ in range(3)] == ["192.0.2.1", "192.0.2.2", "192.0.2.1"]
            assert await table.update() is None
            with pytest.raises(TableUnavailable):
                await table.lookup("alias", "two\nlines")
        assert table.process is None
    run(scenario())


def test_shell_program(programs):
    async def scenario():
        async with opened("shtable", "proc", programs["sh"][1]) as table:
            assert table.registered == {"domain"}
            assert await table.check("domain", "Example.ORG") is True
            assert await table.check("domain", "example.net") is False
            assert await table.lookup("domain", "example.test") == "example.test"
            assert await table.update() is None
    run(scenario())


def test_crash_garbage_and_hang_are_temporary_and_the_program_restarts(programs, monkeypatch):
    monkeypatch.setattr(table_proc, "REPLY_TIMEOUT", 1.0)
    monkeypatch.setattr(table_proc, "RESTART_DELAY", 0.2)

    async def scenario():
        async with opened("pytable", "proc-exec", programs["py"][1]) as table:
            for bad in ("crash", "garbage", "hang"):
                first = table.process.pid
                with pytest.raises(TableUnavailable):
                    await table.lookup("alias", bad)
                await asyncio.sleep(0.3)                    # past the restart delay
                assert await table.lookup("alias", "team") == "alice, bob"
                assert table.process.pid != first           # a new program answered
    run(scenario())


def test_synchronous_callers_wait_from_a_thread_and_never_on_the_loop(programs):
    async def scenario():
        async with opened("pytable", "proc-exec", programs["py"][1]) as table:
            with pytest.raises(TableUnavailable):           # WouldBlock: on the loop's thread
                table.lookup_now("alias", "team")
            assert await asyncio.to_thread(table.lookup_now, "alias", "team") == "alice, bob"
            assert await asyncio.to_thread(table.check_now, "domain", "example.test") is True
    run(scenario())


def test_a_program_that_cannot_run_or_handshake_gives_temporary_failures(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/sh\necho hello\n")
    bad.chmod(0o755)

    async def scenario():
        for command in ((str(tmp_path / "missing"), ["x"]), (str(bad), ["bad"]), None):
            async with opened("t", "proc", command) as table:   # open logs, does not raise
                with pytest.raises(TableUnavailable):
                    await table.lookup("alias", "x")
    run(scenario())


def test_debian_extras_table_passwd_speaks_imsg_and_works_unchanged(tmp_path):
    """Debian 12's opensmtpd-extras (6.7) table-passwd, unpacked: it exits on the 0.1
    handshake, and answers in OpenSMTPD 6's imsg protocol."""
    from tests.oracle import opensmtpd as oracle
    from tests.table_programs import fetch_extras
    try:
        root = fetch_extras()
    except oracle.Unavailable as exc:
        oracle.unavailable(str(exc))
    program = root / "usr/libexec/opensmtpd/table-passwd"
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:$2b$08$hashhashhash:1001:1001::/home/alice:/bin/sh\n"
                      "bob:secret:1002:1002:Bob:/srv/bob:\n")

    async def scenario():
        async with opened("users", "passwd", (str(program), ["users", str(passwd)])) as table:
            assert table.protocol == "imsg"
            assert await table.lookup("userinfo", "ALICE") == "1001:1001:/home/alice"
            assert await table.lookup("credentials", "bob") == "bob:secret"
            assert await table.lookup("userinfo", "carol") is None
            with pytest.raises(TableUnavailable):               # table-passwd: check is -1
                await table.check("userinfo", "alice")
            passwd.write_text("carol:x:1003:1003::/home/carol:\n")
            assert await table.update() is None
            assert await table.lookup("userinfo", "carol") == "1003:1003:/home/carol"
            pid = table.process.pid
            table.process.kill()                                # crashed: restarted, same protocol
            await table.process.wait()
            assert await table.lookup("userinfo", "carol") == "1003:1003:/home/carol"
            assert table.process.pid != pid and table.protocol == "imsg"
    run(scenario())
