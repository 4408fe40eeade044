"""Enrolment on a lab site: the controller API over HTTPS, tokens, and many devices enrolled at once.

`enrol_fleet` is what `sekisho bench fleet` times for "enrol 100 agents": every device makes its keys,
pins the CA from its token and enrols over HTTPS, as `sekisho-agent enrol` does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import uvicorn

from sekisho.agents.runtime.enrol_client import Enrolled, enrol
from sekisho.controller.api.app import create_app
from sekisho.controller.api.deps import AppState
from sekisho.controller.api.https import tls_options
from sekisho.controller.config import ControllerConfig
from sekisho.controller.fleet.enrol_service import EnrolmentService
from sekisho.controller.store.store import Store
from sekisho.deploy.pki import ISSUING_CA_DIR, CaPaths, api_identity, init_issuing_ca, issue_api_cert
from sekisho.lab import Lab
from sekisho.protocol import timefmt


def enrolment_settings(lab: Lab, *, sub_ca: bool = True, cert_days: int = 30) -> dict[str, object]:
    """Issue the API's HTTPS certificate (and an issuing sub-CA) in the lab's PKI; return controller.toml keys."""
    api = api_identity(lab.pki_dir)
    if not api.cert.exists():
        issue_api_cert(lab.pki_dir, ["localhost"])
    issuing = CaPaths.at(lab.pki_dir / ISSUING_CA_DIR) if sub_ca else CaPaths.at(lab.pki_dir)
    if sub_ca and not issuing.cert.exists():
        init_issuing_ca(lab.pki_dir)
    return {
        "api_tls_cert": str(api.cert),
        "api_tls_key": str(api.key),
        "enrol_ca_cert": str(issuing.cert),
        "enrol_ca_key": str(issuing.key),
        "agent_cert_days": cert_days,
        "agent_broker_host": "127.0.0.1",
        "agent_broker_port": lab.broker.port,
    }


@contextmanager
def https_api(
    config: ControllerConfig, store: Store, *, clock: Callable[[], datetime] = timefmt.now, timeout: float = 15
) -> Iterator[str]:
    """Serve the controller's API (as `controller serve` does, TLS included) in a thread; yield its URL."""
    app = create_app(AppState(config, store, None, clock=clock))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=config.http_port, log_level="warning", **tls_options(config))
    )
    thread = threading.Thread(target=server.run, name="lab-https-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the API did not start on port {config.http_port} within {timeout} s")
        time.sleep(0.02)
    try:
        # "localhost": the name the lab's API certificate carries (deploy/pki.py DEFAULT_HOSTS).
        yield f"https://localhost:{config.http_port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


@dataclass(frozen=True)
class FleetEnrolment:
    """The agents enrolled by enrol_fleet, and how long it took."""

    agents: list[Enrolled]
    seconds: float


def enrol_fleet(
    service: EnrolmentService,
    url: str,
    root: Path,
    count: int,
    *,
    kind: str = "terminal",
    prefix: str = "bench",
    workers: int = 8,
) -> FleetEnrolment:
    """Enrol `count` devices named PREFIX-0001… under root/NAME with one token of `count` uses; time it all."""
    token = service.create_token(
        kind=kind, expires_in=timedelta(hours=1), uses=count, created_by="lab", controller_url=url
    ).token

    def one(index: int) -> Enrolled:
        name = f"{prefix}-{index:04d}"
        # Each simulated device has a machine-id of its own, as real ones do.
        return enrol(token, root / name, kind=kind, name=name, machine_id=f"lab-{prefix}-{index:08d}")

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        agents = list(pool.map(one, range(1, count + 1)))
    return FleetEnrolment(agents=agents, seconds=time.perf_counter() - started)
