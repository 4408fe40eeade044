"""Verified points (migration 0012): a worker's first page starts where the background walk verified, signed.

The pages trust a point only if the controller's signature over it verifies and the record at its index
still has the recorded hash; a row edited inside the verified prefix is missed by the page until the next
background walk from the start (then the page says broken) and named at once by `records verify`.
"""

from __future__ import annotations

import threading
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import ValidationError
from reports_fixtures import T0, Site
from sqlalchemy import select, update

from sekisho.controller.config import ControllerConfig
from sekisho.controller.reports.filters import Filter
from sekisho.controller.reports.service import Reports
from sekisho.controller.reports.verify import ChainCheck, PointRefresher, WalkStopped
from sekisho.controller.store import Store
from sekisho.controller.store.models import Event, VerifiedPoint

if TYPE_CHECKING:
    from store_fixtures import MakeAgent

TERM = "term-hr-01"


@pytest.fixture
def site(store: Store, make_agent: MakeAgent) -> Site:
    site = Site(store, make_agent)
    for minute in range(6):
        site.login("p-0001", "mihon.taro", T0 + timedelta(minutes=minute))
    return site


def _page(site: Site) -> Reports:
    """A fresh worker's view (no walk cached in this process), at the site's clock."""
    return Reports(site.store, clock=site.clock)


def _edit_first_login(site: Site) -> None:
    with site.store.engine.begin() as conn:
        first = select(Event.id).where(Event.agent_id == TERM, Event.chain_index == 1).scalar_subquery()
        conn.execute(update(Event).where(Event.id == first).values(payload={"terminal": "t-hr-99"}))


def test_first_page_starts_at_the_signed_point_and_says_so(site: Site) -> None:
    found = ChainCheck(site.store, clock=site.clock).refresh_points("controller-test")
    assert found[TERM] is None and found["checkpoints"] is None
    with site.store.engine.connect() as conn:
        point = conn.execute(select(VerifiedPoint).where(VerifiedPoint.chain == TERM)).one()
    assert (point.chain_index, point.verified_by) == (6, "controller-test")
    # Stored after the walk: the page checks these incrementally.
    site.login("p-0001", "mihon.taro", T0 + timedelta(minutes=10))
    status = _page(site).page("logins", Filter()).verification
    assert status.state == "verified" and status.since == site.clock()
    assert "by full walk, incremental since" in status.text("en") and "以降は差分検証" in status.text("ja")
    # Without points (a store with no controller key cannot check them) a page walks from the start, and says so.
    walked = ChainCheck(site.store, points=False).check([TERM])
    assert walked.state == "verified" and walked.since is None and "(full walk)" in walked.text("en")


def test_edit_inside_the_verified_prefix_found_by_records_verify_now_and_by_the_next_background_walk(
    site: Site,
) -> None:
    checker = ChainCheck(site.store, clock=site.clock)
    checker.refresh_points("controller-test")
    _edit_first_login(site)
    # records verify walks from the start: it names the edited record at once.
    problems = site.store.verify_chains(TERM, signatures=True)
    assert problems and problems[0].chain_index == 1
    # A page trusts the signed point (the record at the point is untouched): it cannot see the edit yet.
    assert _page(site).page("logins", Filter()).verification.state == "verified"
    # The background walk from the start finds it and records it in the point; the next page says broken.
    assert "chain index 1" in (checker.refresh_points("controller-test")[TERM] or "")
    status = _page(site).page("logins", Filter()).verification
    assert status.state == "broken" and "chain index 1" in status.problems[0], status.problems


def test_a_database_writer_cannot_forge_or_reuse_a_point(site: Site) -> None:
    ChainCheck(site.store, clock=site.clock).refresh_points("controller-test")
    _edit_first_login(site)
    # Without the controller's key, moving the point (here: only its time) breaks its signature: the page
    # then walks from the start and finds the edit.
    with site.store.engine.begin() as conn:
        conn.execute(
            update(VerifiedPoint).where(VerifiedPoint.chain == TERM).values(verified_at=T0 + timedelta(days=1))
        )
    status = _page(site).page("logins", Filter()).verification
    # Found although inside the prefix the point covered: the chain was walked from the start.
    assert status.state == "broken" and "chain index 1" in status.problems[0], status.problems


