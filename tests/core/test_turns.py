"""Turns under the adaptive window's pace, on the event loop's own clock: an attempt asleep on a
turn booked under a low pace is booked again when the server admits again.

The limiter's clock is `time.monotonic`, so the answers that set the pace are fed at the real
times around now; what is asserted is that every turn came long before the low pace booked it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

import anyio
import pytest
import trio
import trio.testing

from zarr_anyio import AdaptiveLimiter
from zarr_anyio._core import adaptive
from zarr_anyio._core.adaptive import PACE_LEAD, PROBE_LEAST, Outcome

pytestmark = pytest.mark.anyio

ASLEEP = 20
"""Attempts asleep on their turns: under a pace of 10 a second, the last is booked ~2 s out."""


def limiter_clock() -> float:
    """The limiter's clock: `time.monotonic`, unless a test patched it (`on_a_mock_clock`)."""
    clock: float = getattr(adaptive, "time").monotonic()  # noqa: B009 (mypy: not exported)
    return clock


def probing(window: AdaptiveLimiter) -> None:
    """Less than a second of answers, then a throttle: the spent count is probed at
    `PROBE_LEAST` a second until the next answer, which ends the pace."""
    now = limiter_clock()
    for i in range(30):
        window.record(Outcome.ANSWERED, 0.02, window.epoch, 32, now=now - 0.1 + i / 300)
    window.record(Outcome.THROTTLED, 0.001, window.epoch, 32, now=now)
    assert window.pace == PROBE_LEAST


def throttled_again_and_again(window: AdaptiveLimiter) -> None:
    """A second of answers at 300 a second, then throttles with no answer between: each halves
    the pace, to 300/16; the next answer restores it to 300."""
    now = limiter_clock()
    for i in range(300):
        window.record(Outcome.ANSWERED, 0.02, window.epoch, 8, now=now - 1.1 + i / 300)
    for i in range(5):
        window.record(Outcome.THROTTLED, 0.001, window.epoch, 8, now=now - 0.05 + i / 100)
    assert window.pace is not None
    assert window.pace < 20


def pacing_about_to_end(window: AdaptiveLimiter) -> None:
    """A second of answers, a throttle five seconds ago, and answers since that fall just short
    of keeping up with the pace (`PACE_LEAD`): the next answer lets the pace grow, five seconds
    clean doubling its growth to thousands a second, past twice the rate throttled, which ends
    pacing."""
    now = limiter_clock()
    for i in range(30):
        window.record(Outcome.ANSWERED, 0.02, window.epoch, 8, now=now - 6.2 + i / 30)
    window.record(Outcome.THROTTLED, 0.001, window.epoch, 8, now=now - 5.1)
    pace = window.pace
    assert pace is not None
    # Within the second before the test's own answer (0.2 s after this): each keeps the
    # pace under `PACE_LEAD` times the last second's answers, so none grows it.
    answers = math.floor(pace / PACE_LEAD)
    for i in range(answers):
        window.record(Outcome.ANSWERED, 0.02, window.epoch, 8, now=now - 0.55 + i * 0.5 / answers)
    assert window.pace == pace


@pytest.mark.parametrize("slowed", [probing, throttled_again_and_again, pacing_about_to_end])
async def test_turns_booked_under_a_low_pace_are_booked_again_when_the_server_admits(
    slowed: Callable[[AdaptiveLimiter], None],
) -> None:
    window = AdaptiveLimiter(128, initial=32)
    slowed(window)
    pace = window.pace
    assert pace is not None
    took: list[float] = []

    async def attempt() -> None:
        await window.take_turn()
        took.append(time.monotonic())

    async with anyio.create_task_group() as tasks:
        for _ in range(ASLEEP):
            tasks.start_soon(attempt)
        await anyio.sleep(0.2)
        waited = len(took)
        assert waited < ASLEEP / 2  # the low pace holds them back
        admitted = time.monotonic()
        window.record(Outcome.ANSWERED, 0.02, window.epoch, 32, now=admitted)
        assert window.raises >= 1
        if slowed is pacing_about_to_end:
            assert window.pace is None
    # Booked under the low pace, the last turn was (ASLEEP - 1) / pace after the first: ~2 s
    # or more. Booked again, every turn came within a few of the new pace's turns (or at
    # once, the pace ended).
    booked_last = admitted - 0.2 + (ASLEEP - 1) / pace
    assert max(took) < admitted + (booked_last - admitted) / 2


