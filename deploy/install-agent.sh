#!/bin/sh
# Install, upgrade or roll back the sekisho agent on a terminal or door box, without network access.
#
#   install-agent.sh [--bundle DIR] [--units terminal|doors] [--health-check CMD] [--keep N]
#   install-agent.sh --rollback          # back to the release that was current before the last switch
#   install-agent.sh --status            # the installed releases, which one is current and which previous
#
# Run from an unpacked bundle (deploy/build-agent-bundle.sh makes one; --bundle defaults to this script's
# folder). Each release gets its own venv in /opt/sekisho/releases/RELEASE/venv, installed from the bundle's
# wheels only (pip --no-index --require-hashes); /opt/sekisho/current is a symlink the units run through,
# switched in one rename. An upgrade installs the new release beside the running one, checks it, switches,
# then checks it again: if the new release does not start, `current` goes back and the old one runs again.
#   - before the switch: the new venv's sekisho-agent must run and report the bundle's version;
#   - after the switch: --health-check CMD if given (run with SEKISHO_RELEASE, SEKISHO_VENV, SEKISHO_ROOT set),
#     else, on a host running systemd, each running sekisho agent unit is restarted and must become active
#     (Type=notify: the agent said READY=1).
# --units ROLE installs the systemd units (and the sysusers file) and enables the role's unit.
# Options for tests and staging: --root DIR (install under DIR, like DESTDIR: no users are created and
# systemctl is never called unless DIR is /), --python PY (default python3).
set -eu

ROOT=/
PYTHON=python3
BUNDLE=$(cd "$(dirname "$0")" && pwd)
ACTION=install
UNITS=""
HEALTH_CHECK=""
KEEP=3

die() { echo "install-agent: $*" >&2; exit 1; }
say() { echo "install-agent: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) BUNDLE=$2; shift ;;
        --root) ROOT=$2; shift ;;
        --python) PYTHON=$2; shift ;;
        --units) UNITS=$2; shift ;;
        --health-check) HEALTH_CHECK=$2; shift ;;
        --keep) KEEP=$2; shift ;;
        --rollback) ACTION=rollback ;;
        --status) ACTION=status ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
    shift
done

case "$UNITS" in ""|terminal|doors) ;; *) die "--units is terminal or doors" ;; esac
case "$KEEP" in ""|*[!0-9]*) die "--keep takes a number" ;; esac
[ "$KEEP" -ge 2 ] || die "--keep must be at least 2 (current and previous)"
ROOT=$(cd "$ROOT" 2>/dev/null && pwd) || die "root $ROOT does not exist"
[ "$ROOT" = / ] && PREFIX="" || PREFIX=$ROOT
BASE=$PREFIX/opt/sekisho
RELEASES=$BASE/releases
CURRENT=$BASE/current
PREVIOUS=$BASE/previous
UNIT_DIR=$PREFIX/etc/systemd/system

