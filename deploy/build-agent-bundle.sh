#!/bin/sh
# Build the offline install bundle for agent hosts (terminals, door boxes) on a connected build machine.
#
#   build-agent-bundle.sh [--out DIR] [--release NAME] [--source DIR] [--python PY] [--reuse-wheels BUNDLE]
#
# Writes DIR/sekisho-agent-RELEASE/ and DIR/sekisho-agent-RELEASE.tar.gz holding: the project wheel and a
# wheel of every package of requirements/agent.txt (hash-checked downloads; source-only packages built here
# from their hash-checked archives), requirements.txt pinning the hash of each of those wheel files, the
# original lock (agent.lock.txt), install-agent.sh, the systemd units, VERSION, wheelhouse.json and
# SHA256SUMS. Copy the tarball to the agent host (USB medium, internal file share) and run
# `sh sekisho-agent-RELEASE/install-agent.sh` there: it needs python3 and python3-venv, no network.
#
# Build on the agent hosts' Debian release, CPU architecture and Python minor version (the wheels of
# compiled packages are made for this machine). RELEASE defaults to the project version; give another for a
# rebuild of the same version (e.g. 0.1.0-2). --reuse-wheels takes the dependency wheels of an earlier
# bundle of the same lock instead of fetching and building them again (they are checked again all the same).
# --python: a Python with the dev lock installed (pip, the locked setuptools); default: the checkout's .venv.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
CHECKOUT=$(dirname "$HERE")
OUT=$CHECKOUT/var/bundles
RELEASE=""
SOURCE=$CHECKOUT
PYTHON=$CHECKOUT/.venv/bin/python
REUSE=""

die() { echo "build-agent-bundle: $*" >&2; exit 1; }
say() { echo "build-agent-bundle: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift ;;
        --release) RELEASE=$2; shift ;;
        --source) SOURCE=$2; shift ;;
        --python) PYTHON=$2; shift ;;
        --reuse-wheels) REUSE=$2; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
    shift
done

[ -x "$PYTHON" ] || die "$PYTHON not found (run ./dev.sh test once, or give --python)"
[ -f "$SOURCE/pyproject.toml" ] || die "$SOURCE is not a sekisho checkout"
"$PYTHON" "$CHECKOUT/requirements/lock.py" check || die "the locks do not match pyproject.toml"
VERSION=$("$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$SOURCE/pyproject.toml")
RELEASE=${RELEASE:-$VERSION}
case "$RELEASE" in
    ""|.*|*[!A-Za-z0-9._+-]*) die "release name $RELEASE: use letters, digits and . _ + - only" ;;
esac

NAME=sekisho-agent-$RELEASE
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUNDLE=$OUT/$NAME
[ ! -e "$BUNDLE" ] || die "$BUNDLE exists already (remove it, or give another --release)"
STAGE=$OUT/.$NAME.tmp
rm -rf "$STAGE"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/wheels" "$STAGE/systemd"

if [ -n "$REUSE" ]; then
    [ -f "$REUSE/wheelhouse.json" ] || die "$REUSE is not a bundle"
    for wheel in "$REUSE"/wheels/*.whl; do
        case "$(basename "$wheel")" in sekisho-*) ;; *) cp "$wheel" "$STAGE/wheels/" ;; esac
    done
    say "dependency wheels taken from $REUSE"
else
    say "fetching and building the wheels of requirements/agent.txt"
    "$PYTHON" "$CHECKOUT/requirements/wheelhouse.py" deps "$STAGE/wheels" agent
fi
say "building the sekisho wheel from $SOURCE"
"$PYTHON" "$CHECKOUT/requirements/wheelhouse.py" project "$SOURCE" "$STAGE/wheels" >/dev/null
"$PYTHON" "$CHECKOUT/requirements/wheelhouse.py" lock "$STAGE/wheels" agent || die "the wheels do not match the lock"

cp "$CHECKOUT/requirements/agent.txt" "$STAGE/agent.lock.txt"
cp "$HERE/install-agent.sh" "$STAGE/install-agent.sh"
chmod 0755 "$STAGE/install-agent.sh"
cp "$HERE"/systemd/*.service "$HERE/systemd/sekisho.sysusers.conf" "$STAGE/systemd/"
echo "$RELEASE" >"$STAGE/VERSION"
(cd "$STAGE" && find . -type f ! -name SHA256SUMS | LC_ALL=C sort | sed 's|^\./||' | xargs sha256sum >SHA256SUMS)

mv "$STAGE" "$BUNDLE"
trap - EXIT
tar -C "$OUT" -czf "$OUT/$NAME.tar.gz.tmp" "$NAME"
mv -f "$OUT/$NAME.tar.gz.tmp" "$OUT/$NAME.tar.gz"
say "bundle $BUNDLE ($(ls "$BUNDLE/wheels" | wc -l) wheels) and $OUT/$NAME.tar.gz"
