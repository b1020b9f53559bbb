#!/usr/bin/env bash
# Build pysmtpd's noarch RPM from this checkout: contrib/build-rpm.sh OUTDIR
# Needs rpmbuild (Debian: apt-get install rpm; Fedora: dnf install rpm-build) and
# nothing from the network.  The .rpm is left in OUTDIR; rpmlint's verdict is printed
# when rpmlint is installed (contrib/pysmtpd.rpmlintrc holds the justified filters).
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: contrib/build-rpm.sh OUTDIR" >&2; exit 2; }
cd "$(dirname "$0")/.."
ROOT=$PWD
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
command -v rpmbuild >/dev/null || { echo "rpmbuild not found (Debian: apt-get install rpm)" >&2; exit 1; }

VERSION=$(sed -n 's/^Version: *//p' contrib/pysmtpd.spec)
TOP=$(mktemp -d)
trap 'rm -rf "$TOP"' EXIT
mkdir -p "$TOP"/{SOURCES,SPECS,BUILD,RPMS,SRPMS}
# The source tarball: the checkout as it is (uncommitted changes included), without
# what is local to this machine.
tar -C "$ROOT" --transform "s,^\.,pysmtpd-$VERSION," \
    --exclude=./.git --exclude=./.venv --exclude=./dev-run --exclude='__pycache__' \
    --exclude=./.pytest_cache --exclude='*.egg-info' --exclude=./bench/tools \
    -czf "$TOP/SOURCES/pysmtpd-$VERSION.tar.gz" .
cp contrib/pysmtpd.spec "$TOP/SPECS/"
rpmbuild --quiet -bb --define "_topdir $TOP" "$TOP/SPECS/pysmtpd.spec"
cp "$TOP"/RPMS/noarch/pysmtpd-"$VERSION"-*.noarch.rpm "$OUT/"
ls "$OUT"/pysmtpd-"$VERSION"-*.noarch.rpm
if command -v rpmlint >/dev/null; then
    rpmlint -r contrib/pysmtpd.rpmlintrc contrib/pysmtpd.spec "$OUT"/pysmtpd-"$VERSION"-*.noarch.rpm || true
fi
