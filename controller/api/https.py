"""HTTPS for the controller's API: the uvicorn options from controller.toml (api_tls_cert, api_tls_key)."""

from __future__ import annotations

import ssl
from typing import Any

from sekisho.controller.config import ControllerConfig


def tls_options(config: ControllerConfig) -> dict[str, Any]:
    """Return uvicorn's TLS keyword arguments, or none when the API serves plain HTTP (loopback, behind a proxy)."""
    if config.api_tls_cert is None or config.api_tls_key is None:
        return {}
    # Checked here so a wrong pair stops `controller serve` with the reason, not at the first handshake.
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(config.api_tls_cert, config.api_tls_key)
    return {"ssl_certfile": str(config.api_tls_cert), "ssl_keyfile": str(config.api_tls_key)}


def api_scheme(config: ControllerConfig) -> str:
    """Return "https" when the API is served over TLS, else "http"."""
    return "https" if config.api_tls_cert is not None else "http"
