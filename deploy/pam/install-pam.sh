#!/bin/sh
# Install (or roll back) the sekisho login guard in Debian/Ubuntu PAM.
#
#   install-pam.sh --venv /opt/sekisho/.venv --config /etc/sekisho/agent.toml --terminal t-hr-01
#   install-pam.sh --rollback          # restore the newest common-auth backup
#
# Environment overrides (tests, staging): PAM_DIR (default /etc/pam.d), SBIN_DIR (default /usr/local/sbin),
# BREAKGLASS_GROUP (default sekisho-breakglass).
set -eu

PAM_DIR=${PAM_DIR:-/etc/pam.d}
SBIN_DIR=${SBIN_DIR:-/usr/local/sbin}
BREAKGLASS_GROUP=${BREAKGLASS_GROUP:-sekisho-breakglass}
# Where sekisho-agent terminal answers pam-auth (its --pam-socket default).
AGENT_SOCKET=/run/sekisho/pam/pam.sock
HERE=$(cd "$(dirname "$0")" && pwd)
MARK_BEGIN="# >>> sekisho login guard >>>"
MARK_END="# <<< sekisho login guard <<<"
TARGET="$PAM_DIR/common-auth"
BACKUP_PREFIX="$TARGET.sekisho-backup."

VENV=/opt/sekisho/.venv
CONFIG=/etc/sekisho/agent.toml
TERMINAL=""
ACTION=install
ALLOW_EMPTY_BREAKGLASS=no
VERIFY_USER=""

die() { echo "install-pam: $*" >&2; exit 1; }
say() { echo "install-pam: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --rollback) ACTION=rollback ;;
        --venv) VENV=$2; shift ;;
        --config) CONFIG=$2; shift ;;
        --terminal) TERMINAL=$2; shift ;;
        --verify-user) VERIFY_USER=$2; shift ;;
        # Only for staging trees (PAM_DIR override): a real terminal must have a recovery account.
        --allow-empty-breakglass) ALLOW_EMPTY_BREAKGLASS=yes ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
    shift
done

rollback() {
    latest=$(ls -1 "$BACKUP_PREFIX"* 2>/dev/null | sort | tail -n 1 || true)
    [ -n "$latest" ] || die "no backup $BACKUP_PREFIX* to restore"
    cp -p "$latest" "$TARGET.sekisho-tmp"
    mv -f "$TARGET.sekisho-tmp" "$TARGET"
    say "restored $TARGET from $latest"
}

breakglass_members() {
    getent group "$BREAKGLASS_GROUP" 2>/dev/null | cut -d: -f4
}

install_guard() {
    [ -n "$TERMINAL" ] || die "--terminal is required (the terminal id in the site policy)"
    [ -f "$TARGET" ] || die "$TARGET does not exist"
    [ -x "$VENV/bin/python" ] || [ "$PAM_DIR" != /etc/pam.d ] || die "$VENV/bin/python not found"
    members=$(breakglass_members)
    if [ -z "$members" ] && [ "$ALLOW_EMPTY_BREAKGLASS" != yes ]; then
        die "group $BREAKGLASS_GROUP has no members: add a local admin first (see docs/login.md), or nobody can recover"
    fi
    if grep -qF "$MARK_BEGIN" "$TARGET"; then
        say "$TARGET already has the sekisho block; nothing to do"
        return 0
    fi
    stamp=$(date +%Y%m%d%H%M%S)
    backup="$BACKUP_PREFIX$stamp"
    [ ! -e "$backup" ] || backup="$backup.$$"
    cp -p "$TARGET" "$backup"
    say "backed up $TARGET to $backup"

    mkdir -p "$SBIN_DIR"
    sed -e "s|@VENV@|$VENV|" -e "s|@CONFIG@|$CONFIG|" -e "s|@TERMINAL@|$TERMINAL|" \
        "$HERE/sekisho-pam-auth" >"$SBIN_DIR/sekisho-pam-auth.tmp"
    chmod 0755 "$SBIN_DIR/sekisho-pam-auth.tmp"
    mv -f "$SBIN_DIR/sekisho-pam-auth.tmp" "$SBIN_DIR/sekisho-pam-auth"

    # The block goes first, so it runs before the password modules; the original file follows unchanged.
    sed -e "s|/usr/local/sbin/sekisho-pam-auth|$SBIN_DIR/sekisho-pam-auth|" \
        -e "s|ingroup sekisho-breakglass|ingroup $BREAKGLASS_GROUP|" \
        "$HERE/common-auth-sekisho" >"$TARGET.sekisho-tmp"
    cat "$TARGET" >>"$TARGET.sekisho-tmp"
    chmod --reference="$TARGET" "$TARGET.sekisho-tmp" 2>/dev/null || chmod 0644 "$TARGET.sekisho-tmp"
    mv -f "$TARGET.sekisho-tmp" "$TARGET"
    say "installed the sekisho block in $TARGET"

    verify "${VERIFY_USER:-$(echo "$members" | cut -d, -f1)}" || {
        say "verification failed: rolling back"
        rollback
        exit 1
    }
    [ -S "$AGENT_SOCKET" ] || say "note: no terminal agent answers on $AGENT_SOCKET yet; until sekisho-agent terminal" \
        "runs, every login except the $BREAKGLASS_GROUP group's is refused"
}

verify() {
    user=$1
    if [ "$PAM_DIR" != /etc/pam.d ]; then
        say "verification skipped: pamtester only reads /etc/pam.d (PAM_DIR=$PAM_DIR)"
        return 0
    fi
    command -v pamtester >/dev/null || { say "verification skipped: pamtester not installed"; return 0; }
    [ -n "$user" ] || { say "verification skipped: no break-glass user"; return 0; }
    # A throwaway service with the installed block and a permit: the break-glass user must get through
    # without the helper being run at all (that is what keeps admins in when the agent is down).
    svc="sekisho-verify-$$"
    {
        sed -n "/$MARK_BEGIN/,/$MARK_END/p" "$TARGET" | sed "s|pam_exec.so stdout quiet .*|pam_deny.so|"
        echo "auth required pam_permit.so"
        echo "account required pam_permit.so"
    } >"$PAM_DIR/$svc"
    if pamtester "$svc" "$user" authenticate </dev/null >/dev/null 2>&1; then
        rm -f "$PAM_DIR/$svc"
        say "verified: break-glass user $user bypasses the card check"
        return 0
    fi
    rm -f "$PAM_DIR/$svc"
    say "break-glass user $user did NOT get through"
    return 1
}

case "$ACTION" in
    install) install_guard ;;
    rollback) rollback ;;
esac
