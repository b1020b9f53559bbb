"""contrib/build-rpm.sh builds the noarch RPM from this checkout; the package is checked
with rpm itself: file list, bytecode, scriptlets, generated dependencies, rpmlint, the
manual pages, and the installed tree run from the unpacked payload.

This host is Debian: its rpm has none of Fedora's macro packages, so the build loads
tests/packaging/fedora-macros.shim (the Fedora macros' documented behaviour) and rpmlint
reads tests/packaging/rpmlint-fedora.toml (Fedora's rpmlint settings).  The
dependency generators are rpm's own (python.attr, pythondist.attr), as in Fedora."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from smtpd.parse import parse_config
from tests.conftest import REPO

PACKAGING = REPO / "tests/packaging"
PYVER = f"{sys.version_info[0]}.{sys.version_info[1]}"
SITELIB = f"/usr/lib/python{PYVER}/site-packages"
# What users read, installed as %doc (docs/ops.md, docs/sendmail.md... name one another).
USER_DOCS = ("README.md", "architecture.md", "config.md", "ops.md", "sendmail.md", "spool.md",
             "tables.md", "filters.md", "mta.md", "delivery.md", "expansion.md")
# alternatives(8)'s "mta" group: the names it manages (the package's ghosts) and the
# package's files it links them to.
MTA_GHOSTS = ("/usr/sbin/sendmail", "/usr/lib/sendmail", "/usr/bin/mailq", "/usr/bin/newaliases",
              "/usr/sbin/makemap", "/usr/share/man/man8/sendmail.8.gz")
MTA_TARGETS = ("/usr/sbin/sendmail.pysmtpd", "/usr/bin/mailq.pysmtpd", "/usr/bin/newaliases.pysmtpd",
               "/usr/sbin/makemap.pysmtpd", "/usr/share/man/man8/sendmail.pysmtpd.8.gz")
MAN_PAGES = {"smtpd.8": "man8/smtpd.8", "smtpctl.8": "man8/smtpctl.8",
             "smtpd.conf.5": "man5/smtpd.conf.5", "sendmail.8": "man8/sendmail.pysmtpd.8"}


def run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300, **kw)


def build(out: Path, *defines: str) -> tuple[Path, str]:
    args = [a for d in defines for a in ("--define", d)]
    res = run("bash", str(REPO / "contrib/build-rpm.sh"),
              "--macros", str(PACKAGING / "fedora-macros.shim"),
              "--rpmlint-config", str(PACKAGING / "rpmlint-fedora.toml"), *args, str(out),
              env=dict(os.environ, PYTHON=sys.executable))
    assert res.returncode == 0, res.stdout + res.stderr
    rpms = list(out.glob("pysmtpd-*.noarch.rpm"))
    assert len(rpms) == 1, res.stdout
    return rpms[0], res.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """Built as for EL10 (no %fedora): every dependency of pyproject.toml."""
    return build(tmp_path_factory.mktemp("rpms"))


@pytest.fixture(scope="module")
def unpacked(built, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root")
    cpio = subprocess.run(f"rpm2cpio {built[0]} | cpio -idm --quiet", shell=True, cwd=root,
                          capture_output=True, text=True, timeout=60)
    assert cpio.returncode == 0, cpio.stderr
    return root


def query(rpm: Path, *what: str) -> str:
    res = run("rpm", "-qp", *what, str(rpm))
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_file_list(built):
    rpm, _ = built
    files = set(query(rpm, "-l").split())
    for path in ("/etc/smtpd.conf", "/usr/sbin/smtpd", "/usr/sbin/smtpctl",
                 "/usr/lib/systemd/system/smtpd.service", "/usr/lib/systemd/system/smtpd.socket",
                 "/usr/lib/sysusers.d/smtpd.conf", "/usr/lib/tmpfiles.d/smtpd.conf",
                 "/var/spool/smtpd",
                 *(f"/usr/share/doc/pysmtpd/{doc}" for doc in USER_DOCS),
                 f"{SITELIB}/smtpd/main.py", f"{SITELIB}/smtpctl/main.py",
                 f"{SITELIB}/common/messages.py", f"{SITELIB}/pysmtpd-0.1.0.dist-info/METADATA",
                 "/usr/share/bash-completion/completions/smtpctl",
                 "/usr/share/zsh/site-functions/_smtpctl",
                 "/usr/share/fish/vendor_completions.d/smtpctl.fish",
                 *(f"/usr/share/man/{page}.gz" for page in MAN_PAGES.values())):
        assert path in files, path
    assert not any("/tests/" in f for f in files)
    # sendmail, mailq, newaliases and makemap under the names alternatives(8) links to
    # (%post); the names it manages are ghosts, never the package's.  newaliases and
    # makemap have no manual pages (so no ghosts for man1/newaliases.1, man8/makemap.8).
    assert {f for f in files if re.search(r"/(sendmail|mailq|newaliases|makemap)(\.|$)", f)
            and SITELIB not in f and "/doc/" not in f} == set(MTA_TARGETS) | set(MTA_GHOSTS)
    file_flags = dict(line.partition(" ")[::2] for line in
                      query(rpm, "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\\n]").splitlines())
    for ghost in MTA_GHOSTS:
        assert "g" in file_flags[ghost], (ghost, file_flags[ghost])
    for target in MTA_TARGETS:
        assert "g" not in file_flags[target], (target, file_flags[target])
    # Byte-compiled at build time (both optimisation levels), so that root never writes
    # __pycache__ into the installed tree.
    sources = [f for f in files if f.startswith(SITELIB) and f.endswith(".py")]
    assert len(sources) > 40
    tag = f"cpython-{sys.version_info[0]}{sys.version_info[1]}"
    for source in sources:
        directory, name = source.rsplit("/", 1)
        for suffix in (".pyc", ".opt-1.pyc"):
            assert f"{directory}/__pycache__/{name[:-3]}.{tag}{suffix}" in files, (source, suffix)
    # Config is noreplace; the spool directory 0711 root, and nothing inside it.
    dump = {line.split()[0]: line.split() for line in query(rpm, "--dump").splitlines()}
    flags = dict(l.split() for l in query(rpm, "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\\n]").splitlines()
                 if len(l.split()) == 2)
    assert flags["/etc/smtpd.conf"] == "cn"                     # %config(noreplace)
    assert flags["/usr/share/licenses/pysmtpd/LICENSE"] == "l"  # %license
    assert dump["/var/spool/smtpd"][4] == "040711" and dump["/var/spool/smtpd"][5:7] == ["root", "root"]
    assert not any(f.startswith("/var/spool/smtpd/") for f in files)
    assert query(rpm, "--qf", "%{ARCH}").strip() == "noarch"


def test_scriptlets_come_from_the_distribution_macros(built):
    rpm, _ = built
    scripts = query(rpm, "--scripts")
    sections = dict(re.findall(r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)",
                               scripts, re.M | re.S))
    assert set(sections) == {"preinstall", "postinstall", "preuninstall", "postuninstall"}, scripts
    # %sysusers_create_compat: the users of systemd/smtpd.sysusers, as it declares them.
    pre = sections["preinstall"]
    assert "useradd -r -g _smtpd -d /var/empty -s /usr/sbin/nologin" in pre
    assert "useradd -r -g _smtpq -d /var/spool/smtpd -s /usr/sbin/nologin" in pre
    # %systemd_post/preun/postun_with_restart
    helper = "/usr/lib/systemd/systemd-update-helper"
    assert f"{helper} install-system-units smtpd.service smtpd.socket" in sections["postinstall"]
    assert f"{helper} remove-system-units smtpd.service smtpd.socket" in sections["preuninstall"]
    assert f"{helper} mark-restart-system-units smtpd.service" in sections["postuninstall"]
    assert "systemctl" not in scripts
    # alternatives(8): sendmail, /usr/lib/sendmail, mailq, newaliases, makemap and
    # sendmail(8) as one "mta" group; every ghost is a name the group manages
    install = " ".join(sections["postinstall"].replace("\\\n", " ").split())
    assert ("/usr/sbin/alternatives --install /usr/sbin/sendmail mta /usr/sbin/sendmail.pysmtpd 10 "
            "--follower /usr/lib/sendmail mta-sendmail /usr/sbin/sendmail.pysmtpd "
            "--follower /usr/bin/mailq mta-mailq /usr/bin/mailq.pysmtpd "
            "--follower /usr/bin/newaliases mta-newaliases /usr/bin/newaliases.pysmtpd "
            "--follower /usr/sbin/makemap mta-makemap /usr/sbin/makemap.pysmtpd "
            "--follower /usr/share/man/man8/sendmail.8.gz mta-sendmailman "
            "/usr/share/man/man8/sendmail.pysmtpd.8.gz") in install, install
    managed = re.findall(r"--(?:install|follower) (\S+) \S+ (\S+)", install)
    assert sorted(link for link, _target in managed) == sorted(MTA_GHOSTS)
    assert {target for _link, target in managed} == set(MTA_TARGETS)
    assert "/usr/sbin/alternatives --remove mta /usr/sbin/sendmail.pysmtpd" in sections["preuninstall"]
    assert "alternatives --set mta /usr/sbin/sendmail.pysmtpd" in sections["postuninstall"]
    assert query(rpm, "--conflicts").split() == ["opensmtpd"]
    provides = query(rpm, "--provides").split("\n")
    assert "MTA = 0.1.0-1" in provides and "smtpdaemon = 0.1.0-1" in provides, provides


def test_requires_are_generated_from_the_package_metadata(built):
    rpm, _ = built
    requires = {line.strip() for line in query(rpm, "--requires").splitlines()}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        name, _, version = dep.partition(">=")
        version = re.sub(r"(\.0)+$", "", version)               # rpm's generator drops ".0"
        assert f"python{PYVER}dist({name.lower()}) >= {version}" in requires, (dep, requires)
    assert f"python(abi) = {PYVER}" in requires
    assert not [r for r in requires if "pysmtpd" in r and not r.startswith("config(")]


def test_fedora_drops_uvloop_which_it_no_longer_ships(tmp_path):
    rpm, output = build(tmp_path, "fedora 44")
    requires = query(rpm, "--requires")
    assert "uvloop" not in requires and f"python{PYVER}dist(msgspec) >= 0.18" in requires
    assert "0 errors, 0 warnings" in output, output


def test_rpmlint_clean(built):
    _, output = built
    assert "0 errors, 0 warnings" in output, output
    # The package's own filters: only the spool's mode, which is OpenSMTPD's on purpose.
    filters = [l for l in (REPO / "contrib/pysmtpd.rpmlintrc").read_text().splitlines()
               if l.startswith("addFilter")]
    assert filters == ['addFilter("non-standard-dir-perm /var/spool/smtpd 711")']


def test_manual_pages_are_clean_mdoc(built, unpacked):
    for name, page in MAN_PAGES.items():
        source = REPO / "docs/man" / name
        res = run("mandoc", "-T", "lint", "-W", "warning", str(source))
        assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res.stdout + res.stderr
        res = run("groff", "-mandoc", "-ww", "-z", str(source))
        assert res.returncode == 0 and res.stderr == "", res.stderr
        res = subprocess.run(["gzip", "-dc", str(unpacked / "usr/share/man" / f"{page}.gz")],
                             capture_output=True, timeout=30)
        assert res.stdout == source.read_bytes(), name


ENTRY_POINTS = """
import importlib, importlib.metadata, runpy, sys
sys.path.insert(0, SITELIB)
dist = next(importlib.metadata.distributions(path=[SITELIB]))
names = []
for ep in dist.entry_points:
    module = importlib.import_module(ep.module)
    assert module.__file__.startswith(SITELIB), module.__file__
    getattr(module, ep.attr)
    names.append(ep.name)
