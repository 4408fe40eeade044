"""Certificates that renew themselves: before two thirds of their lifetime, with jitter, with a new key each time.

The agent keeps using its current certificate until the controller has issued the next one and it is
written, with its new key, in one atomic replace of ``tls.pem`` (key and chain in one file, so no crash
leaves a key beside a certificate that is not its own). The broker connection presents the new
certificate from its next (re)connection on; the current connection is left alone.

Renewal is authenticated by the agent's registered Ed25519 key (controller/fleet/enrol_service.py says why).
An agent that was offline past its certificate's expiry cannot renew: it must be re-enrolled with a token
for its name (`sekisho fleet token create --reenrol NAME`), as docs/operations.md describes.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from cryptography import x509

from sekisho.agents.runtime.config import AgentConfig
from sekisho.agents.runtime.enrol_client import EnrolError, EnrolRefusedError, request_renewal, write_identity
from sekisho.protocol import signing, timefmt

log = logging.getLogger(__name__)

RENEW_AT = 2 / 3
# Up to a tenth of the lifetime earlier, so a fleet enrolled in one afternoon does not renew in one minute.
JITTER = 0.1
CHECK_EVERY_S = 3600.0
RETRY_MIN_S = 60.0
RETRY_MAX_S = 3600.0


def renewal_enabled(config: AgentConfig) -> str | None:
    """Return why automatic renewal cannot run for this config, or None if it can."""
    if config.controller_url is None:
        return "no controller_url in the agent's config"
    if config.tls_cert != config.tls_key:
        return "tls_cert and tls_key are separate files (enrolled agents keep both in tls.pem)"
    return None


class CertificateRenewer:
    """Renews one agent's TLS certificate; run() in a thread, or renew_if_due() from a test with its clock."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        on_renewed: Callable[[], None] = lambda: None,
        clock: Callable[[], datetime] = timefmt.now,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.on_renewed = on_renewed
        self.clock = clock
        self.rng = rng or random.Random()
        self.renewed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._retry_s = RETRY_MIN_S
        self._due: datetime | None = None
        self._due_for: int | None = None

    def current(self) -> x509.Certificate:
        """Return the certificate in use now (the first in tls.pem)."""
        return x509.load_pem_x509_certificates(self.config.tls_cert.read_bytes())[0]

    def due_at(self) -> datetime:
        """Return when the current certificate is due for renewal (two thirds of its life, less some jitter)."""
        cert = self.current()
        if self._due is None or self._due_for != cert.serial_number:
            start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
            lifetime = end - start
            early = lifetime * JITTER * self.rng.random()
            self._due = start + lifetime * RENEW_AT - early
            self._due_for = cert.serial_number
        return self._due

    def renew_if_due(self) -> bool:
        """Renew if the current certificate is due; return whether it was renewed (EnrolError if it failed)."""
        if self.clock() < self.due_at():
            return False
        self.renew_now()
        return True

    def renew_now(self) -> x509.Certificate:
        """Get a certificate for a new key from the controller, write it atomically, and tell the link."""
        cfg = self.config
        if cfg.controller_url is None:
            raise EnrolError("no controller_url in the agent's config: this agent cannot renew its certificate")
        now = self.clock()
        current = self.current()
        if current.not_valid_after_utc <= now:
            raise EnrolError(
                f"the certificate expired at {timefmt.fmt(current.not_valid_after_utc)}: it cannot be renewed; "
                f"re-enrol this device with a token from `sekisho fleet token create --reenrol {cfg.agent_id}`"
            )
        key, chain, leaf = request_renewal(
            agent_id=cfg.agent_id,
            controller_url=cfg.controller_url,
            controller_ca=cfg.controller_ca_cert or cfg.ca_cert,
            site_ca=cfg.ca_cert,
            signing_key=signing.load_private_key(cfg.signing_key),
            current_chain_pem=cfg.tls_cert.read_bytes(),
            now=now,
        )
        write_identity(cfg.tls_cert, key, chain)
        self.renewed += 1
        log.info(
            "certificate renewed: valid until %s (new key; used from the next broker connection on)",
            timefmt.fmt(leaf.not_valid_after_utc),
        )
        self.on_renewed()
        return leaf

    # --- the background thread -------------------------------------------------------------------------

    def start(self) -> None:
        """Start checking in the background."""
        self._thread = threading.Thread(target=self.run, name="cert-renewal", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """Renew whenever due until stopped; after a failure retry with growing, jittered pauses."""
        while not self._stop.is_set():
            self._stop.wait(self.step())

    def step(self) -> float:
        """Renew if due; return how many seconds to wait before the next check."""
        try:
            self.renew_if_due()
        except (EnrolError, OSError, ValueError) as err:
            if not self._failing:
                # Log a failure once, and its recovery once.
                log.error("certificate renewal failed (retrying): %s", err)
                self._failing = True
            if isinstance(err, EnrolRefusedError) or "expired" in str(err):
                self._retry_s = RETRY_MAX_S
            wait = self._retry_s * (0.5 + self.rng.random())
            self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
            return wait
        if self._failing:
            log.info("certificate renewal works again")
            self._failing = False
            self._retry_s = RETRY_MIN_S
        try:
            until = (self.due_at() - self.clock()) / timedelta(seconds=1)
        except (OSError, ValueError):
            return RETRY_MIN_S
        return max(1.0, min(until, CHECK_EVERY_S))
