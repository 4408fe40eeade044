"""MQTT topic layout. One agent's topics all live under its own prefix so one ACL pattern confines it.

sekisho/v1/agents/{agent}/events      agent → controller   signed events, QoS 1
sekisho/v1/agents/{agent}/heartbeat   agent → controller   signed heartbeats, QoS 0
sekisho/v1/agents/{agent}/acks        controller → agent   signed "stored" acknowledgements, QoS 1
sekisho/v1/agents/{agent}/policy      controller → agent   signed policy bundle, QoS 1, retained
sekisho/v1/agents/{agent}/commands    controller → agent   signed commands, QoS 1
"""

from __future__ import annotations

import re

from sekisho.protocol import errors

ROOT = "sekisho/v1/agents"
AGENT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
SHARE_GROUP = "controllers"
# MQTT client ids are one namespace for the whole broker. An agent's client id is its agent id (the broker
# sets it to the certificate's CN); every controller client id starts with this prefix, which no agent id
# issued by `sekisho pki issue-agent` may start with, so neither can take over the other's session.
CONTROLLER_CLIENT_PREFIX = "controller"

EVENTS = "events"
HEARTBEAT = "heartbeat"
ACKS = "acks"
POLICY = "policy"
COMMANDS = "commands"
CHANNELS = (EVENTS, HEARTBEAT, ACKS, POLICY, COMMANDS)


def check_agent_id(agent_id: str) -> str:
    """Return the agent id if it is valid (lower-case, digits, '-', '_'; it is also a cert CN)."""
    if not isinstance(agent_id, str) or not AGENT_ID.match(agent_id):
        raise errors.Rejected(errors.MALFORMED, f"invalid agent id {agent_id!r}")
    return agent_id


def topic(agent_id: str, channel: str) -> str:
    """Return the topic of one agent's channel."""
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}")
    return f"{ROOT}/{check_agent_id(agent_id)}/{channel}"


def all_agents(channel: str, *, shared_group: str | None = None) -> str:
    """Return the wildcard subscription for a channel of every agent (optionally a shared one)."""
    filt = f"{ROOT}/+/{channel}"
    return f"$share/{shared_group}/{filt}" if shared_group else filt


def parse(topic_name: str) -> tuple[str, str]:
    """Split a topic into (agent id, channel), raising Rejected for anything outside the layout."""
    prefix = ROOT + "/"
    if not topic_name.startswith(prefix):
        raise errors.Rejected(errors.MALFORMED, f"topic outside {ROOT}")
    parts = topic_name[len(prefix) :].split("/")
    if len(parts) != 2 or parts[1] not in CHANNELS:
        raise errors.Rejected(errors.MALFORMED, f"unexpected topic {topic_name!r}")
    return check_agent_id(parts[0]), parts[1]