async def test_a_turn_past_the_deadline_is_not_waited_for() -> None:
    window = AdaptiveLimiter(128, initial=32)
    probing(window)
    assert await window.take_turn(not_after=time.monotonic() + 10)  # the first turn: now
    # The next turn is a tenth of a second away: past a deadline a hundredth away. Refused
    # without a wait: in a cancelled scope, any wait would raise.
    with anyio.CancelScope() as scope:
        scope.cancel()
        past = not await window.take_turn(not_after=time.monotonic() + 0.01)
    assert past


async def test_an_attempt_cancelled_on_its_turn_leaves_no_sleeper_behind() -> None:
    window = AdaptiveLimiter(128, initial=32)
    probing(window)
    with anyio.move_on_after(0.05):
        for _ in range(5):
            await window.take_turn()
    assert window._turn_waiters == {}


class _MockMonotonic:
    """`time` for the limiter, its monotonic clock trio's (a MockClock's virtual time)."""

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    @staticmethod
    def monotonic() -> float:
        return trio.current_time()


def on_a_mock_clock(monkeypatch: pytest.MonkeyPatch, main: Callable[[], Awaitable[None]]) -> None:
    """``main`` under trio's MockClock (time jumps whenever every task sleeps), the limiter's
    clock patched to it: turns come to the microsecond, whatever the machine's load."""
    monkeypatch.setattr(adaptive, "time", _MockMonotonic())
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_turn_is_waited_for_on_the_event_loops_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # A test's clock moves faster than `time.monotonic` (trio's MockClock jumps): turns waited
    # for on the latter spun, each wait ending at once, until real time reached the turn (six
    # turns at 10 a second took 235 s of the mock clock and half a second of the CPU).
    monkeypatch.setattr(adaptive, "time", time)  # the limiter on the real clock, the loop not

    async def main() -> None:
        window = AdaptiveLimiter(128, initial=32)
        probing(window)
        started = trio.current_time()
        for _ in range(6):
            await window.take_turn()
        # Real time stands still while the mock clock jumps, so each turn is a tenth of a
        # second further than the last: 1.5 s in all, where the spin took hundreds.
        assert trio.current_time() - started < 5.0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_turn_booked_again_is_never_later_nor_past_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The pace restored a millisecond before a sleeper's turn: the next free turn of the new
    # pace is further off than that, and the sleeper keeps its own.
    async def main() -> None:
        window = AdaptiveLimiter(128, initial=32)
        throttled_again_and_again(window)
        pace = window.pace
        assert pace is not None
        sent: list[float] = []
        window.reserve()
        wait = window.reserve()  # a turn to come: the next are a turn of the pace apart
        assert wait > 0
        first = trio.current_time() + wait + 1 / pace
        booked = [first + i / pace for i in range(20)]
        not_after = booked[-1] + 1e-6

        async def attempt() -> None:
            # trio starts tasks in no fixed order: which attempt has which turn is not known,
            # the turns are.
            assert await window.take_turn(not_after)
            sent.append(trio.current_time())

        async with trio.open_nursery() as tasks:
            for _ in range(20):
                tasks.start_soon(attempt)
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(booked[3] - trio.current_time() - 0.001)
            window.record(Outcome.ANSWERED, 0.02, window.epoch, 8)
            assert window.raises == 1
            assert window.pace is not None
            assert window.pace > 10 * pace
        # Every turn came no later than booked (the k-th send by the k-th turn), none past the
        # deadline, and those after the raise sooner.
        sent.sort()
        assert all(when <= turn + 1e-9 for when, turn in zip(sent, booked, strict=True))
        assert sent[-1] < booked[-1] - 1 / pace

    on_a_mock_clock(monkeypatch, main)
