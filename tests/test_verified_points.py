"""Verified points (migration 0012): a worker's first page starts where the background walk verified, signed.

The pages trust a point only if the controller's signature over it verifies and the record at its index
still has the recorded hash; a row edited inside the verified prefix is missed by the page until the next
background walk from the start (then the page says broken) and named at once by `records verify`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import pytest
from reports_fixtures import T0, Site
from sqlalchemy import select, update

from sekisho.controller.reports.filters import Filter
from sekisho.controller.reports.service import Reports
from sekisho.controller.reports.verify import ChainCheck, PointRefresher
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
