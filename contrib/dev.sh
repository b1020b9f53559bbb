#!/usr/bin/env bash
# pysmtpd developer entry point: sets up a virtualenv on a Python >= 3.12, then
#   contrib/dev.sh run    runs the daemon in the foreground on a working default
#                         config (127.0.0.1:2525, unprivileged, everything under ./dev-run)
#   contrib/dev.sh test   runs the whole test suite (installs the test tools it needs), then
#                         the unit tests again on the newest Python found (in .venv-3.X)
#   contrib/dev.sh test ARGS...         pytest ARGS on the main virtualenv only
#   contrib/dev.sh test-newest ARGS...  pytest ARGS on the newest Python only
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv

python_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }

python_candidates() {
    local c
    for c in "${PYTHON:-}" python3.13 python3.12 python3; do [ -n "$c" ] && echo "$c"; done
    if command -v pyenv >/dev/null 2>&1; then
        for c in "$(pyenv root)"/versions/3.1[2-9]*/bin/python3; do echo "$c"; done
    fi
    for c in /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9] "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3; do
        echo "$c"
    done
}

find_python() {
    local c
    while read -r c; do
        if command -v "$c" >/dev/null 2>&1 && python_ok "$c"; then command -v "$c"; return 0; fi
    done < <(python_candidates)
    echo "pysmtpd needs Python >= 3.12 (3.11's stdlib has its own smtpd module)." >&2
    echo "Install one (python3.12 from your distribution, pyenv, or python.org) or set PYTHON=/path/to/python3.12." >&2
    return 1
}

python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

find_newest_python() {
    # The newest Python >= 3.12 among the same candidates (CI: pyenv's 3.13).
    local c version best="" best_version=""
    while read -r c; do
        command -v "$c" >/dev/null 2>&1 && python_ok "$c" || continue
        version=$(python_version "$c")
        if [ -z "$best" ] || [ "$(printf '%s\n%s\n' "$best_version" "$version" | sort -V | tail -1)" != "$best_version" ]; then
            best=$(command -v "$c"); best_version=$version
        fi
    done < <(python_candidates)
    [ -n "$best" ] && echo "$best"
}

setup_venv() {
    # setup_venv DIR PYTHON: a virtualenv in DIR with pysmtpd installed (editable) and pytest.
    local venv=$1 python=$2
    if [ ! -x "$venv/bin/python" ] || [ "$(python_version "$venv/bin/python")" != "$(python_version "$python")" ]; then
        rm -rf "$venv"
        "$python" -m venv "$venv"
    fi
    local stamp=$venv/.pysmtpd-installed
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
        "$venv/bin/python" -m pip install -q -e ".[test]"
        touch "$stamp"
    fi
    # The RPM's %pyproject_wheel builds without isolation, with the build backend of
    # the interpreter that builds (tests/packaging/test_rpm.py): this venv's.
    "$venv/bin/python" -c 'import setuptools' 2>/dev/null || "$venv/bin/python" -m pip install -q "setuptools>=68"
}

setup_main_venv() {
    if [ ! -x "$VENV/bin/python" ] || ! python_ok "$VENV/bin/python"; then
        setup_venv "$VENV" "$(find_python)"
    else
        setup_venv "$VENV" "$VENV/bin/python"
    fi
}

newest_venv() {
    # Prints the virtualenv of the newest Python, made if needed; nothing when the newest
    # is the main virtualenv's version (the suite has just run on it).
    local python version
    python=$(find_newest_python) || return 0
    version=$(python_version "$python")
    [ "$version" = "$(python_version "$VENV/bin/python")" ] && return 0
    setup_venv "$ROOT/.venv-$version" "$python" >&2
    echo "$ROOT/.venv-$version"
}

ensure_privsep_users() {
    # Started as root the daemon separates privileges: its children run as _smtpd and
    # _smtpq (the documented useradd step of README.md), created here when missing.
    local user home
    for user in _smtpd _smtpq; do
        id "$user" >/dev/null 2>&1 && continue
        home=/var/empty; [ "$user" = _smtpq ] && home=/var/spool/smtpd
        useradd -r -M -d "$home" -s /usr/sbin/nologin "$user"
    done
}

dev_config() {
    local dir=$ROOT/dev-run
    mkdir -p "$dir/home/alice" "$dir/home/bob" "$dir/spool"
    chmod 700 "$dir"
    local ids; ids="$(id -u):$(id -g)"
    if [ "$(id -u)" = 0 ]; then
        # As root, mail is delivered as the mailbox's owner, never as root (refused):
        # the test users map to nobody, whose homes must be reachable.
        ensure_privsep_users
        ids="$(id -u nobody):$(id -g nobody)"
        chmod 711 "$dir"
        chown "$ids" "$dir/home/alice" "$dir/home/bob"
    fi
    if [ ! -f "$dir/smtpd.conf" ]; then
        cat > "$dir/smtpd.conf" <<CONF
# pysmtpd development configuration, made by contrib/dev.sh (edit freely).
# Mail for alice@example.test and bob@example.test goes to dev-run/home/<user>/Maildir;
# other mail from this machine is relayed to a smarthost on 127.0.0.1:2526.
listen on 127.0.0.1 port 2525 hostname mail.example.test

table users { alice = "$ids:$dir/home/alice", bob = "$ids:$dir/home/bob" }

action "local" maildir "~/Maildir" userbase <users>
action "outbound" relay host "smtp://127.0.0.1:2526"

match from any for domain "example.test" action "local"
match from local for any action "outbound"
CONF
    fi
}

