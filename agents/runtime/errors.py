"""Start-up and runtime failures of the agent, sorted by what a supervisor should do about them."""

from __future__ import annotations

import os


class AgentError(Exception):
    """Base of the agent's own errors; `exit_code` tells a supervisor how to react."""

    exit_code = 1


class ConfigError(AgentError):
    """The configuration or a key file is missing, unreadable or invalid: fix it, do not retry."""

    exit_code = os.EX_CONFIG


class OutboxError(AgentError):
    """The outbox cannot be opened or is damaged: stop rather than risk losing recorded events."""

    exit_code = os.EX_IOERR


class OutboxFull(OutboxError):
    """The outbox's disk is full: this event was not recorded (nothing else was lost); free space to go on."""


class AlreadyRunning(AgentError):
    """Another agent process holds this state directory."""

    exit_code = os.EX_TEMPFAIL
