"""The legacy shared API tokens (deprecated) and the failed-authentication limiter every bearer token goes through.

``api_tokens`` are write tokens, ``api_read_tokens`` read-only ones; since the console accounts (issue 12)
controller/accounts/authn.py maps them to service actors with the role it_admin (write) or auditor (read),
and the role matrix (controller/accounts/roles.py) decides every route. Per-user tokens replace them.

Failed authentication is counted per client address (IPv6 per /64, as one host usually holds a whole /64)
in this process's memory: after ``api_auth_failures`` failures within ``api_auth_window_s`` the address gets
429 with Retry-After for ``api_auth_window_s``, and its tokens are not even looked at meanwhile — answering a
right token during the lock-out would tell the attacker which guess was right, so the lock-out would not slow
guessing at all. The price: someone behind the same NAT as an attacker waits up to one window. Several
controller processes each keep their own counts (an attacker spreading over N processes gets N times the
attempts); nothing here is state another process needs. Memory is bounded: at most ``max_clients``
addresses are remembered, the least recently failing one is forgotten first.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from sekisho.controller.config import ControllerConfig

log = logging.getLogger(__name__)

MAX_CLIENTS = 4096


class Scope(StrEnum):
    """What a principal may do through the API."""

    READ = "read"
    WRITE = "write"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a name safe to log (never the token) and its scopes."""

    name: str
    scopes: frozenset[Scope]

    def may(self, scope: Scope) -> bool:
        """Tell whether this principal holds the scope."""
        return scope in self.scopes


WRITER = frozenset({Scope.READ, Scope.WRITE})
READER = frozenset({Scope.READ})
# The dev profile without any token: config.py allows it on loopback only.
OPEN_DEV = Principal("dev profile without api_tokens (loopback only)", WRITER)


class Unauthenticated(Exception):
    """No token, or one that is not configured."""


class Throttled(Exception):
    """Too many failed attempts from this client address; retry after the given seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


def client_key(host: str | None) -> str:
    """Return the key failures are counted under: the IPv4 address, or the IPv6 /64 it belongs to."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]  # not an address (a test client, a unix socket): bounded in size anyway
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass
class _Client:
    failures: deque[float]
    last: float
    locked_until: float = 0.0


@dataclass
class FailedAuthLimiter:
    """Counts failed authentications per client key and locks a key out after too many (thread-safe)."""

    max_failures: int
    window_s: float
    max_clients: int = MAX_CLIENTS
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    throttled: int = 0
    forgotten: int = 0
    _clients: OrderedDict[str, _Client] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def retry_after(self, client: str) -> int | None:
        """Return the seconds a locked-out client must wait (and count the refusal), or None if it may try."""
        with self._lock:
            now = self.clock()
            entry = self._clients.get(client)
            if entry is None or entry.locked_until <= now:
                return None
            self.throttled += 1
            return max(1, math.ceil(entry.locked_until - now))

    def failed(self, client: str, what: str) -> bool:
        """Record and log one failed attempt (what: e.g. "wrong token on GET /api/v1/events", never the token).

        Returns True if this failure locked the client out.
        """
        with self._lock:
            now = self.clock()
            self.failures += 1
            self._forget_stale(now)
            entry = self._clients.pop(client, None)
            if entry is None:
                entry = _Client(deque(maxlen=self.max_failures), now)
            # Least recently failing first: the front of the dict is always the stalest entry.
            self._clients[client] = entry
            entry.last = now
            while entry.failures and entry.failures[0] <= now - self.window_s:
                entry.failures.popleft()
            entry.failures.append(now)
            count = len(entry.failures)
            locked = count >= self.max_failures
            if locked:
                entry.locked_until = now + self.window_s
                entry.failures.clear()
            self._bound()
        log.warning(
            "API authentication failed from %s: %s (%d of %d allowed within %d s)",
            client,
            what,
            count,
            self.max_failures,
            self.window_s,
        )
        if locked:
            log.warning(
                "API authentication: %s locked out for %d s after %d failures; it gets 429, right token or not",
                client,
                self.window_s,
                count,
            )
        return locked

    def counts(self) -> dict[str, int]:
        """Return the totals since start and the client addresses locked out now."""
        with self._lock:
            now = self.clock()
            locked = sum(1 for entry in self._clients.values() if entry.locked_until > now)
            return {
                "failures": self.failures,
                "throttled": self.throttled,
                "locked_out": locked,
                "tracked": len(self._clients),
                "forgotten": self.forgotten,
            }

    def _forget_stale(self, now: float) -> None:
        # An entry whose last failure is a window old has no failure left to count and no lock left to serve.
        while self._clients:
            key, entry = next(iter(self._clients.items()))
            if entry.last > now - self.window_s or entry.locked_until > now:
                return
            del self._clients[key]

    def _bound(self) -> None:
        while len(self._clients) > self.max_clients:
            key, entry = self._clients.popitem(last=False)
            self.forgotten += 1
            if self.forgotten == 1 or self.forgotten % 1000 == 0:
                log.warning(
                    "API authentication: failures from more than %d addresses; forgetting the oldest (%s%s); "
                    "%d forgotten so far",
                    self.max_clients,
                    key,
                    ", locked out" if entry.locked_until > self.clock() else "",
                    self.forgotten,
                )


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison's time independent of the tokens' lengths too.
    return hashlib.sha256(token.encode()).digest()