install_test_tools() {
    # swaks is one of the real clients the end-to-end tests talk with; rpmbuild, rpmlint,
    # rpm2cpio/cpio build and check the RPM; systemd-analyze, systemd-sysusers and
    # systemd-tmpfiles check the units; setpriv (util-linux) confines the daemon as the unit does;
    # zsh and fish run smtpctl's completion scripts; mandoc and groff check the manual
    # pages; rpm's Python dependency generator needs the system Python's packaging module;
    # swaks needs Net::SSLeay and IO::Socket::SSL for --tls.  s-nail is the mail client
    # tests/e2e/test_sendmail.py sends through our sendmail with (no MTA recommended).
    # The filter tests run their filters with the system's python3 (as _smtpd when root).
    # The fidelity oracle (tests/oracle/opensmtpd.py) makes its CA with openssl, runs Debian's
    # OpenSMTPD unpacked (never installed) in a mount namespace (unshare), which needs the
    # package's libraries: libevent and libdb are the ones a minimal Debian lacks.
    local missing=() tool pkg lib
    for tool in swaks:swaks rpmbuild:rpm rpm2cpio:rpm rpmlint:rpmlint cpio:cpio \
                systemd-analyze:systemd systemd-sysusers:systemd setpriv:util-linux \
                zsh:zsh fish:fish mandoc:mandoc groff:groff-base \
                unshare:util-linux openssl:openssl python3:python3 s-nail:s-nail; do
        command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
    done
    if [ -x /usr/bin/python3 ] && ! /usr/bin/python3 -c 'import packaging' 2>/dev/null; then
        missing+=(python3-packaging)
    fi
    if ! perl -MNet::SSLeay -MIO::Socket::SSL -e 1 2>/dev/null; then
        missing+=(libnet-ssleay-perl libio-socket-ssl-perl)
    fi
    # The filter tests (tests/filter_programs.py) compile a filter against OpenSMTPD's filter
    # library (gcc, libc6-dev: gcc only recommends it, libopensmtpd-dev) and run Debian's
    # filter-dkimsign (libopensmtpd0, libssl3).
    command -v cc >/dev/null 2>&1 || missing+=(gcc)
    [ -f /usr/include/stdio.h ] || missing+=(libc6-dev)
    [ -f /usr/include/opensmtpd.h ] || missing+=(libopensmtpd-dev)
    for lib in libopensmtpd.so.0:libopensmtpd0 libssl.so.3:libssl3; do
        ldconfig -p 2>/dev/null | grep -q "${lib%%:*}" || missing+=("${lib#*:}")
    done
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then   # the oracle runs as root only
        for lib in libevent-2.1.so.7:libevent-2.1-7 libdb-5.3.so:libdb5.3; do
            ldconfig -p 2>/dev/null | grep -q "${lib%%:*}" || missing+=("${lib#*:}")
        done
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        # --no-install-recommends: rpmlint would pull spell checkers, systemd a service stack.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
    else
        echo "missing test tools; install them: apt-get install $(printf '%s ' "${missing[@]}" | tr ' ' '\n' | sort -u | tr '\n' ' ')" >&2
        exit 1
    fi
}

case "${1:-}" in
    run)
        setup_main_venv
        dev_config
        echo "pysmtpd on 127.0.0.1:2525; try: $VENV/bin/smtpctl --socket dev-run/smtpd.sock show status" >&2
        exec "$VENV/bin/smtpd" -d -f dev-run/smtpd.conf --spool dev-run/spool --socket dev-run/smtpd.sock
        ;;
    test)
        shift
        install_test_tools
        setup_main_venv
        if [ $# -gt 0 ]; then
            exec "$VENV/bin/python" -m pytest -q "$@"
        fi
        status=0
        "$VENV/bin/python" -m pytest -q || status=$?
        newest=$(newest_venv)
        if [ -n "$newest" ]; then
            echo "unit tests on the newest Python: $("$newest/bin/python" -V)" >&2
            "$newest/bin/python" -m pytest -q tests/unit || status=$?
        fi
        exit $status
        ;;
    test-newest)
        shift
        install_test_tools
        setup_main_venv
        newest=$(newest_venv)
        [ -n "$newest" ] || newest=$VENV
        exec "$newest/bin/python" -m pytest -q "$@"
        ;;
    *)
        echo "usage: contrib/dev.sh run|test|test-newest [pytest args]" >&2
        exit 2
        ;;
esac
