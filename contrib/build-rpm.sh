#!/usr/bin/env bash
# Build pysmtpd's noarch RPM from this checkout:
#   contrib/build-rpm.sh [--macros FILE] [--rpmlint-config FILE] [--define 'MACRO VALUE'] OUTDIR
# On Fedora or EL with EPEL: dnf install rpm-build rpmlint python3-devel
# pyproject-rpm-macros systemd-rpm-macros, then `dnf builddep` on the spec (or the
# build stops and names what is missing).  Nothing is downloaded.
#
# --macros FILE: extra rpm macros loaded last.  The tests use it on Debian, whose
# rpm lacks Fedora's macro packages, with tests/packaging/fedora-macros.shim (and
# PYTHON=the interpreter to build with); BuildRequires are then not checked (the
# host's rpm database is empty).  --rpmlint-config FILE: the same for rpmlint's
# configuration (tests/packaging/rpmlint-fedora.toml).  The .rpm is left in OUTDIR;
# rpmlint's verdict (spec and package, with contrib/pysmtpd.rpmlintrc's justified
# filters) is printed when rpmlint is installed.  --define: passed to rpmbuild (the
# tests build as for Fedora 44 with --define 'fedora 44').
set -euo pipefail
MACROS= LINTCONF= DEFINES=()
usage="usage: contrib/build-rpm.sh [--macros FILE] [--rpmlint-config FILE] [--define 'MACRO VALUE'] OUTDIR"
while [ $# -gt 1 ]; do
    case "$1" in
        --macros) MACROS=$(realpath "$2"); shift 2 ;;
        --define) DEFINES+=(--define "$2"); shift 2 ;;
        --rpmlint-config) LINTCONF=$(realpath "$2"); shift 2 ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
done
[ $# -eq 1 ] || { echo "$usage" >&2; exit 2; }
cd "$(dirname "$0")/.."
ROOT=$PWD
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
command -v rpmbuild >/dev/null || { echo "rpmbuild not found (Fedora: dnf install rpm-build)" >&2; exit 1; }

VERSION=$(sed -n 's/^Version: *//p' contrib/pysmtpd.spec)
TOP=$(mktemp -d)
trap 'rm -rf "$TOP"' EXIT
mkdir -p "$TOP"/{SOURCES,SPECS,BUILD,RPMS,SRPMS}
# The source tarball: the checkout as it is (uncommitted changes included), without
# what is local to this machine.
tar -C "$ROOT" --transform "s,^\.,pysmtpd-$VERSION," \
    --exclude=./.git --exclude=./.venv --exclude=./dev-run --exclude='__pycache__' \
    --exclude=./.pytest_cache --exclude='*.egg-info' --exclude=./bench/tools --exclude=./build \
    -czf "$TOP/SOURCES/pysmtpd-$VERSION.tar.gz" .
cp systemd/smtpd.sysusers "$TOP/SOURCES/"
cp contrib/pysmtpd.spec "$TOP/SPECS/"
args=(--define "_topdir $TOP" "${DEFINES[@]}")
if [ -n "$MACROS" ]; then
    args+=(--load "$MACROS" --nodeps --define "__python3 ${PYTHON:-/usr/bin/python3}")
fi
rpmbuild --quiet -bb "${args[@]}" "$TOP/SPECS/pysmtpd.spec"
cp "$TOP"/RPMS/noarch/pysmtpd-"$VERSION"-*.noarch.rpm "$OUT/"
ls "$OUT"/pysmtpd-"$VERSION"-*.noarch.rpm
if command -v rpmlint >/dev/null; then
    rpmlint ${LINTCONF:+-c "$LINTCONF"} -r contrib/pysmtpd.rpmlintrc contrib/pysmtpd.spec "$OUT"/pysmtpd-"$VERSION"-*.noarch.rpm || true
fi
