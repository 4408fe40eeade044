"""Console accounts: users, sign-in with throttling and lock-out, server-side sessions and per-user API tokens.

Everything is in the database (no process memory another controller worker would need): a session is a
row keyed by the SHA-256 of the random id in the browser's cookie, an API token a row keyed by the
SHA-256 of its secret, and a lock-out is computed from the rows of ``console_login_attempts`` that
record every attempt (success, failure, lock-out). Times come from the injected clock.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn, cast

from sqlalchemy import Connection, Table, delete, func, insert, or_, select, update

from sekisho.common.i18n import M_, N_, Message
from sekisho.controller.accounts import passwords, totp
from sekisho.controller.accounts.audit_hook import audit_hook
from sekisho.controller.accounts.roles import ADMIN_ROLES, Actor, Role
from sekisho.controller.api.auth import client_key
from sekisho.controller.config import ControllerConfig
from sekisho.controller.store.models import ConsoleApiToken, ConsoleSession, ConsoleUser, LoginAttempt
from sekisho.controller.store.records import Records
from sekisho.protocol import mynumber, timefmt

_USERS = cast(Table, ConsoleUser.__table__)
_SESSIONS = cast(Table, ConsoleSession.__table__)
_TOKENS = cast(Table, ConsoleApiToken.__table__)
_ATTEMPTS = cast(Table, LoginAttempt.__table__)

LOGIN_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")
AREA_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TOKEN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$")
TOKEN_PREFIX = "skt_"  # noqa: S105 - a prefix that lets secret scanners spot our tokens, no secret
LANGUAGES = ("ja", "en")

# Outcomes that count towards a lock-out; "ok" and the lock-out itself start the count again.
FAILURES = ("unknown_login", "bad_password", "disabled", "totp_missing", "bad_totp")
LOCKED_OUT = "locked_out"
CLIENT_LOCKED_OUT = "client_locked_out"
# A session's last_seen_at is written at most this often (a page with many requests costs one write).
TOUCH_EVERY = timedelta(seconds=30)

GENERIC_REFUSAL = N_("wrong login, password or verification code")


class AccountError(ValueError):
    """A refused account change; the message (Japanese / English) says why and never holds a secret."""


class UserNotFound(AccountError):
    """No user with that login."""


class LoginRefused(Exception):
    """A sign-in refused: reason is the recorded outcome, message what the person is told."""

    def __init__(self, reason: str, message: Message, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True, kw_only=True)
class AccountSettings:
    """Session lifetimes and sign-in throttling, from the controller configuration."""

    session_idle: timedelta = timedelta(minutes=30)
    session_lifetime: timedelta = timedelta(hours=12)
    login_failures: int = 5
    login_client_failures: int = 20
    login_lockout: timedelta = timedelta(minutes=15)

    @classmethod
    def from_config(cls, config: ControllerConfig) -> AccountSettings:
        """Read the settings of controller.toml."""
        return cls(
            session_idle=timedelta(seconds=config.session_idle_s),
            session_lifetime=timedelta(seconds=config.session_lifetime_s),
            login_failures=config.login_failures,
            login_client_failures=config.login_client_failures,
            login_lockout=timedelta(seconds=config.login_lockout_s),
        )


@dataclass(frozen=True)
class SignedIn:
    """A successful sign-in: the user and the raw session id for the cookie (shown to nobody else)."""

    user: ConsoleUser
    session_id: str
    session_sha256: str


@dataclass(frozen=True)
class NewToken:
    """A newly issued API token: the secret is in ``token`` and is never shown again."""

    id: str
    name: str
    token: str
    expires_at: datetime | None


def digest(secret: str) -> str:
    """Return the hex SHA-256 the store keeps instead of a session id or token."""
    return hashlib.sha256(secret.encode()).hexdigest()


def normalise_login(login: str) -> str:
    """Return the login as stored: trimmed and lower case."""
    return login.strip().lower()


def _recorded_login(login: str) -> str:
    # What someone typed is kept to see what was tried, bounded, and never a My Number typed by mistake.
    text = mynumber.redact(normalise_login(login)[:64])
    return str(text)[:64]


def _free_text(value: str, field: str, limit: int = 128) -> str:
    value = value.strip()
    if not value:
        raise AccountError(M_("%(field)s is required", field=field))
    if len(value) > limit:
        raise AccountError(M_("%(field)s is longer than %(limit)s characters", field=field, limit=limit))
    if mynumber.contains_my_number(value):
        raise AccountError(*mynumber.MyNumberFound([field]).args)
    return value


def actor_for(user: ConsoleUser, via: str, client: str | None, **extra: Any) -> Actor:
    """Return the Actor a user acts as (its role, and its areas when an area manager)."""
    role = Role(user.role)
    areas = frozenset(user.areas) if role == Role.AREA_MANAGER else None
    return Actor(user.id, user.login, user.display_name, role, areas, via, client, **extra)  # type: ignore[arg-type]


class AccountService:
    """Users, sign-in, sessions and API tokens in the controller's database."""

    def __init__(
        self, store: Records, settings: AccountSettings | None = None, clock: Callable[[], datetime] = timefmt.now
    ) -> None:
        """Keep the accounts in this store's database; times come from clock (tests control it)."""
        self.store = store
        self.settings = settings or AccountSettings()
        self.clock = clock

    # --- users ------------------------------------------------------------------------------------------

    def create_user(
        self,
        *,
        login: str,
        display_name: str,
        kana: str,
        role: Role,
        password: str,
        areas: Sequence[str] = (),
        language: str = "ja",
        created_by: str,
    ) -> ConsoleUser:
        """Create a console user; AccountError (or PasswordRejected) says what is wrong."""
        login = normalise_login(login)
        if not LOGIN_PATTERN.match(login):
            raise AccountError(M_("a login is 2-64 of a-z, 0-9, '.', '_', '-'"))
        values: dict[str, Any] = {
            "login": login,
            "display_name": _free_text(display_name, "name"),
            "kana": _free_text(kana, "kana"),
            "role": role.value,
            "areas": self._areas(role, areas),
            "language": self._language(language),
        }
        passwords.check_policy(password, login)
        now = self.clock()
        values |= {
            "password_hash": passwords.hash_password(password),
            "password_changed_at": now,
            "created_at": now,
            "created_by": created_by[:128],
        }

        def work(conn: Connection) -> int:
            if conn.execute(select(_USERS.c.id).where(_USERS.c.login == login)).first() is not None:
                raise AccountError(M_("the login %(login)s exists already", login=login))
            return int(conn.execute(insert(_USERS).values(**values).returning(_USERS.c.id)).scalar_one())

        self.store.write(work)
        audit_hook(self.store, created_by, "cli", None, "user.create", f"user:{login}", None, _public(values), None)
        return self.user(login)

    @staticmethod
    def _areas(role: Role, areas: Sequence[str]) -> list[str]:
        chosen = sorted({a.strip() for a in areas if a.strip()})
        if role == Role.AREA_MANAGER and not chosen:
            raise AccountError(M_("an area manager needs at least one --area"))
        if role != Role.AREA_MANAGER and chosen:
            raise AccountError(M_("--area is for area managers only"))
        for area in chosen:
            if not AREA_PATTERN.match(area):
                raise AccountError(M_("not an area id: %(area)s", area=repr(mynumber.redact(area))))
        return chosen

    @staticmethod
    def _language(language: str) -> str:
        if language not in LANGUAGES:
            raise AccountError(M_("language must be one of %(choices)s", choices=", ".join(LANGUAGES)))
        return language

    def user(self, login: str) -> ConsoleUser:
        """Return the user with this login (UserNotFound otherwise)."""
        rows = self.store.read(select(ConsoleUser).where(ConsoleUser.login == normalise_login(login)))
        if not rows:
            raise UserNotFound(M_("no user %(login)s", login=login))
        return rows[0]

    def user_by_id(self, user_id: int) -> ConsoleUser | None:
        """Return the user with this id, or None."""
        rows = self.store.read(select(ConsoleUser).where(ConsoleUser.id == user_id))
        return rows[0] if rows else None

    def users(self) -> list[ConsoleUser]:
        """Return every user, by login."""
        return self.store.read(select(ConsoleUser).order_by(ConsoleUser.login))

    def any_user(self) -> bool:
        """Tell whether at least one console user exists (the dev profile is open until then)."""
        with self.store.engine.connect() as conn:
            return conn.execute(select(_USERS.c.id).limit(1)).first() is not None

    def _update_user(self, login: str, values: dict[str, Any], *, end_sessions: bool = False) -> ConsoleUser:
        user = self.user(login)

        def work(conn: Connection) -> None:
            conn.execute(update(_USERS).where(_USERS.c.id == user.id).values(**values))
            if end_sessions:
                conn.execute(delete(_SESSIONS).where(_SESSIONS.c.user_id == user.id))

        self.store.write(work)
        return self.user(login)

    def set_role(self, login: str, role: Role, areas: Sequence[str], *, by: str) -> ConsoleUser:
        """Give a user another role (and areas); their sessions end, so the new role applies at once."""
        before = self.user(login)
        after = self._update_user(login, {"role": role.value, "areas": self._areas(role, areas)}, end_sessions=True)
        audit_hook(self.store,
            by, "cli", None, "user.set_role", f"user:{after.login}",
            {"role": before.role, "areas": before.areas}, {"role": after.role, "areas": after.areas}, None,
        )  # fmt: skip
        return after

    def set_disabled(self, login: str, disabled: bool, *, by: str) -> ConsoleUser:
        """Disable (sessions end, tokens stop working) or enable a user again."""
        user = self._update_user(login, {"disabled_at": self.clock() if disabled else None}, end_sessions=disabled)
        audit_hook(self.store,
            by, "cli", None, "user.disable" if disabled else "user.enable", f"user:{user.login}",
            None, {"disabled": disabled}, None,
        )  # fmt: skip
        return user

    def set_language(self, user_id: int, language: str) -> None:
        """Remember a user's console language."""
        language = self._language(language)
        self.store.write(
            lambda conn: conn.execute(update(_USERS).where(_USERS.c.id == user_id).values(language=language))
        )

    def reset_password(self, login: str, password: str, *, by: str) -> ConsoleUser:
        """Set a new password for a user (an administrator's reset): every session of the user ends."""
        user = self.user(login)
        passwords.check_policy(password, user.login)
        values = {"password_hash": passwords.hash_password(password), "password_changed_at": self.clock()}
        user = self._update_user(login, values, end_sessions=True)
        audit_hook(self.store, by, "cli", None, "user.reset_password", f"user:{user.login}", None, None, None)
        return user

    def change_password(self, actor: Actor, current: str, new: str) -> None:
        """Change one's own password: the current one must be right; every OTHER session of the user ends."""
        user = self.user_by_id(actor.user_id) if actor.user_id is not None else None
        if user is None or user.disabled_at is not None:
            raise AccountError(M_("this account cannot change a password"))
        if not passwords.verify_password(user.password_hash, current):
            raise AccountError(M_("the current password is wrong"))
        passwords.check_policy(new, user.login)
        values = {"password_hash": passwords.hash_password(new), "password_changed_at": self.clock()}
        keep = actor.session_sha256

        def work(conn: Connection) -> None:
            conn.execute(update(_USERS).where(_USERS.c.id == user.id).values(**values))
            others = delete(_SESSIONS).where(_SESSIONS.c.user_id == user.id)
            if keep is not None:
                others = others.where(_SESSIONS.c.id_sha256 != keep)
            conn.execute(others)

        self.store.write(work)
        audit_hook(self.store, actor.audit_name, actor.via, actor.client, "user.change_password", f"user:{user.login}",
                   None, None, None)  # fmt: skip

    def enrol_totp(self, login: str, *, by: str) -> tuple[str, str]:
        """Give a user a new TOTP secret (replacing any earlier one); return (secret, otpauth URI), shown once."""
        secret = totp.new_secret()
        user = self._update_user(
            login, {"totp_secret": secret, "totp_enrolled_at": self.clock(), "totp_last_step": None}
        )
        audit_hook(self.store, by, "cli", None, "user.totp_enrol", f"user:{user.login}", None, None, None)
        return secret, totp.provisioning_uri(secret, user.login)

    # --- sign-in ----------------------------------------------------------------------------------------

    def login(self, login: str, password: str, code: str | None, host: str | None) -> SignedIn:
        """Check a sign-in and open a session, or raise LoginRefused (every attempt is recorded)."""
        now = self.clock()
        typed = _recorded_login(login)
        client = client_key(host)
        wait = self._locked(typed, client, now)
        if wait is not None:
            self._record(now, typed, None, client, "refused_locked", None)
            raise LoginRefused(
                "locked",
                M_(
                    "sign-in is locked for a while after too many failures; try again in %(minutes)s min",
                    minutes=wait // 60 + 1,
                ),
                retry_after=wait,
            )
        rows = self.store.read(select(ConsoleUser).where(ConsoleUser.login == normalise_login(login)))
        user = rows[0] if rows else None
        ok = passwords.verify_password(user.password_hash if user else None, password)
        if user is None or not ok or user.disabled_at is not None:
            outcome = "unknown_login" if user is None else "bad_password" if not ok else "disabled"
            self._fail(now, typed, user, client, outcome)
        role = Role(user.role)
        if role in ADMIN_ROLES and user.totp_secret is None:
            self._record(now, typed, user.id, client, "totp_not_enrolled", None)
            raise LoginRefused(
                "totp_not_enrolled",
                M_(
                    "the role %(role)s needs a second factor (TOTP): ask an IT admin to run `sekisho users "
                    "totp-enrol --login %(login)s` and add the URI it shows to your authenticator app",
                    role=role.value,
                    login=user.login,
                ),
            )
        step: int | None = None
        if user.totp_secret is not None:
            if not code:
                self._fail(now, typed, user, client, "totp_missing")
            step = totp.matching_step(user.totp_secret, code or "", now, user.totp_last_step)
            if step is None:
                self._fail(now, typed, user, client, "bad_totp")
        session_id = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
        session_sha256 = digest(session_id)
        rehash = passwords.needs_rehash(user.password_hash)
        new_hash = passwords.hash_password(password) if rehash else None
        settings = self.settings

        def work(conn: Connection) -> None:
            changes: dict[str, Any] = {}
            if step is not None:
                # Accept each code once: a concurrent sign-in with the same code loses here.
                moved = conn.execute(
                    update(_USERS)
                    .where(_USERS.c.id == user.id)
                    .where(or_(_USERS.c.totp_last_step.is_(None), _USERS.c.totp_last_step < step))
                    .values(totp_last_step=step)
                )
                if moved.rowcount != 1:
                    raise LoginRefused("bad_totp", M_(GENERIC_REFUSAL))
            if new_hash is not None:
                changes["password_hash"] = new_hash
            if changes:
                conn.execute(update(_USERS).where(_USERS.c.id == user.id).values(**changes))
            # Sessions past either limit are of no use to anyone: drop them while we are here.
            conn.execute(
                delete(_SESSIONS).where(
                    or_(_SESSIONS.c.expires_at <= now, _SESSIONS.c.last_seen_at <= now - settings.session_idle)
                )
            )
            conn.execute(
                insert(_SESSIONS).values(
                    id_sha256=session_sha256,
                    user_id=user.id,
                    created_at=now,
                    last_seen_at=now,
                    expires_at=now + settings.session_lifetime,
                    client=client,
                )
            )
            conn.execute(insert(_ATTEMPTS).values(at=now, login=typed, user_id=user.id, client=client, outcome="ok"))

        try:
            self.store.write(work)
        except LoginRefused:
            self._fail(now, typed, user, client, "bad_totp")
        audit_hook(self.store, f"user:{user.login}", "session", client, "login.ok", f"user:{user.login}",
                   None, None, None, strict=False)  # fmt: skip
        return SignedIn(user, session_id, session_sha256)

    def _fail(self, now: datetime, typed: str, user: ConsoleUser | None, client: str, outcome: str) -> NoReturn:
        user_id = user.id if user is not None else None
        locked = self._record(now, typed, user_id, client, outcome, None)
        message = M_(GENERIC_REFUSAL)
        if locked:
            message = M_(
                "wrong login, password or verification code — locked for %(minutes)s min",
                minutes=self.settings.login_lockout.seconds // 60,
            )
        raise LoginRefused(outcome, message)

    def _failures(self, conn: Connection, column: str, value: str, resets: tuple[str, ...], now: datetime) -> int:
        """Count the failures for this login or address within the lock-out time and since its last reset."""
        # By row id, not time: a success and the failures after it may share a timestamp.
        last_reset = conn.execute(
            select(func.max(_ATTEMPTS.c.id)).where(_ATTEMPTS.c[column] == value, _ATTEMPTS.c.outcome.in_(resets))
        ).scalar()
        stmt = (
            select(func.count())
            .select_from(_ATTEMPTS)
            .where(
                _ATTEMPTS.c[column] == value,
                _ATTEMPTS.c.outcome.in_(FAILURES),
                _ATTEMPTS.c.at > now - self.settings.login_lockout,
            )
        )
        if last_reset is not None:
            stmt = stmt.where(_ATTEMPTS.c.id > last_reset)
        return int(conn.execute(stmt).scalar_one())

    def _record(
        self, now: datetime, typed: str, user_id: int | None, client: str, outcome: str, detail: str | None
    ) -> bool:
        """Record one attempt; on a failure that reaches a limit, record the lock-out too. True if it locked."""
        settings = self.settings

        def work(conn: Connection) -> list[str]:
            conn.execute(
                insert(_ATTEMPTS).values(
                    at=now, login=typed, user_id=user_id, client=client, outcome=outcome, detail=detail
                )
            )
            if outcome not in FAILURES:
                return []
            locks: list[str] = []
            if self._failures(conn, "login", typed, ("ok", LOCKED_OUT), now) >= settings.login_failures:
                locks.append(LOCKED_OUT)
            if self._failures(conn, "client", client, (CLIENT_LOCKED_OUT,), now) >= settings.login_client_failures:
                locks.append(CLIENT_LOCKED_OUT)
            for lock in locks:
                conn.execute(
                    insert(_ATTEMPTS).values(at=now, login=typed, user_id=user_id, client=client, outcome=lock)
                )
            return locks

        locks = self.store.write(work)
        audit_hook(self.store,
            f"user:{typed}", "session", client, f"login.{outcome}", f"user:{typed}", None, None,
            {"locked": locks} if locks else None, strict=False,
        )  # fmt: skip
        for lock in locks:
            audit_hook(self.store, f"user:{typed}", "session", client, f"login.{lock}", f"user:{typed}", None, None,
                       {"for_s": int(settings.login_lockout.total_seconds())}, strict=False)  # fmt: skip
        return bool(locks)

    def _locked(self, typed: str, client: str, now: datetime) -> int | None:
        """Return the seconds until the login or the client address may try again, None if not locked."""
        since = now - self.settings.login_lockout
        rows = self.store.read(
            select(LoginAttempt).where(
                LoginAttempt.at > since,
                or_(
                    (LoginAttempt.outcome == LOCKED_OUT) & (LoginAttempt.login == typed),
                    (LoginAttempt.outcome == CLIENT_LOCKED_OUT) & (LoginAttempt.client == client),
                ),
            )
        )
        if not rows:
            return None
        until = max(r.at for r in rows) + self.settings.login_lockout
        return max(1, int((until - now).total_seconds()))

    def attempts(self, login: str | None = None, limit: int = 100) -> list[LoginAttempt]:
        """Return the latest sign-in attempts, newest first (for one login if given)."""
        stmt = select(LoginAttempt).order_by(LoginAttempt.id.desc()).limit(limit)
        if login is not None:
            stmt = stmt.where(LoginAttempt.login == _recorded_login(login))
        return self.store.read(stmt)

    # --- sessions ---------------------------------------------------------------------------------------

    def session_actor(self, session_id: str, host: str | None) -> Actor | None:
        """Return who a session cookie belongs to, or None if unknown, expired (idle or absolute) or disabled."""
        if not session_id or len(session_id) > 128:
            return None
        now = self.clock()
        key = digest(session_id)
        rows = self.store.read(select(ConsoleSession).where(ConsoleSession.id_sha256 == key))
        if not rows:
            return None
        session = rows[0]
        user = self.user_by_id(session.user_id)
        expired = session.expires_at <= now or now - session.last_seen_at > self.settings.session_idle
        if expired or user is None or user.disabled_at is not None:
            self.store.write(lambda conn: conn.execute(delete(_SESSIONS).where(_SESSIONS.c.id_sha256 == key)))
            return None
        if now - session.last_seen_at >= TOUCH_EVERY:
            self.store.write(
                lambda conn: conn.execute(
                    update(_SESSIONS).where(_SESSIONS.c.id_sha256 == key).values(last_seen_at=now)
                )
            )
        return actor_for(user, "session", host, session_sha256=key)

    def end_session(self, session_id: str) -> None:
        """Sign out: forget the session (its cookie no longer works anywhere)."""
        key = digest(session_id)
        self.store.write(lambda conn: conn.execute(delete(_SESSIONS).where(_SESSIONS.c.id_sha256 == key)))

    def sessions(self, user_id: int) -> list[ConsoleSession]:
        """Return a user's open sessions."""
        return self.store.read(select(ConsoleSession).where(ConsoleSession.user_id == user_id))

    # --- API tokens -------------------------------------------------------------------------------------

    def create_token(self, login: str, name: str, expires_in: timedelta | None, *, by: str) -> NewToken:
        """Issue an API token for a user (acting with the user's role); the secret is returned once."""
        user = self.user(login)
        name = name.strip()
        if not TOKEN_NAME_PATTERN.match(name):
            raise AccountError(M_("a token name is 1-64 of A-Z, 0-9, ' ._-'"))
        token_id = secrets.token_hex(6)
        while token_id.isdigit():
            # Twelve hex digits can all be 0-9 (about 1 in 280), and one in ten of those passes the My
            # Number check digit: the audit trail would refuse the token's row. Draw again; it costs nothing.
            token_id = secrets.token_hex(6)
        token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        now = self.clock()
        expires_at = now + expires_in if expires_in is not None else None

        def work(conn: Connection) -> None:
            taken = select(_TOKENS.c.id).where(_TOKENS.c.user_id == user.id, _TOKENS.c.name == name)
            if conn.execute(taken).first() is not None:
                raise AccountError(M_("%(login)s has a token named %(name)s", login=user.login, name=repr(name)))
            conn.execute(
                insert(_TOKENS).values(
                    id=token_id, user_id=user.id, name=name, secret_sha256=digest(token), created_at=now,
                    created_by=by[:128], expires_at=expires_at,
                )
            )  # fmt: skip

        self.store.write(work)
        audit_hook(self.store, by, "cli", None, "token.create", f"user:{user.login}", None,
                   {"token": token_id, "name": name, "expires_at": expires_at.isoformat() if expires_at else None},
                   None)  # fmt: skip
        return NewToken(token_id, name, token, expires_at)

    def tokens(self, login: str | None = None) -> list[tuple[ConsoleApiToken, str]]:
        """Return the API tokens (all, or one user's) with their owner's login."""
        stmt = select(ConsoleApiToken, ConsoleUser.login).join(ConsoleUser, ConsoleUser.id == ConsoleApiToken.user_id)
        if login is not None:
            stmt = stmt.where(ConsoleUser.login == normalise_login(login))
        from sqlalchemy.orm import Session

        with Session(self.store.engine) as session:
            return [(t, lg) for t, lg in session.execute(stmt.order_by(ConsoleApiToken.created_at))]

    def revoke_token(self, token_id: str, *, by: str) -> None:
        """Revoke an API token by its id (AccountError if there is no such token or it is revoked already)."""
        now = self.clock()

        def work(conn: Connection) -> None:
            moved = conn.execute(
                update(_TOKENS).where(_TOKENS.c.id == token_id, _TOKENS.c.revoked_at.is_(None)).values(revoked_at=now)
            )
            if moved.rowcount != 1:
                raise AccountError(M_("no active token %(token)s", token=token_id))

        self.store.write(work)
        audit_hook(self.store, by, "cli", None, "token.revoke", f"token:{token_id}", None, None, None)

    def token_actor(self, offered: str, host: str | None) -> Actor | None:
        """Return who a per-user API token acts as (updating its last use), or None if unknown/revoked/expired."""
        if not offered.startswith(TOKEN_PREFIX) or len(offered) > 128:
            return None
        now = self.clock()
        key = digest(offered)
        rows = self.store.read(select(ConsoleApiToken).where(ConsoleApiToken.secret_sha256 == key))
        if not rows:
            return None
        token = rows[0]
        if token.revoked_at is not None or (token.expires_at is not None and token.expires_at <= now):
            return None
        user = self.user_by_id(token.user_id)
        if user is None or user.disabled_at is not None:
            return None
        client = client_key(host)
        if token.last_used_at is None or now - token.last_used_at >= TOUCH_EVERY or token.last_used_client != client:
            self.store.write(
                lambda conn: conn.execute(
                    update(_TOKENS).where(_TOKENS.c.id == token.id).values(last_used_at=now, last_used_client=client)
                )
            )
        return actor_for(user, "token", host, token_id=token.id)


def _public(values: dict[str, Any]) -> dict[str, Any]:
    # What the audit trail may keep of a user: never the password hash.
    return {k: v for k, v in values.items() if k not in ("password_hash", "password_changed_at", "created_at")}