def test_the_record_at_the_point_changed_means_a_walk_from_the_start(site: Site) -> None:
    ChainCheck(site.store, clock=site.clock).refresh_points("controller-test")
    with site.store.engine.begin() as conn:
        conn.execute(update(Event).where(Event.agent_id == TERM, Event.chain_index == 6).values(hash="f" * 64))
    status = _page(site).page("logins", Filter()).verification
    assert status.state == "broken" and "chain index 6" in status.problems[0], status.problems


def test_the_periodic_job_refreshes_and_another_worker_skips_a_fresh_round(site: Site) -> None:
    job = PointRefresher(site.store, "controller-a")
    job.run_once()
    assert job.last[TERM] is None
    other = PointRefresher(site.store, "controller-b")
    other.run_once()  # the points are minutes old: nothing to do
    assert other.last == {}
    with site.store.engine.connect() as conn:
        assert set(conn.execute(select(VerifiedPoint.verified_by)).scalars()) == {"controller-a"}


def test_a_stopping_controller_ends_the_walk_at_its_next_pause(site: Site) -> None:
    # systemd's stop must not wait for a walk of millions of records: the walk ends at its next pause, and
    # the job's round ends quietly (the next start walks again).
    stop = threading.Event()
    stop.set()
    with pytest.raises(WalkStopped):
        ChainCheck(site.store, clock=site.clock).refresh("controller-test", full=True, pause_s=0.0, stop=stop)
    job = PointRefresher(site.store, "controller-a")
    job._stop.set()  # what PeriodicJob.stop() sets
    job.run_once()
    assert job.refreshed is None and job.last == {}
    # Not stopped: the same walk records its points.
    assert ChainCheck(site.store, clock=site.clock).refresh("controller-test", full=True, pause_s=0.0).problems


# --- incremental and full refreshes ----------------------------------------------------------------------


def test_incremental_refresh_walks_only_the_records_since_the_point_and_the_page_says_so(site: Site) -> None:
    checker = ChainCheck(site.store, clock=site.clock)
    first = checker.refresh("controller-test", full=True)
    assert first.walks[TERM] == "full" and first.walked[TERM] == 6 and first.problems[TERM] is None
    full_at = site.clock()
    site.login("p-0001", "mihon.taro", T0 + timedelta(minutes=20))
    site.login("p-0001", "mihon.taro", T0 + timedelta(minutes=21))
    site.clock.now += timedelta(minutes=10)
    second = ChainCheck(site.store, clock=site.clock).refresh("controller-test", full=False)
    assert second.walks[TERM] == "incremental" and second.walked[TERM] == 2 and second.problems[TERM] is None
    assert second.walks["checkpoints"] == "incremental"
    # Nothing new: the next incremental refresh walks nothing.
    third = ChainCheck(site.store, clock=site.clock).refresh("controller-test", full=False)
    assert third.walked[TERM] == 0 and third.problems[TERM] is None
    with site.store.engine.connect() as conn:
        point = conn.execute(select(VerifiedPoint).where(VerifiedPoint.chain == TERM)).one()
    assert point.chain_index == 8
    # The page starts from the extended point and says both times: the walk from the start, the extension.
    status = _page(site).page("logins", Filter()).verification
    assert status.state == "verified" and status.full_at == full_at and status.since == site.clock()
    en, ja = status.text("en"), status.text("ja")
    assert "full walk from the start at 2026-11-17 21:00 JST, extended at 2026-11-17 21:10 JST" in en, en
    assert "2026-11-17 21:00 JSTに全件検証、2026-11-17 21:10 JSTに差分検証で延長、以降は差分検証" in ja, ja


def test_edit_inside_the_prefix_is_missed_by_the_incremental_refresh_found_by_the_full_walk(site: Site) -> None:
    ChainCheck(site.store, clock=site.clock).refresh("controller-test", full=True)
    _edit_first_login(site)
    site.login("p-0001", "mihon.taro", T0 + timedelta(minutes=20))
    incremental = ChainCheck(site.store, clock=site.clock).refresh("controller-test", full=False)
    # It only looks at what follows the point: the edit behind it is not seen.
    assert incremental.walked[TERM] == 1 and incremental.problems[TERM] is None
    assert _page(site).page("logins", Filter()).verification.state == "verified"
    # records verify walks from the start: named at once.
    problems = site.store.verify_chains(TERM, signatures=True)
    assert problems and problems[0].chain_index == 1
    # The next full walk finds it and records it; pages say broken.
    full = ChainCheck(site.store, clock=site.clock).refresh("controller-test", full=True)
    assert full.walks[TERM] == "full" and "chain index 1" in (full.problems[TERM] or "")
    status = _page(site).page("logins", Filter()).verification
    assert status.state == "broken" and "chain index 1" in status.problems[0], status.problems
    # An incremental refresh leaves a broken point as it is (only a walk from the start looks again).
    after = ChainCheck(site.store, clock=site.clock).refresh("controller-test", full=False)
    assert after.walked[TERM] == 0 and "chain index 1" in (after.problems[TERM] or "")
    assert _page(site).page("logins", Filter()).verification.state == "broken"


