#!/bin/sh
# Fetch Postfix without installing it: `apt-get download postfix` + `dpkg -x` into
# DIR (default bench/.postfix).  Only the Debian package registry is used.  Prints DIR
# on success.  The benchmarks use its smtp-source and smtp-sink, and
# bench/bench_compare.py runs the whole tree as a private instance
# (bench/postfix_instance.py: master, daemons, master.cf.dist, postfix-files).
#
#   LD_LIBRARY_PATH=DIR/usr/lib/postfix DIR/usr/sbin/smtp-source -s 10 -m 2000 -l 5120 ...
#   LD_LIBRARY_PATH=DIR/usr/lib/postfix DIR/usr/sbin/smtp-sink -c 127.0.0.1:PORT 100
set -eu
DIR=${1:-$(dirname "$0")/.postfix}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
if [ -x "$DIR/usr/sbin/smtp-source" ] && [ -x "$DIR/usr/sbin/smtp-sink" ]; then
    echo "$DIR"
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || { echo "get-postfix-tools: apt-get not found" >&2; exit 1; }
command -v dpkg >/dev/null 2>&1 || { echo "get-postfix-tools: dpkg not found" >&2; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT INT TERM
# apt-get download writes into the current directory; _apt must be able to write it.
chmod 0777 "$WORK"
if ! (cd "$WORK" && apt-get download postfix >/dev/null 2>"$WORK/err"); then
    # The package lists may be missing or stale: refresh them once and retry.
    if [ "$(id -u)" = 0 ]; then
        apt-get update >/dev/null 2>&1 || true
    fi
    (cd "$WORK" && apt-get download postfix >/dev/null 2>"$WORK/err") || {
        cat "$WORK/err" >&2
        echo "get-postfix-tools: apt-get download postfix failed" >&2
        exit 1
    }
fi
for deb in "$WORK"/postfix_*.deb; do
    dpkg -x "$deb" "$DIR"
done
for f in usr/sbin/smtp-source usr/sbin/smtp-sink usr/lib/postfix/sbin/master; do
    [ -x "$DIR/$f" ] || { echo "get-postfix-tools: $f not in the package" >&2; exit 1; }
done
echo "$DIR"
