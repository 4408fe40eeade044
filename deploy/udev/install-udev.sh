#!/bin/sh
# Install (or remove) the sekisho udev rule that makes USB disks read-only as they appear (docs/usb.md).
#
#   install-udev.sh                install the helper and the rule, check the rule, reload udev
#   install-udev.sh --uninstall    remove the rule and the helper, reload udev
#   install-udev.sh --rollback     restore the newest backup of a rule file that install replaced
#
# Environment overrides (tests, staging): RULES_DIR (default /etc/udev/rules.d), SBIN_DIR (default
# /usr/local/sbin), GRANT_DIR (default /run/sekisho/usb-rw: must be the agent's, which is fixed).
# udev is reloaded only for the real RULES_DIR, and only when udevd is running.
set -eu

RULES_DIR=${RULES_DIR:-/etc/udev/rules.d}
SBIN_DIR=${SBIN_DIR:-/usr/local/sbin}
GRANT_DIR=${GRANT_DIR:-/run/sekisho/usb-rw}
HERE=$(cd "$(dirname "$0")" && pwd)
RULE_NAME=90-sekisho-usb-ro.rules
TARGET="$RULES_DIR/$RULE_NAME"
HELPER="$SBIN_DIR/sekisho-usb-ro"
# udev reads only files ending in .rules: the backups next to the rule are never loaded.
BACKUP_PREFIX="$TARGET.sekisho-backup."
ACTION=install

die() { echo "install-udev: $*" >&2; exit 1; }
say() { echo "install-udev: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --uninstall) ACTION=uninstall ;;
        --rollback) ACTION=rollback ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
    shift
done

case "$SBIN_DIR$GRANT_DIR" in
    *"|"*|*"&"*|*"\\"*) die "SBIN_DIR and GRANT_DIR may not contain | & or \\" ;;
esac
case "$SBIN_DIR$GRANT_DIR" in
    *[[:space:]]*) die "SBIN_DIR and GRANT_DIR may not contain blanks (udev splits RUN at blanks)" ;;
esac

real_udev() { [ "$RULES_DIR" = /etc/udev/rules.d ]; }

render_rule() {
    sed -e "s|/usr/local/sbin/sekisho-usb-ro|$HELPER|" "$HERE/$RULE_NAME"
}

render_helper() {
    sed -e "s|@GRANT_DIR@|$GRANT_DIR|" "$HERE/sekisho-usb-ro"
}

backup() {
    stamp=$(date +%Y%m%d%H%M%S)
    saved="$BACKUP_PREFIX$stamp"
    [ ! -e "$saved" ] || saved="$saved.$$"
    cp -p "$TARGET" "$saved"
    say "backed up $TARGET to $saved"
}

reload_udev() {
    if ! real_udev; then
        say "udev not reloaded: RULES_DIR=$RULES_DIR is not udev's"
        return 0
    fi
    if command -v udevadm >/dev/null && udevadm control --ping >/dev/null 2>&1; then
        udevadm control --reload
        say "udev reloaded: the rule applies to USB disks plugged from now on"
    else
        say "udevd is not running: the rule applies once it starts"
    fi
}

# A syntax check with udev's own parser where it has one (systemd >= 254: udevadm verify). Debian 12's
# udev (252) has none; the project's tests check the rule there with udevadm test under umockdev.
verify() {
    if command -v udevadm >/dev/null && udevadm verify --help >/dev/null 2>&1; then
        if udevadm verify --resolve-names=never "$TARGET"; then
            say "verified: udevadm verify accepts $TARGET"
            return 0
        fi
        say "udevadm verify refuses $TARGET"
        return 1
    fi
    say "verification skipped: this udevadm has no verify (systemd < 254)"
    render_rule | cmp -s - "$TARGET" || { say "$TARGET is not the rule this script wrote"; return 1; }
    return 0
}

install_rule() {
    [ -f "$HERE/$RULE_NAME" ] && [ -f "$HERE/sekisho-usb-ro" ] || die "run from a checkout: $HERE lacks the rule or helper"
    if real_udev; then
        command -v udevadm >/dev/null || die "udev is not installed (apt-get install udev)"
        [ -x /sbin/blockdev ] || die "/sbin/blockdev not found (util-linux)"
    fi
    [ -d "$RULES_DIR" ] || die "$RULES_DIR does not exist"

    # The helper first: the rule must never name a program that is not there.
    mkdir -p "$SBIN_DIR"
    render_helper >"$HELPER.sekisho-tmp"
    chmod 0755 "$HELPER.sekisho-tmp"
    mv -f "$HELPER.sekisho-tmp" "$HELPER"
    say "installed $HELPER (grants read from $GRANT_DIR)"

    render_rule >"$TARGET.sekisho-tmp"
    if [ -f "$TARGET" ] && cmp -s "$TARGET.sekisho-tmp" "$TARGET"; then
        rm -f "$TARGET.sekisho-tmp"
        say "$TARGET is already installed; nothing to do"
        return 0
    fi
    replaced=no
    if [ -e "$TARGET" ]; then
        backup
        replaced=yes
    fi
    chmod 0644 "$TARGET.sekisho-tmp"
    mv -f "$TARGET.sekisho-tmp" "$TARGET"
    say "installed $TARGET"

    if ! verify; then
        say "verification failed: rolling back"
        if [ "$replaced" = yes ]; then
            rollback
        else
            rm -f "$TARGET"
            say "removed $TARGET"
        fi
        exit 1
    fi
    reload_udev
}

uninstall_rule() {
    if [ -e "$TARGET" ]; then
        # A rule someone edited after installing is kept as a backup, not thrown away.
        if ! render_rule | cmp -s - "$TARGET"; then
            backup
        fi
        rm -f "$TARGET"
        say "removed $TARGET"
    else
        say "$TARGET is not installed"
    fi
    reload_udev
    # The rule is gone (and udev reloaded) before the helper it runs.
    if [ -e "$HELPER" ]; then
        rm -f "$HELPER"
        say "removed $HELPER"
    fi
    say "USB disks plugged from now on are no longer read-only from the start (the agent still sets read-only loans)"
}

rollback() {
    latest=$(ls -1 "$BACKUP_PREFIX"* 2>/dev/null | sort | tail -n 1 || true)
    [ -n "$latest" ] || die "no backup $BACKUP_PREFIX* to restore"
    cp -p "$latest" "$TARGET.sekisho-tmp"
    mv -f "$TARGET.sekisho-tmp" "$TARGET"
    say "restored $TARGET from $latest"
}

case "$ACTION" in
    install) install_rule ;;
    uninstall) uninstall_rule ;;
    rollback) rollback; reload_udev ;;
esac
