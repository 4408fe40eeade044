"""The local copy of the controller's signed policy bundle: what the agent enforces, even offline.

The cache is re-verified on every start, so a file edited on disk is worth nothing. Anything wrong
leaves the agent with no policy (every decision fails closed), never with a crash.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sekisho.common.files import write_atomically
from sekisho.protocol import errors, messages, timefmt

log = logging.getLogger(__name__)

CACHE_NAME = "policy.bundle"
PolicyState = Literal["none", "valid", "expired"]
# Bigger than any bundle the controller may send (the wire limit), so reading a huge file is refused.
_MAX_CACHE_BYTES = messages.MAX_CONTROL_BYTES


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to a bundle offered on the policy topic."""

    status: Literal["applied", "refreshed", "unchanged", "rejected"]
    version: int | None
    previous_version: int | None = None
    reason: str | None = None
    detail: str = ""

    @property
    def accepted(self) -> bool:
        """Tell whether the bundle is (now) the one in force."""
        return self.status != "rejected"


@dataclass(frozen=True, slots=True)
class PolicyChange:
    """A change listeners hear about: a new bundle, a renewed one, or the current one expiring."""

    kind: Literal["applied", "refreshed", "expired"]
    bundle: messages.VerifiedBundle
    previous_version: int | None


Listener = Callable[[PolicyChange], None]


class PolicyCache:
    """Holds the verified bundle in force, persists it, and refuses anything forged, stale or rolled back."""

    def __init__(
        self,
        state_dir: Path,
        controller_key: Ed25519PublicKey,
        agent_id: str,
        *,
        now: Callable[[], datetime] = timefmt.now,
    ) -> None:
        self.path = state_dir / CACHE_NAME
        self._key = controller_key
        self._agent = agent_id
        self._now = now
        self._lock = threading.RLock()
        self._listeners: list[Listener] = []
        self._current: messages.VerifiedBundle | None = None
        self._expiry_reported = False
        self.load_error: errors.Rejected | None = None
        self._load()

    def _load(self) -> None:
        try:
            with self.path.open("rb") as handle:
                raw = handle.read(_MAX_CACHE_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as err:
            self._refuse_cache(errors.Rejected(errors.MALFORMED, f"cannot read cached bundle: {err.strerror}"))
            return
        try:
            self._current = messages.open_bundle(raw, self._key, self._agent)
        except errors.Rejected as err:
            self._refuse_cache(err)

    def _refuse_cache(self, err: errors.Rejected) -> None:
        # Fail closed: a cache we cannot trust is no policy at all. The file stays for inspection and
        # the next valid bundle from the controller replaces it.
        self.load_error = err
        log.warning(
            "cached policy bundle %s refused (%s); no policy until the controller sends one", self.path, err.reason
        )

    # --- reading ----------------------------------------------------------------------------------

    def current(self) -> messages.VerifiedBundle | None:
        """Return the last verified bundle, expired or not (check `state()` before trusting it)."""
        with self._lock:
            return self._current

    def in_force(self) -> messages.VerifiedBundle | None:
        """Return the bundle only while it is valid; None means decide as if there were no policy."""
        with self._lock:
            bundle = self._current
        return bundle if bundle is not None and not bundle.expired(self._now()) else None

    def state(self) -> PolicyState:
        """Return "none", "valid" or "expired"."""
        bundle = self.current()
        if bundle is None:
            return "none"
        return "expired" if bundle.expired(self._now()) else "valid"

    @property
    def version(self) -> int | None:
        """Return the version of the bundle held, if any."""
        bundle = self.current()
        return bundle.bundle.version if bundle is not None else None

    def seconds_until_expiry(self) -> float | None:
        """Return how long the current bundle stays valid (negative once expired), or None."""
        bundle = self.current()
        if bundle is None:
            return None
        return (bundle.expires_at - self._now()).total_seconds()

    # --- changing ---------------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` on every change; return a function that unsubscribes it."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    def _notify(self, change: PolicyChange) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(change)
            except Exception:  # one broken capability must not stop the others hearing about policy
                log.exception("policy listener %r failed", listener)

    def offer(self, raw: bytes) -> Outcome:
        """Verify a bundle from the policy topic and make it current if it is newer; never raises Rejected."""
        try:
            bundle = messages.open_bundle(raw, self._key, self._agent)
        except errors.Rejected as err:
            return Outcome("rejected", None, self.version, err.reason, err.detail)
        new_version = bundle.bundle.version
        if bundle.expired(self._now()):
            return Outcome(
                "rejected", new_version, self.version, errors.EXPIRED, f"bundle expired at {bundle.bundle.expires_at}"
            )
        with self._lock:
            old = self._current
            old_version = old.bundle.version if old is not None else None
            if old is not None and old_version is not None:
                if new_version < old_version:
                    return Outcome(
                        "rejected",
                        new_version,
                        old_version,
                        errors.ROLLBACK,
                        f"version {new_version} is older than {old_version}",
                    )
                # The retained message comes back on every reconnect; the same version is then a no-op,
                # unless the controller re-signed it with a later expiry to keep it alive.
                if new_version == old_version and (raw == old.raw or bundle.expires_at <= old.expires_at):
                    return Outcome("unchanged", new_version, old_version)
            write_atomically(self.path, raw)
            self._current = bundle
            self._expiry_reported = False
            self.load_error = None
        refreshed = old_version == new_version
        kind: Literal["applied", "refreshed"] = "refreshed" if refreshed else "applied"
        log.info("policy version %d %s (was %s)", new_version, kind, old_version)
        self._notify(PolicyChange(kind, bundle, old_version))
        return Outcome(kind, new_version, old_version)

    def check_expiry(self) -> PolicyChange | None:
        """Report (once per bundle) that the current bundle has expired; call it on a timer."""
        with self._lock:
            bundle = self._current
            if bundle is None or self._expiry_reported or not bundle.expired(self._now()):
                return None
            self._expiry_reported = True
        change = PolicyChange("expired", bundle, bundle.bundle.version)
        log.warning(
            "policy version %d expired at %s; decisions fail closed", bundle.bundle.version, bundle.bundle.expires_at
        )
        self._notify(change)
        return change