print(" ".join(sorted(names)))
"""


def _tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


def test_installed_tree_imports_cleanly_and_runs(unpacked, tmp_path):
    """Every entry point of the installed tree, with `python -I` (nothing from the working
    directory or the environment; the dependencies are the venv's), then the two
    installed commands; the tree is left exactly as unpacked (the shipped bytecode is
    used, nothing is written into it)."""
    root = unpacked
    sitelib = str(root / SITELIB.lstrip("/"))
    before = _tree(root)
    res = run(sys.executable, "-I", "-c", f"SITELIB = {sitelib!r}\n" + ENTRY_POINTS, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["mailq", "smtpctl", "smtpd"]

    def command(path: str, *args: str) -> subprocess.CompletedProcess:
        script = root / path.lstrip("/")
        assert script.read_text().startswith("#!/usr/bin/python3 -sP\n")
        launch = (f"import runpy, sys; sys.path.insert(0, {sitelib!r}); "
                  f"sys.argv = [{script.name!r}, *sys.argv[1:]]; runpy.run_path({str(script)!r}, run_name='__main__')")
        return run(sys.executable, "-I", "-c", launch, *args, cwd=tmp_path)

    res = command("/usr/sbin/smtpd", "-h")
    assert res.returncode == 1 and res.stderr.startswith("version: pysmtpd 0.1.0"), res.stderr
    res = command("/usr/sbin/smtpctl", "--socket", str(tmp_path / "none.sock"), "show", "queue")
    assert res.returncode == 1 and "smtpd doesn't seem to be running" in res.stderr, res.stderr
    # sendmail.pysmtpd is smtpctl by another name (argv[0]): a usage error is sendmail's
    assert os.readlink(root / "usr/sbin/sendmail.pysmtpd") == "smtpctl"
    res = run(sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {sitelib!r}); "
              "sys.argv = ['sendmail.pysmtpd', '-k']; from smtpctl.main import main; main()", cwd=tmp_path)
    assert res.returncode == 64 and "usage: sendmail [-tv]" in res.stderr, res.stderr
    # newaliases.pysmtpd and makemap.pysmtpd too: links to smtpctl, which runs as the name says
    for link, program, usage in (("usr/bin/newaliases.pysmtpd", "newaliases.pysmtpd", "usage: newaliases"),
                                 ("usr/sbin/makemap.pysmtpd", "makemap.pysmtpd", "usage: makemap")):
        assert (root / link).resolve() == (root / "usr/sbin/smtpctl").resolve(), link
        res = run(sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {sitelib!r}); "
                  f"sys.argv = [{program!r}, '-h']; from smtpctl.main import main; main()", cwd=tmp_path)
        assert res.returncode != 0 and usage in res.stderr, (program, res.returncode, res.stderr)
    assert _tree(root) == before
    # The default configuration is valid (with /etc/aliases, which it names).
    (root / "etc/aliases").write_text("root: admin\n")
    config = parse_config(root / "etc/smtpd.conf", root=root)
    assert [(l.address, l.port) for l in config.listeners] == [("localhost", 25)]
    assert set(config.actions) == {"local", "relay"} and not config.not_applied


def test_build_tools_are_present():
    """What the build needs on this host (contrib/dev.sh installs them): a failure here
    names the missing tool instead of a failed build."""
    for tool in ("rpmbuild", "rpm2cpio", "cpio", "rpmlint", "mandoc", "groff", "gzip"):
        assert shutil.which(tool), tool
    assert run("/usr/bin/python3", "-c", "import packaging").returncode == 0, "python3-packaging"
    assert run(sys.executable, "-c", "import setuptools").returncode == 0
