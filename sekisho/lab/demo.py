"""`sekisho demo`: a whole site on this machine — broker, controller, simulated agents — until Ctrl-C."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from sekisho.lab import Lab

console = Console()
DEMO_POLICY = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "site.yaml"
DEMO_AGENTS = ("term-hr-01", "term-acc-01", "door-hr-01")
DEMO_USB_TERMINALS = {"term-hr-01": "t-hr-01"}
DEMO_DOOR_AGENTS = ("door-hr-01",)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback URL built here
        return json.loads(response.read())


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the controller exited during start-up; see var/demo/logs/controller-1.log")
        try:
            if _get(f"{url}/readyz")["status"] == "ok":
                return
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass
        time.sleep(0.3)
    raise RuntimeError("the controller did not become ready in time")


def _demo_ran_here(root: Path) -> bool:
    """Tell whether an earlier demo left its site (CA, controller database) under root."""
    return (root / "pki" / "ca.crt").exists() or (root / "controller" / "controller.db").exists()


def _start_over(root: Path) -> None:
    """Remove an earlier demo's state, refusing anything that is not a demo site."""
    root = root.resolve()
    known = {"pki", "broker", "controller", "agents", "logs"}
    strangers = sorted(p.name for p in root.iterdir() if p.name not in known)
    if strangers:
        # --fresh deletes a whole folder: only one that holds nothing but what the demo writes.
        raise typer.BadParameter(f"{root} holds more than a demo site ({', '.join(strangers)}); not removing it")
    shutil.rmtree(root)


def _lend_demo_medium(lab: Lab, base: str) -> str:
    """Lend the demo medium for the next 8 hours, or keep the loan an earlier run made if it still runs."""
    now = datetime.now(UTC)
    open_loans = _get(f"{base}/api/v1/media/loans?active=true&medium=m-0001")
    for loan in open_loans:
        if loan["person"] == "p-0001" and datetime.fromisoformat(loan["ends_at"]) > now:
            return f"{loan['id']} from the earlier run is still open (due {loan['ends_at']})"
        # An overdue loan of an earlier run comes back first, as its borrower would bring it.
        lab.sekisho("media", "return", loan["id"], "--received-by", "p-0002", "--config", str(lab.controller_config))
    lent = lab.sekisho(
        "media", "lend", "m-0001", "--person", "p-0001", "--terminal", "t-hr-01",
        "--until", (now + timedelta(hours=8)).isoformat(timespec="seconds"),
        "--purpose", "給与データの提出 (demo)", "--approved-by", "p-0002", "--config", str(lab.controller_config),
    )  # fmt: skip
    return (lent.stdout.strip().splitlines() or ["lent"])[-1]


