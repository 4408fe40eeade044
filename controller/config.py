"""Controller configuration: a TOML file plus environment overrides, validated and immutable."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from sekisho.common.i18n import _


class SmtpConfig(BaseModel):
    """``[alerts.smtp]``: the relay alert e-mails go through (password from password_file or the environment)."""

    model_config = ConfigDict(extra="forbid")

    host: str
    port: int = Field(default=25, ge=1, le=65535)
    sender: str = Field(description="the From address, e.g. 'Sekisho <alerts@example.jp>'")
    starttls: bool = False
    username: str | None = None
    password_file: Path | None = Field(default=None, description="a file holding only the password (0600)")
    tls_cafile: Path | None = None
    timeout_s: float = Field(default=10.0, gt=0, le=120)


class WebhookConfig(BaseModel):
    """``[alerts.webhooks.<name>]``: a signed webhook receiver a policy contact names."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(repr=False)
    secret_file: Path = Field(description="a file holding the HMAC key (at least 16 bytes, 0600)")
    tls_cafile: Path | None = None
    timeout_s: float = Field(default=10.0, gt=0, le=120)


class SyslogConfig(BaseModel):
    """``[alerts.syslog]``: a SIEM or relay that receives every alert opened, as RFC 5424."""

    model_config = ConfigDict(extra="forbid")

    host: str
    port: int = Field(default=514, ge=1, le=65535)
    transport: Literal["udp", "tcp"] = "udp"
    facility: int = Field(default=10, ge=0, le=23)
    app_name: str = "sekisho"