def test_no_point_or_a_forged_point_means_a_walk_from_the_start_for_that_chain(site: Site) -> None:
    # First start: no points at all, so the incremental refresh walks everything from the start.
    first = ChainCheck(site.store, clock=site.clock).refresh("controller-test", full=False)
    assert first.walks == {"checkpoints": "full", TERM: "full"} and first.walked[TERM] == 6
    site.login("p-0001", "mihon.taro", T0 + timedelta(minutes=20))
    # A database writer moves the point's time: its signature no longer verifies.
    with site.store.engine.begin() as conn:
        conn.execute(
            update(VerifiedPoint).where(VerifiedPoint.chain == TERM).values(verified_at=T0 + timedelta(days=1))
        )
    refreshed = ChainCheck(site.store, clock=site.clock).refresh("controller-test", full=False)
    # That chain alone is walked from the start (all 7 records, not the 1 since the point); the log goes on
    # from its own point.
    assert refreshed.walks == {"checkpoints": "incremental", TERM: "full"}
    assert refreshed.walked[TERM] == 7 and refreshed.problems[TERM] is None
    # A forged log point: the whole refresh starts from the start.
    with site.store.engine.begin() as conn:
        conn.execute(update(VerifiedPoint).where(VerifiedPoint.kind == "log").values(verified_by="controller-evil"))
    again = ChainCheck(site.store, clock=site.clock).refresh("controller-test", full=False)
    assert again.walks["checkpoints"] == "full"


def test_the_job_refreshes_incrementally_every_period_and_from_the_start_every_full_period(site: Site) -> None:
    job = PointRefresher(site.store, "controller-a", every_s=600, full_every_s=3600, clock=site.clock, pause_s=0)
    assert job.due() == "full"  # no point yet
    job.run_once()
    assert job.refreshed is not None and job.refreshed.walks[TERM] == "full"
    site.clock.now += timedelta(minutes=4)
    assert job.due() is None  # refreshed less than half a period ago (by this or another worker)
    site.clock.now += timedelta(minutes=6)
    site.login("p-0001", "mihon.taro", T0 + timedelta(minutes=30))
    job.run_once()
    assert job.refreshed.walks[TERM] == "incremental" and job.refreshed.walked[TERM] == 1
    site.clock.now += timedelta(minutes=45)
    assert job.due() == "incremental"
    site.clock.now += timedelta(minutes=6)  # 61 minutes after the walk from the start
    assert job.due() == "full"
    job.run_once()
    assert job.refreshed.walks[TERM] == "full" and job.refreshed.walked[TERM] == 7


def test_the_periods_come_from_controller_toml() -> None:
    base: dict[str, Any] = {"ca_cert": "ca.pem", "tls_cert": "c.pem", "tls_key": "c.key", "signing_key": "signing.key"}
    default = ControllerConfig(**base)
    assert (default.chain_verify_every_s, default.chain_verify_full_every_s) == (600, 86400)
    config = ControllerConfig(**base, chain_verify_every_s=300, chain_verify_full_every_s=7200)
    assert (config.chain_verify_every_s, config.chain_verify_full_every_s) == (300, 7200)
    with pytest.raises(ValidationError, match="chain_verify_every_s より短くできません"):  # tests run in ja
        ControllerConfig(**base, chain_verify_every_s=3600, chain_verify_full_every_s=1800)
    with pytest.raises(ValidationError, match="chain_verify_every_s"):
        ControllerConfig(**base, chain_verify_every_s=0)
    # The shipped example names them with their defaults.
    example = tomllib.loads((Path(__file__).parents[1] / "controller" / "controller.toml.example").read_text())
    assert (example["chain_verify_every_s"], example["chain_verify_full_every_s"]) == (600, 86400)
