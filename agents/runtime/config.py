"""Agent configuration: a TOML file plus `SEKISHO_AGENT_*` environment overrides, validated and frozen."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from sekisho.agents.runtime.errors import ConfigError
from sekisho.protocol import topics

# Files the agent must be able to read before it does anything (fail closed without them).
KEY_FIELDS = ("ca_cert", "tls_cert", "tls_key", "signing_key", "controller_public_key")
PATH_FIELDS = (*KEY_FIELDS, "state_dir", "controller_ca_cert")


class AgentConfig(BaseSettings):
    """Everything one endpoint agent needs; unknown keys are an error."""

    model_config = SettingsConfigDict(env_prefix="SEKISHO_AGENT_", extra="forbid", frozen=True)

    agent_id: str
    broker_host: str = "127.0.0.1"
    broker_port: int = Field(default=8883, ge=1, le=65535)
    ca_cert: Path
    tls_cert: Path
    tls_key: Path
    signing_key: Path = Field(description="the agent's Ed25519 key that signs its events and heartbeats")
    controller_public_key: Path = Field(description="verifies acks, policy bundles and commands")
    state_dir: Path = Field(description="outbox, policy cache and nonce store live here")
    # Enrolled agents (`sekisho-agent enrol`) renew their certificate here before two thirds of its lifetime;
    # controller_ca_cert is the CA of the controller's HTTPS certificate when it is not ca_cert.
    controller_url: str | None = Field(default=None, pattern=r"^https://[^\s/]+(:[0-9]+)?/?$")
    controller_ca_cert: Path | None = None

    heartbeat_interval_s: float = Field(default=30, gt=0, le=3600)
    resend_after_s: float = Field(default=30, gt=0, le=24 * 3600)
    max_inflight: int = Field(default=1000, ge=1, le=65_535)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30, gt=0)
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0, le=2**32 - 1)
    outbox_sync: Literal["full", "normal"] = "full"
    # node_exporter textfile (a *.prom path, absolute), rewritten after each heartbeat; None: not written.
    metrics_textfile: Path | None = None
    # text, json (one JSON object per line) or journald (native socket); --log-format overrides it.
    log_format: Literal["text", "json", "journald"] = "text"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Let environment variables override the TOML file (passed in as init arguments)."""
        return (env_settings, init_settings)

    @field_validator("agent_id")
    @classmethod
    def _valid_agent_id(cls, value: str) -> str:
        # The agent id is also the MQTT client id, the certificate CN and a topic level.
        if not topics.AGENT_ID.match(value):
            raise ValueError(f"must match {topics.AGENT_ID.pattern}")
        return value

    @field_validator("metrics_textfile")
    @classmethod
    def _textfile_path(cls, value: Path | None) -> Path | None:
        # node_exporter reads only *.prom files; an absolute path because the agent's working directory varies.
        if value is not None and (not value.is_absolute() or value.suffix != ".prom"):
            raise ValueError("must be an absolute path ending in .prom")
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> AgentConfig:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s must not exceed reconnect_max_s")
        return self

    @property
    def outbox_path(self) -> Path:
        """Return the outbox database path."""
        return self.state_dir / "outbox.sqlite3"

    @property
    def nonce_path(self) -> Path:
        """Return the command nonce store path."""
        return self.state_dir / "nonces.sqlite3"


def _resolve(data: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(data)
    for key in PATH_FIELDS:
        if key in out and isinstance(out[key], str | Path) and not Path(out[key]).is_absolute():
            out[key] = str(base / out[key])
    return out


def _describe(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        where = ".".join(str(p) for p in item.get("loc", ())) or "config"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)


def check_key_files(config: AgentConfig) -> None:
    """Raise ConfigError unless every certificate and key file exists and is readable."""
    problems = []
    for name in KEY_FIELDS:
        path: Path = getattr(config, name)
        if not path.is_file():
            problems.append(f"{name} {path} does not exist")
            continue
        try:
            with path.open("rb") as handle:
                handle.read(1)
        except OSError as err:
            problems.append(f"{name} {path} is not readable ({err.strerror})")
    if problems:
        raise ConfigError("; ".join(problems))


def load_config(path: Path, *, check_files: bool = True) -> AgentConfig:
    """Load an agent TOML file; relative paths (also from the environment) resolve against its directory."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config {path} is not valid TOML: {err}") from err
    base = path.resolve().parent
    try:
        config = AgentConfig(**_resolve(data, base))
    except ValidationError as err:
        raise ConfigError(f"invalid config {path}: {_describe(err)}") from err
    # Environment overrides arrive after the TOML paths were resolved, so resolve once more.
    update = {
        name: base / path
        for name in PATH_FIELDS
        if (path := getattr(config, name)) is not None and not path.is_absolute()
    }
    if update:
        config = config.model_copy(update=update)
    if check_files:
        check_key_files(config)
    return config