class ApiAuth:
    """The configured tokens and the failure limiter of one controller process."""

    def __init__(self, tokens: Iterable[tuple[str, Principal]], limiter: FailedAuthLimiter, *, open_dev: bool) -> None:
        self._tokens = [(_digest(token), principal) for token, principal in tokens]
        self.limiter = limiter
        self.open_dev = open_dev and not self._tokens

    @classmethod
    def from_config(cls, config: ControllerConfig, clock: Callable[[], float] = time.monotonic) -> ApiAuth:
        """Build the token table and a new limiter from the controller configuration."""
        tokens = [
            *((t.get_secret_value(), Principal(f"api_tokens[{i}]", WRITER)) for i, t in enumerate(config.api_tokens)),
            *(
                (t.get_secret_value(), Principal(f"api_read_tokens[{i}]", READER))
                for i, t in enumerate(config.api_read_tokens)
            ),
        ]
        limiter = FailedAuthLimiter(config.api_auth_failures, config.api_auth_window_s, clock=clock)
        return cls(tokens, limiter, open_dev=config.profile == "dev")

    def lookup(self, offered: str) -> Principal | None:
        """Return the principal of a configured token, comparing against every token in constant time."""
        digest = _digest(offered)
        found: Principal | None = None
        for candidate, principal in self._tokens:
            if hmac.compare_digest(digest, candidate) and found is None:
                found = principal
        return found

    def authenticate(self, offered: str | None, host: str | None, where: str) -> Principal:
        """Return who offered this token, or raise Throttled (locked-out address) or Unauthenticated."""
        if self.open_dev:
            return OPEN_DEV
        client = client_key(host)
        wait = self.limiter.retry_after(client)
        if wait is not None:
            raise Throttled(wait)
        principal = self.lookup(offered) if offered else None
        if principal is None:
            self.limiter.failed(client, f"{'wrong' if offered else 'no'} token on {where}")
            raise Unauthenticated("missing or invalid API token")
        return principal

    def identify(self, offered: str | None, host: str | None, where: str) -> Principal | None:
        """Like authenticate, for routes open to anyone that show more to a token holder: never refuses.

        No token is not a failure here; a wrong one is (it would otherwise be an unthrottled oracle).
        """
        if self.open_dev:
            return OPEN_DEV
        if not offered:
            return None
        try:
            return self.authenticate(offered, host, where)
        except (Throttled, Unauthenticated):
            return None
