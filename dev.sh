#!/usr/bin/env bash
# One entry point for a fresh Debian/Ubuntu machine:
#   ./dev.sh demo    install what is missing, then run the demo (Ctrl-C stops everything)
#   ./dev.sh test    install what is missing, then run every test tier this machine can run
#   ./dev.sh upgrade move the locks (requirements/*.txt) to the newest releases, install them, run the tests
# Installs: Debian packages (only when root and missing), a .venv holding exactly requirements/dev.txt,
# and the project itself (editable, without build isolation, so its build back-end is locked too).
set -euo pipefail
cd "$(dirname "$0")"

# mosquitto, postgresql: started privately by the tests. umockdev + python3-pyudev + gir: the real
# udev hot-plug path of the USB guard under umockdev-run (Debian's Python runs that probe).
# pcscd + vsmartcard-vpcd (+ libpcsclite-dev, gcc, python3-dev to build pyscard): the smart-card tests
# talk to a real pcscd with a software card. fprintd + libfprint (virtual_device) + dbus + dbusmock:
# the fingerprint tests run the real fprintd on a private system bus. pamtester: the PAM login path.
# mosquitto-dev + libmosquitto-dev (+ gcc): the headers to build the broker plugin that limits what agents
# subscribe to (deploy/mosquitto/sekisho_agent_acl.c; deploy.broker builds it for the tests and the demo).
# usbguard: the usbguard-daemon and usbguard-rule-parser the USB rule tests compare sekisho against.
# udev: udevadm, which checks the shipped read-only rule (deploy/udev/) with udev's own parser and matching
# (udevadm test on umockdev devices, in a private mount namespace); a desktop has it already, and in a
# container its install starts no udevd.
# systemd: systemd-analyze, which checks the shipped units (deploy/systemd/) with systemd's own parser and scores
# their hardening (verify, security --offline); it needs no systemd running as PID 1.
# The web console (issue 12): fonts-noto-cjk is the Japanese font embedded in PDF exports, laid out by WeasyPrint
# through pango (libpango-1.0-0, libpangoft2-1.0-0); chromium is the browser Playwright drives in the console tests
# (Debian's build, so no browser download at test time).
APT_PACKAGES=(
  mosquitto mosquitto-dev libmosquitto-dev postgresql python3-venv python3-dev gcc
  umockdev gir1.2-umockdev-1.0 python3-pyudev python3-gi
  pcscd pcsc-tools vsmartcard-vpcd libpcsclite-dev
  fprintd libfprint-2-2 libpam-fprintd dbus python3-dbusmock pamtester
  usbguard udev systemd
  fonts-noto-cjk libpango-1.0-0 libpangoft2-1.0-0 chromium
)

ensure_apt() {
  local missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]} (run as root, or install them yourself)" >&2
    return 0
  fi
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  # A policy-rc.d that says "no" keeps the packages' own services from starting: tests start theirs.
  local own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ $own_policy -eq 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  # Debian enables usbguard.service at boot with rules generated from the devices present now: on a
  # workstation that would start blocking USB devices after the next reboot. The tests run their own
  # daemon; a usbguard that this script installed stays disabled (one installed before is left alone).
  if [[ " ${missing[*]} " == *" usbguard "* ]] && command -v systemctl >/dev/null; then
    systemctl disable usbguard.service >/dev/null 2>&1 || true
  fi
}

ensure_venv() {
  local py=${PYTHON:-python3}
  # The locks (requirements/*.txt, hashes for every file) decide what is installed, never today's newest
  # release; an edited pyproject.toml without a new lock stops here with what to do.
  "$py" requirements/lock.py check
  if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
  fi
  # Re-sync when the lock, pyproject.toml or lock.py (how it installs) changed since the last sync, or a sync
  # was interrupted.
  local stamp
  stamp=$(cat requirements/dev.txt pyproject.toml requirements/lock.py | sha256sum | cut -d' ' -f1)
  if [ "$(cat .venv/.sekisho-lock 2>/dev/null)" != "$stamp" ]; then
    echo "installing the locked dependencies (requirements/dev.txt) into .venv"
    rm -f .venv/.sekisho-lock
    .venv/bin/python requirements/lock.py sync .venv dev
    echo "$stamp" > .venv/.sekisho-lock
  fi
  # The console's htmx: from the npm registry tarball pinned with its sha512 in requirements/assets.json,
  # checked, into a git-ignored folder; nothing happens when it is already there as pinned. Without it (no
  # registry reachable) the console still works, only without live refresh: say so and go on.
  "$py" requirements/assets.py fetch || echo "warning: htmx not fetched; console pages work without live refresh" >&2
}

cmd=${1:-help}
shift || true
case "$cmd" in
  demo)
    ensure_apt; ensure_venv
    exec .venv/bin/sekisho demo "$@"
    ;;
  test)
    ensure_apt; ensure_venv
    .venv/bin/ruff check .
    .venv/bin/mypy
    exec .venv/bin/pytest "$@"
    ;;
  upgrade)
    # Move every dependency to its newest release, write the locks again, install them, run the tests.
    ensure_apt
    [ -x .venv/bin/python ] || { ensure_venv; }
    .venv/bin/python requirements/lock.py compile --upgrade
    ensure_venv
    exec "$0" test "$@"
    ;;
  *)
    echo "usage: ./dev.sh demo | ./dev.sh test [pytest args] | ./dev.sh upgrade" >&2
    exit 2
    ;;
esac