class DemoView:
    """The live view: the newest events (followed page by page) and the door registers as they fill."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.after_id: int | None = None
        self.latest: deque[dict[str, Any]] = deque(maxlen=12)
        self.total = 0

    def _follow(self) -> None:
        while True:
            query = f"?limit=1000&after_id={self.after_id}" if self.after_id is not None else "?limit=1000"
            page = _get(f"{self.base}/api/v1/events{query}")
            self.latest.extend(page["items"])
            self.total += len(page["items"])
            if page["items"]:
                self.after_id = page["items"][-1]["id"]
            if page["next_after_id"] is None:
                return

    def table(self) -> Table:
        """Fetch what is new and render it."""
        table = Table(title="sekisho demo — 最近のイベント / latest events (Ctrl-C で停止 / to stop)")
        for column in ("時刻 (UTC)", "agent", "seq", "type", "detail"):
            table.add_column(column)
        try:
            self._follow()
            agents = _get(f"{self.base}/api/v1/agents")
            findings = _get(f"{self.base}/api/v1/findings?open_only=true")
            dead = _get(f"{self.base}/api/v1/dead-letters?limit=1000")
            inside = _get(f"{self.base}/api/v1/areas/presence")
            loans = _get(f"{self.base}/api/v1/keys/loans?open=true")["items"]
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            table.caption = "controller not answering…"
            return table
        for event in self.latest:
            payload = event["payload"]
            detail = ", ".join(
                f"{k}={v}"
                for k, v in payload.items()
                if k in ("door", "terminal", "person", "reason", "alarm", "user", "key", "cause") and v is not None
            )
            table.add_row(event["occurred_at"][11:19], event["agent_id"], str(event["seq"]), event["type"], detail)
        depth = ", ".join(f"{a['id']}: outbox {a['outbox_depth']}, policy v{a['policy_version']}" for a in agents)
        people = ", ".join(f"{p['person']}{' (来訪者/visitor)' if p['visitor'] else ''}" for p in inside) or "-"
        keys = ", ".join(f"{loan['key']}→{loan['person']}" for loan in loans) or "-"
        table.caption = (
            f"events {self.total}  dead letters {len(dead)}  open findings {len(findings)}\n"
            f"在室 / inside now: {people}\n貸出中の鍵 / keys out: {keys}\n{depth}"
        )
        return table


def demo(
    root: Annotated[Path, typer.Option(help="where the demo keeps its state")] = Path("var/demo"),
    duration: Annotated[float, typer.Option(help="stop after this many seconds (0: until Ctrl-C)")] = 0,
    interval: Annotated[float, typer.Option(help="mean seconds between simulated visits per agent")] = 1.5,
    fresh: Annotated[bool, typer.Option("--fresh", help="remove an earlier run's state and start over")] = False,
) -> None:
    """Run a demo site: its own mosquitto (mTLS + ACL), the controller on SQLite, simulated agents."""
    earlier = _demo_ran_here(root)
    if earlier and fresh:
        _start_over(root)
        console.print(f"--fresh: removed the earlier demo site under {root.resolve()}")
    elif earlier:
        # Keep the earlier site (CA, registers, agents' outboxes and sequence numbers): a re-run continues it.
        console.print(f"continuing the demo site of an earlier run under {root.resolve()} (--fresh starts over)")
    lab = Lab(root)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        console.print(f"[bold]sekisho demo[/bold] — state under {lab.root}")
        lab.start_broker()
        console.print(
            f"  broker: mosquitto with mutual TLS + per-agent ACL, agents on 127.0.0.1:{lab.broker.port}, "
            f"controllers on 127.0.0.1:{lab.broker.controller_port}"
        )
        lab.write_controller_config()
        for name in DEMO_AGENTS:
            lab.add_agent(name, heartbeat_interval_s=5)
        lab.register_agents(*DEMO_AGENTS)
        controller = lab.spawn_controller(http=True)
        base = f"http://127.0.0.1:{lab.http_port}"
        _wait_ready(base, controller)
        applied = lab.sekisho("policy", "apply", str(DEMO_POLICY), "--config", str(lab.controller_config))
        console.print("  policy: " + (applied.stdout.strip().splitlines() or ["applied"])[-1])
        # A medium lent to 見本 太郎 (p-0001) for the payroll terminal, approved by the area manager:
        # the terminal allows it read-only for him and blocks it for anyone else.
        console.print("  media loan: " + _lend_demo_medium(lab, base))
        for name in DEMO_AGENTS:
            config = str(lab.agent_config(name))
            if name in DEMO_DOOR_AGENTS:
                # The door box runs the real door agent on OSDP reader stubs and the locker board stub.
                door_module = "sekisho.agents.sim.doors"
                lab.spawn("--config", config, "--interval", str(interval), log_name=name, module=door_module)
                continue
            usb = ["--usb-terminal", DEMO_USB_TERMINALS[name]] if name in DEMO_USB_TERMINALS else []
            lab.spawn("--config", config, "--interval", str(interval), *usb, log_name=name, module="sekisho.agents.sim")
        console.print(f"  controller API: {base}/docs   events: {base}/api/v1/events")
        console.print(f"  verify records: sekisho records verify --config {lab.controller_config}")
        console.print(f"  logs: {lab.root / 'logs'}")
        started = time.monotonic()
        view = DemoView(base)
        with Live(view.table(), console=console, refresh_per_second=1, transient=False) as live:
            while not stop.is_set() and (duration <= 0 or time.monotonic() - started < duration):
                stop.wait(2.0)
                live.update(view.table())
    finally:
        console.print("stopping…")
        lab.stop_all()
        console.print("stopped. State kept in " + str(lab.root))
