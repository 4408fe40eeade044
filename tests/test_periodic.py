"""PeriodicJob: rounds every every_s, a poke runs the next round at once, stop ends the wait too."""

from __future__ import annotations

import threading
import time

from sekisho.controller.periodic import PeriodicJob


class Counting(PeriodicJob):
    name = "counting"
    every_s = 3600.0  # far longer than the test: only a poke (or the start) makes a round

    def __init__(self) -> None:
        self.rounds = 0
        self.ran = threading.Event()
        super().__init__()

    def run_once(self) -> None:
        self.rounds += 1
        self.ran.set()


def _wait_for(job: Counting, rounds: int) -> bool:
    deadline = time.monotonic() + 10
    while job.rounds < rounds and time.monotonic() < deadline:
        job.ran.wait(0.1)
        job.ran.clear()
    return job.rounds >= rounds


def test_a_poke_runs_the_next_round_now_and_stop_does_not_wait_for_the_period() -> None:
    job = Counting()
    job.start()
    try:
        assert _wait_for(job, 1)  # the first round runs at the start
        job.poke()
        assert _wait_for(job, 2)  # ...and the poke, not the hour, brought the second
        time.sleep(0.2)
        assert job.rounds == 2  # one poke, one round: the wake is cleared after it
    finally:
        job.stop()
    assert not job.running  # stop woke the hour-long wait