real_systemd() { [ -z "$PREFIX" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

# The release a symlink names (releases/NAME -> NAME), or nothing.
release_of() {
    [ -L "$1" ] || return 0
    basename "$(readlink "$1")"
}

# Point symlink $1 at releases/$2 in one rename: a reader sees the old target or the new one, never none.
point() {
    ln -s "releases/$2" "$1.sekisho-tmp"
    mv -T "$1.sekisho-tmp" "$1"
}

# The agent units running now: an upgrade restarts them; a first install (agent.toml not there yet) none.
agent_units() {
    for unit in sekisho-terminal.service sekisho-doors.service; do
        if systemctl is-active --quiet "$unit" 2>/dev/null; then echo "$unit"; fi
    done
}

# Restart the running agent units on the release `current` names; fail if one does not become active.
restart_units() {
    real_systemd || return 0
    for unit in $(agent_units); do
        if ! systemctl restart "$unit"; then
            say "$unit did not start"
            return 1
        fi
        systemctl is-active --quiet "$unit" || { say "$unit is not active"; return 1; }
        say "$unit restarted and active"
    done
}

health_check() {
    release=$1
    if [ -n "$HEALTH_CHECK" ]; then
        SEKISHO_RELEASE=$release SEKISHO_VENV=$CURRENT/venv SEKISHO_ROOT=$ROOT sh -c "$HEALTH_CHECK" || return 1
        say "health check passed: $HEALTH_CHECK"
        return 0
    fi
    restart_units
}

# The new venv must run the agent's entry point and report the version the bundle was built from.
probe_release() {
    venv=$1
    want=$2
    "$venv/bin/sekisho-agent" --help >/dev/null 2>&1 || { say "sekisho-agent --help fails in the new release"; return 1; }
    # -I: isolated, so neither the working directory nor PYTHONPATH can lend a sekisho that is not the venv's.
    have=$("$venv/bin/python" -I -c 'import importlib.metadata as m; import sekisho.agents.runtime.agent, sekisho.agents.login.run, sekisho.agents.doors.run; print(m.version("sekisho"))' 2>/dev/null) \
        || { say "the new release cannot import the agent"; return 1; }
    [ "$have" = "$want" ] || { say "the new release reports version $have, the bundle says $want"; return 1; }
}

create_users() {
    [ -z "$PREFIX" ] || return 0
    if command -v systemd-sysusers >/dev/null; then
        systemd-sysusers "$UNIT_SRC/sekisho.sysusers.conf"
    elif ! getent passwd sekisho-agent >/dev/null; then
        useradd --system --home-dir /var/lib/sekisho --no-create-home --shell /usr/sbin/nologin \
            --user-group --groups dialout sekisho-agent
    fi
}

install_units() {
    [ -n "$UNITS" ] || return 0
    UNIT_SRC=$BUNDLE/systemd
    mkdir -p "$UNIT_DIR" "$PREFIX/usr/lib/sysusers.d"
    for unit in "$UNIT_SRC"/*.service; do
        target=$UNIT_DIR/$(basename "$unit")
        if [ -f "$target" ] && cmp -s "$unit" "$target"; then continue; fi
        cp "$unit" "$target.sekisho-tmp"
        chmod 0644 "$target.sekisho-tmp"
        mv -f "$target.sekisho-tmp" "$target"
        say "installed $target"
    done
    cp "$UNIT_SRC/sekisho.sysusers.conf" "$PREFIX/usr/lib/sysusers.d/sekisho.conf"
    create_users
    if real_systemd; then
        systemctl daemon-reload
        systemctl enable "sekisho-$UNITS.service"
        say "enabled sekisho-$UNITS.service (start it once agent.toml is in place: systemctl start sekisho-$UNITS)"
    fi
}

prune() {
    keep_current=$(release_of "$CURRENT")
    keep_previous=$(release_of "$PREVIOUS")
    # Newest first by install time; current and previous are never removed.
    ls -1t "$RELEASES" 2>/dev/null | tail -n "+$((KEEP + 1))" | while read -r old; do
        [ "$old" = "$keep_current" ] || [ "$old" = "$keep_previous" ] || {
            rm -rf "${RELEASES:?}/$old"
            say "removed old release $old"
        }
    done
}

install_release() {
    [ -f "$BUNDLE/VERSION" ] && [ -f "$BUNDLE/SHA256SUMS" ] || die "$BUNDLE is not a sekisho agent bundle"
    # A bundle damaged on its way (or edited) is refused before anything is installed.
    (cd "$BUNDLE" && sha256sum --check --quiet --strict SHA256SUMS) || die "$BUNDLE/SHA256SUMS does not match its files"
    release=$(cat "$BUNDLE/VERSION")
    case "$release" in ""|.*|*[!A-Za-z0-9._+-]*) die "bad release name in $BUNDLE/VERSION" ;; esac
    project=$(sed -n 's/^sekisho==\([^ ]*\) .*/\1/p' "$BUNDLE/requirements.txt")
    tag=$(sed -n 's/.*"python_tag": "\([^"]*\)".*/\1/p' "$BUNDLE/wheelhouse.json")
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found (Debian: apt-get install python3 python3-venv)"
    have_tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')
    [ "$have_tag" = "$tag" ] || die "the bundle was built for $tag, this host's $PYTHON is $have_tag"

    install_units
    target=$RELEASES/$release
    old=$(release_of "$CURRENT")
    if [ -f "$target/.complete" ] && cmp -s "$BUNDLE/SHA256SUMS" "$target/SHA256SUMS"; then
        if [ "$old" = "$release" ]; then
            say "release $release is installed and current; nothing to do"
            return 0
        fi
        say "release $release is installed already; switching to it"
    else
        [ ! -e "$target" ] || [ "$old" != "$release" ] || die "the current release $release differs from this bundle of the same name; build it with another --release"
        rm -rf "$target"
        mkdir -p "$RELEASES"
        # The venv is made where it stays: a venv's scripts name its path, so it cannot be moved afterwards.
        "$PYTHON" -m venv "$target/venv" || { rm -rf "$target"; die "python3 -m venv failed (Debian: apt-get install python3-venv)"; }
        # The index is never asked (nor any pip.conf of the host): the bundle's wheels, with its hashes, only.
        if ! PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 "$target/venv/bin/python" -m pip install --quiet \
            --disable-pip-version-check --no-index --find-links "$BUNDLE/wheels" --only-binary :all: \
            --require-hashes --no-deps -r "$BUNDLE/requirements.txt"; then
            rm -rf "$target"
            die "installing release $release from $BUNDLE failed; current stays ${old:-none}"
        fi
        if ! probe_release "$target/venv" "$project"; then
            rm -rf "$target"
            die "release $release refused before the switch; current stays ${old:-none}"
        fi
        cp "$BUNDLE/source-builds.json" "$target/venv/sekisho-source-builds.json" 2>/dev/null || true
        cp "$BUNDLE/VERSION" "$BUNDLE/SHA256SUMS" "$BUNDLE/requirements.txt" "$BUNDLE/wheelhouse.json" "$target/"
        touch "$target/.complete"
        say "installed release $release in $target"
    fi

    point "$CURRENT" "$release"
    if [ -n "$old" ] && [ "$old" != "$release" ]; then point "$PREVIOUS" "$old"; fi
    say "current is now $release${old:+ (previous: $old)}"
    if ! health_check "$release"; then
        if [ -n "$old" ] && [ "$old" != "$release" ]; then
            point "$CURRENT" "$old"
            point "$PREVIOUS" "$release"
            restart_units || true
            die "release $release failed its health check: rolled back to $old"
        fi
        die "release $release failed its health check and there is no earlier release to go back to"
    fi
    prune
}

rollback() {
    to=$(release_of "$PREVIOUS")
    from=$(release_of "$CURRENT")
    [ -n "$to" ] || die "no previous release to roll back to"
    [ -f "$RELEASES/$to/.complete" ] || die "previous release $to is not complete in $RELEASES"
    point "$CURRENT" "$to"
    [ -z "$from" ] || point "$PREVIOUS" "$from"
    say "rolled back: current is now $to${from:+ (previous: $from)}"
    restart_units || die "release $to did not start after the rollback"
}

status() {
    say "releases in $RELEASES:"
    current=$(release_of "$CURRENT")
    previous=$(release_of "$PREVIOUS")
    for release in $(ls -1 "$RELEASES" 2>/dev/null); do
        mark=""
        [ "$release" != "$current" ] || mark=" (current)"
        [ "$release" != "$previous" ] || mark=" (previous)"
        [ -f "$RELEASES/$release/.complete" ] || mark="$mark (incomplete)"
        echo "  $release$mark"
    done
}

case "$ACTION" in
    install) install_release ;;
    rollback) rollback ;;
    status) status ;;
esac
