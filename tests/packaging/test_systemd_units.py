"""systemd/: the unit files verified by systemd's own tools (from Debian's systemd
package, installed by contrib/dev.sh), sysusers and tmpfiles applied to a scratch
root.  The daemon's behaviour under these units is tested in tests/e2e/test_systemd.py."""
from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SYSTEMD = REPO / "systemd"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A filesystem root with the units installed where the RPM puts them, the
    executables they name, and systemd's own units (sysinit.target...)."""
    root = tmp_path_factory.mktemp("root")
    units = root / "usr/lib/systemd/system"
    shutil.copytree("/usr/lib/systemd/system", units, symlinks=True)
    for name in ("smtpd.service", "smtpd.socket"):
        shutil.copy(SYSTEMD / name, units / name)
    (root / "usr/sbin").mkdir(parents=True)
    for command in ("smtpd", "smtpctl"):                                 # real executables
        shutil.copy(REPO / ".venv/bin" / command, root / "usr/sbin" / command)
    return root


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60)


def test_systemd_analyze_verify_is_silent(root):
    res = run("systemd-analyze", "verify", f"--root={root}", "smtpd.service", "smtpd.socket")
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res.stdout + res.stderr


def test_hardening_exposure_is_low(root):
    # --threshold counts in hundredths of the 0-10 scale printed: 40 is "4.0".
    res = run("systemd-analyze", "security", "--offline=true", "--threshold=40", f"--root={root}",
              "smtpd.service")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    score = float(res.stdout.rsplit("smtpd.service:", 1)[1].split()[0])
    assert score <= 4.0


def test_unit_essentials():
    unit = (SYSTEMD / "smtpd.service").read_text()
    for line in ("Type=notify", "NotifyAccess=main", "ExecStart=/usr/sbin/smtpd -F",
                 "ExecReload=/usr/sbin/smtpctl reload", "WatchdogSec=30s", "RestartPreventExitStatus=78",
                 "NoNewPrivileges=yes", "KillMode=mixed"):
        assert f"\n{line}\n" in unit, line
    socket_unit = (SYSTEMD / "smtpd.socket").read_text()
    assert "\nListenStream=127.0.0.1:25\n" in socket_unit and "\nService=smtpd.service\n" in socket_unit


def test_sysusers_creates_the_privsep_users(tmp_path):
    (tmp_path / "etc").mkdir()
    res = run("systemd-sysusers", f"--root={tmp_path}", str(SYSTEMD / "smtpd.sysusers"))
    assert res.returncode == 0, res.stderr
    users = {l.split(":")[0]: l.split(":") for l in (tmp_path / "etc/passwd").read_text().splitlines()}
    assert users["_smtpd"][5:] == ["/var/empty", "/usr/sbin/nologin"]
    assert users["_smtpq"][5:] == ["/var/spool/smtpd", "/usr/sbin/nologin"]
    assert int(users["_smtpd"][2]) < 1000 and int(users["_smtpq"][2]) < 1000   # system users
    groups = {l.split(":")[0] for l in (tmp_path / "etc/group").read_text().splitlines()}
    assert {"_smtpd", "_smtpq"} <= groups


def test_tmpfiles_creates_spool_and_runtime_directories(tmp_path):
    res = run("systemd-tmpfiles", f"--root={tmp_path}", "--create", str(SYSTEMD / "smtpd.tmpfiles"))
    assert res.returncode == 0, res.stderr
    for path in ("var/spool/smtpd", "run/smtpd"):
        st = (tmp_path / path).stat()
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o711, path