class AlertsConfig(BaseModel):
    """``[alerts]``: how often the rules run, the console address for links, and the channels."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    every_s: float = Field(default=0.2, ge=0.05, le=60, description="rounds over new events and due escalations")
    condition_every_s: float = Field(default=10.0, ge=1, le=3600, description="sweeps of the fleet and records")
    delivery_every_s: float = Field(default=0.5, ge=0.05, le=60)
    stream_poll_s: float = Field(
        default=0.25, ge=0.05, le=60, description="live streams look for changes the engine did not ring for"
    )
    console_url: str | None = Field(default=None, pattern=r"^https?://[^\s]+$", description="for links in notices")
    smtp: SmtpConfig | None = None
    webhooks: dict[str, WebhookConfig] = Field(default_factory=dict)
    syslog: SyslogConfig | None = None


class ControllerConfig(BaseSettings):
    """Everything `sekisho controller serve` needs; unknown keys are an error."""

    model_config = SettingsConfigDict(env_prefix="SEKISHO_CONTROLLER_", extra="forbid", frozen=True)

    profile: Literal["dev", "production"] = "production"
    var_dir: Path = Path("var")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite under var_dir if unset")
    # PostgreSQL only: the connections one controller process keeps open, and how many more it may open at a peak.
    # Each process (serve, every `controller ingest` worker) has a pool of its own, so processes × (size +
    # overflow) must stay below the server's max_connections minus its reserved slots (docs/operations.md).
    database_pool_size: int = Field(default=5, ge=1, le=100)
    database_max_overflow: int = Field(default=5, ge=0, le=100)

    broker_host: str = "127.0.0.1"
    # The broker's controllers' listener (8883 is the agents'; deploy/mosquitto/mosquitto.conf.example).
    broker_port: int = Field(default=8884, ge=1, le=65535)
    ca_cert: Path
    tls_cert: Path
    tls_key: Path
    signing_key: Path = Field(description="Ed25519 key that signs acks, policy bundles and commands")
    # Starts with "controller": it prefixes the MQTT client ids, and no agent name may (protocol/topics.py).
    worker_id: str = Field(default="controller-1", pattern=r"^controller[A-Za-z0-9_-]{0,30}$")
    share_group: str = Field(default="controllers", pattern=r"^[A-Za-z0-9_-]{1,40}$")
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0)

    batch_max: int = Field(default=500, ge=1, le=10_000)
    batch_wait_ms: int = Field(default=20, ge=0, le=5_000)
    key_refresh_s: int = Field(default=10, ge=1)
    # After a key rotation (register-agent --replace, re-enrolment) events signed with the replaced key are
    # still accepted, and marked, when received within this window: what waited in the outbox of a terminal
    # that was off over a long weekend (Friday evening to Tuesday morning with a holiday) gets in; longer
    # widens the window in which a leaked old key could add events. Signed into the key line at rotation.
    key_rotation_grace_s: int = Field(default=4 * 24 * 3600, ge=0, le=30 * 24 * 3600)
    # The broker's revocation list (deploy/mosquitto/sekisho_agent_acl.c), written whenever it changes when
    # the broker runs on this host; unset: served only at /api/v1/fleet/revocations for
    # `sekisho fleet revocations sync` on the broker host.
    revocation_list: Path | None = None
    # A batch that fails this many times in a row is split, and a message that still fails alone this many
    # times is kept as a dead letter and released, so one bad message can never stop ingest for everyone.
    ingest_attempts: int = Field(default=3, ge=1, le=100)
    # /readyz answers 503 when messages wait and nothing was stored or dead-lettered for this long.
    ingest_stall_s: int = Field(default=60, ge=5)
    # Verified points (docs/registers.md): every chain_verify_every_s each chain is checked on from its signed
    # point (only the records since); every chain_verify_full_every_s every chain is walked from the start,
    # which is what finds a record edited inside an already verified prefix (~35 min at 10M events).
    chain_verify_every_s: int = Field(default=600, ge=10, le=24 * 3600)
    chain_verify_full_every_s: int = Field(default=24 * 3600, ge=600, le=31 * 24 * 3600)
    # Several controllers on one database (controller/leader.py): a process that does not lead a job looks for
    # its free lock every leader_check_s, and a leader proves its lock as often. A proof counts for three times
    # that, which stays below the 8 s after which PostgreSQL drops a silent session: a leader cut off from the
    # database stops acting before another process can take its lock.
    leader_check_s: float = Field(default=1.0, ge=0.1, le=2.5)
    # Every process (serve and ingest) writes its row for `sekisho controller status` this often.
    process_beat_s: float = Field(default=10.0, ge=1.0, le=300.0)

    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    # Deprecated (per-user tokens replace them, docs/console.md): shared tokens kept working as "service"
    # principals, api_tokens with the role it_admin, api_read_tokens with the role auditor.
    api_tokens: list[SecretStr] = Field(default_factory=list)
    api_read_tokens: list[SecretStr] = Field(default_factory=list)
    # Failed authentication, per client address (IPv6: per /64) and per controller process: after this many
    # failures within api_auth_window_s the address gets 429 (even with a right token) for api_auth_window_s.
    api_auth_failures: int = Field(default=10, ge=1, le=1000)
    api_auth_window_s: int = Field(default=60, ge=1, le=3600)
    # Console sessions (controller/accounts): signed out after this long without a request, and after
    # session_lifetime_s whatever happens.
    session_idle_s: int = Field(default=30 * 60, ge=60, le=24 * 3600)
    session_lifetime_s: int = Field(default=12 * 3600, ge=300, le=7 * 24 * 3600)
    # Console sign-in: a login is locked for login_lockout_s after login_failures failures within that time,
    # a client address (IPv6: /64) after login_client_failures (many logins tried from one place).
    login_failures: int = Field(default=5, ge=1, le=100)
    login_client_failures: int = Field(default=20, ge=1, le=1000)
    login_lockout_s: int = Field(default=15 * 60, ge=10, le=24 * 3600)

    # Fleet health (docs/operations.md): an agent is online while its last heartbeat is at most its interval
    # plus agent_online_grace_s old, stale up to agent_offline_after × interval (+ grace), offline beyond.
    # The interval is the one the agent reports; agent_heartbeat_interval_s is for agents too old to say.
    agent_heartbeat_interval_s: int = Field(default=30, ge=1, le=3600)
    agent_online_grace_s: int = Field(default=15, ge=0, le=3600)
    agent_offline_after: float = Field(default=3.0, ge=1.0, le=100.0)
    # text, json (one JSON object per line) or journald (native socket); --log-format overrides it.
    log_format: Literal["text", "json", "journald"] = "text"

    # HTTPS for the API (both or neither): `sekisho pki issue-api-cert` writes them from the site CA, whose
    # SHA-256 every enrolment token carries (api_ca_cert, default ca_cert, is the CA that signed them).
    api_tls_cert: Path | None = None
    api_tls_key: Path | None = None
    api_ca_cert: Path | None = None
    # Enrolment (controller/fleet): the CA that signs enrolled agents' certificates, the site CA itself or an
    # issuing sub-CA (`sekisho pki issuing-ca`) so the site CA's key can stay offline. Unset: no enrolment.
    enrol_ca_cert: Path | None = None
    enrol_ca_key: Path | None = None
    # Short-lived agent certificates, renewed by the agents at two thirds of their lifetime.
    agent_cert_days: int = Field(default=30, ge=1, le=825)
    # An agent's certificate with fewer days left becomes a `cert_expiring` finding (renewal at two thirds
    # of 30 days leaves ~10, so 7 means renewal has failed for days); past its end `cert_expired`.
    cert_warn_days: float = Field(default=7.0, ge=0.0, le=365.0)
    # What an enrolled agent is told: the URL it reaches this API at, and the agents' broker listener.
    enrol_url: str | None = Field(default=None, pattern=r"^https://[^\s/]+(:[0-9]+)?/?$")
    agent_broker_host: str | None = None
    agent_broker_port: int = Field(default=8883, ge=1, le=65535)
    # Alert rules, escalation and channels (issue 13; docs/alerts.md).
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    # Signed checkpoint heads appended, one JSON line each, to a file outside the database every heads_every_s
    # (docs/operations.md, "Receipts and the heads file"); keep it on another disk or host. Unset: not exported.
    heads_file: Path | None = None
    heads_every_s: int = Field(default=60, ge=1, le=24 * 3600)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Let environment variables override the TOML file (deployments inject secrets that way)."""
        return (env_settings, init_settings)

    @field_validator("api_tokens", "api_read_tokens")
    @classmethod
    def _tokens_strong(cls, tokens: list[SecretStr]) -> list[SecretStr]:
        for token in tokens:
            if len(token.get_secret_value()) < 24:
                raise ValueError(_("API tokens must be at least 24 characters"))
        return tokens

    @model_validator(mode="after")
    def _network_needs_tokens(self) -> ControllerConfig:
        # Production always authenticates (console users, their API tokens, legacy tokens). The dev profile
        # without tokens is open until the first console user exists, which only loopback may see.
        if (
            self.profile == "dev"
            and not self.api_tokens
            and not self.api_read_tokens
            and not is_loopback(self.http_host)
        ):
            raise ValueError(
                f"http_host {self.http_host!r} is not a loopback address: without api_tokens the API would be "
                "open to the network; set api_tokens or bind to 127.0.0.1"
            )
        return self

    @model_validator(mode="after")
    def _pairs(self) -> ControllerConfig:
        # Half a pair is a typo, not a choice: refuse it rather than serve plain HTTP or enrol with no CA.
        for cert, key in (("api_tls_cert", "api_tls_key"), ("enrol_ca_cert", "enrol_ca_key")):
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                raise ValueError(_("%(cert)s and %(key)s go together: set both or neither", cert=cert, key=key))
        return self

    @model_validator(mode="after")
    def _chain_verify_periods(self) -> ControllerConfig:
        # The walk from the start is the expensive one: more often than the incremental one is a mistake.
        if self.chain_verify_full_every_s < self.chain_verify_every_s:
            raise ValueError(_("chain_verify_full_every_s must not be shorter than chain_verify_every_s"))
        return self

    @model_validator(mode="after")
    def _one_scope_per_token(self) -> ControllerConfig:
        values = [t.get_secret_value() for t in (*self.api_tokens, *self.api_read_tokens)]
        if len(set(values)) != len(values):
            # A token listed twice, or as both write and read, has no single scope: refuse rather than guess.
            raise ValueError(_("each API token may appear only once, in api_tokens or in api_read_tokens"))
        return self

    def resolved_database_url(self) -> str:
        """Return the database URL, defaulting to SQLite in var_dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.var_dir / 'controller.db').resolve()}"


def is_loopback(host: str) -> bool:
    """Tell whether an http_host binds to loopback only (127.0.0.0/8, ::1 or the name localhost)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        # Any other name may resolve to a public address; "" and "0.0.0.0" bind everywhere.
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(data)
    for key in (
        "var_dir",
        "ca_cert",
        "tls_cert",
        "tls_key",
        "signing_key",
        "api_tls_cert",
        "api_tls_key",
        "api_ca_cert",
        "enrol_ca_cert",
        "enrol_ca_key",
        "revocation_list",
        "heads_file",
    ):
        if key in out and not Path(out[key]).is_absolute():
            out[key] = str((base / out[key]).resolve())
    alerts = out.get("alerts")
    if isinstance(alerts, dict):
        alerts = dict(alerts)
        if isinstance(alerts.get("smtp"), dict):
            alerts["smtp"] = _resolve_paths_in(alerts["smtp"], base)
        hooks = alerts.get("webhooks")
        if isinstance(hooks, dict):
            alerts["webhooks"] = {n: _resolve_paths_in(w, base) if isinstance(w, dict) else w for n, w in hooks.items()}
        out["alerts"] = alerts
    return out


def _resolve_paths_in(table: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(table)
    for key in ("password_file", "secret_file", "tls_cafile"):
        if key in out and not Path(out[key]).is_absolute():
            out[key] = str((base / out[key]).resolve())
    return out


def load_config(path: Path) -> ControllerConfig:
    """Load a controller TOML file; relative paths resolve against the file's directory."""
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    return ControllerConfig(**_resolve_paths(data, path.resolve().parent))
