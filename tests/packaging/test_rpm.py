"""contrib/build-rpm.sh builds the noarch RPM from this checkout (rpmbuild from
Debian's rpm package, installed by contrib/dev.sh); the package is checked with rpm
itself: file list, scriptlets, dependencies, rpmlint, and the packaged programs run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from smtpd.parse import parse_config
from tests.conftest import REPO


def run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("rpms")
    res = run("bash", str(REPO / "contrib/build-rpm.sh"), str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    rpms = list(out.glob("pysmtpd-*.noarch.rpm"))
    assert len(rpms) == 1, res.stdout
    return rpms[0], res.stdout


def query(rpm: Path, *what: str) -> str:
    res = run("rpm", "-qp", *what, str(rpm))
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_file_list(built):
    rpm, _ = built
    files = set(query(rpm, "-l").split())
    for path in ("/etc/smtpd.conf", "/usr/sbin/smtpd", "/usr/sbin/smtpctl",
                 "/usr/sbin/sendmail.pysmtpd", "/usr/sbin/makemap.pysmtpd",
                 "/usr/bin/mailq.pysmtpd", "/usr/bin/newaliases.pysmtpd",
                 "/usr/lib/systemd/system/smtpd.service", "/usr/lib/systemd/system/smtpd.socket",
                 "/usr/lib/sysusers.d/smtpd.conf", "/usr/lib/tmpfiles.d/smtpd.conf",
                 "/var/spool/smtpd", "/usr/share/doc/pysmtpd/ops.md",
                 "/usr/share/pysmtpd/smtpd/main.py", "/usr/share/pysmtpd/smtpctl/main.py",
                 "/usr/share/pysmtpd/common/messages.py"):
        assert path in files, path
    assert not any("__pycache__" in f or f.startswith("/usr/share/pysmtpd/tests") for f in files)
    # Config is noreplace; the spool directory 0711 root, and nothing inside it.
    dump = {line.split()[0]: line.split() for line in query(rpm, "--dump").splitlines()}
    flags = dict(l.split() for l in query(rpm, "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\\n]").splitlines()
                 if len(l.split()) == 2)
    assert flags["/etc/smtpd.conf"] == "cn"                     # %config(noreplace)
    assert dump["/var/spool/smtpd"][4] == "040711" and dump["/var/spool/smtpd"][5:7] == ["root", "root"]
    assert not any(f.startswith("/var/spool/smtpd/") for f in files)
    assert query(rpm, "--qf", "%{ARCH}").strip() == "noarch"


def test_scriptlets_and_dependencies(built):
    rpm, _ = built
    scripts = query(rpm, "--scripts")
    pre = scripts.split("preinstall scriptlet")[1].split("scriptlet")[0]
    for user in ("_smtpd", "_smtpq"):
        assert f"useradd -r -g {user}" in pre
    assert "alternatives --install /usr/sbin/sendmail mta /usr/sbin/sendmail.pysmtpd" in scripts
    assert "--slave /usr/bin/mailq mta-mailq /usr/bin/mailq.pysmtpd" in scripts
    assert "systemd-tmpfiles --create /usr/lib/tmpfiles.d/smtpd.conf" in scripts
    assert "alternatives --remove mta /usr/sbin/sendmail.pysmtpd" in scripts
    assert "systemctl try-restart smtpd.service" in scripts
    requires = query(rpm, "--requires")
    for dep in ("pyzmq", "aiosmtpd", "dnspython", "typer", "msgspec", "setproctitle", "uvloop"):
        assert f"python3dist({dep})" in requires, dep          # required, never bundled
    assert "python3 >= 3.12" in requires
    files = query(rpm, "-l")
    assert "site-packages" not in files and "zmq" not in files.replace("pyzmq", "")


def test_rpmlint_clean(built):
    _, output = built
    assert "0 errors, 0 warnings" in output, output


def test_packaged_programs_run(built, tmp_path):
    rpm, _ = built
    root = tmp_path / "root"
    root.mkdir()
    cpio = subprocess.run(f"rpm2cpio {rpm} | cpio -idm --quiet", shell=True, cwd=root,
                          capture_output=True, text=True, timeout=60)
    assert cpio.returncode == 0, cpio.stderr
    env = dict(os.environ, PYTHONPATH=str(root / "usr/share/pysmtpd"))
    res = run(sys.executable, str(root / "usr/sbin/smtpd"), "-h", env=env, cwd=tmp_path)
    assert res.returncode == 1 and res.stderr.startswith("version: pysmtpd 0.1.0"), res.stderr
    # mailq.pysmtpd is smtpctl acting as mailq (show queue) by the name it is run as.
    mailq = root / "usr/bin/mailq.pysmtpd"
    assert os.readlink(mailq) == "../sbin/smtpctl"
    res = run(sys.executable, str(mailq), "--socket", str(tmp_path / "none.sock"), env=env, cwd=tmp_path)
    assert "smtpd doesn't seem to be running" in res.stderr
    # The default configuration is valid (with /etc/aliases, which it names).
    (root / "etc/aliases").write_text("root: admin\n")
    config = parse_config(root / "etc/smtpd.conf", root=root)
    assert [(l.address, l.port) for l in config.listeners] == [("localhost", 25)]
    assert set(config.actions) == {"local", "relay"} and not config.not_applied
