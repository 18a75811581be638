"""Turns under the adaptive window's pace, on the event loop's own clock: an attempt asleep on a
turn booked under a low pace is booked again when the server admits again.

The limiter's clock is `time.monotonic`, so the answers that set the pace are fed at the real
times around now; what is asserted is that every turn came long before the low pace booked it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import pytest

from zarr_anyio import AdaptiveLimiter
from zarr_anyio._core.adaptive import PROBE_LEAST, Outcome

pytestmark = pytest.mark.anyio

ASLEEP = 20
"""Attempts asleep on their turns: under a pace of 10 a second, the last is booked ~2 s out."""


def probing(window: AdaptiveLimiter) -> None:
    """Less than a second of answers, then a throttle: the spent count is probed at
    `PROBE_LEAST` a second until the next answer, which ends the pace."""
    now = time.monotonic()
    for i in range(30):
        window.record(Outcome.ANSWERED, 0.02, window.epoch, 32, now=now - 0.1 + i / 300)
    window.record(Outcome.THROTTLED, 0.001, window.epoch, 32, now=now)
    assert window.pace == PROBE_LEAST


def throttled_again_and_again(window: AdaptiveLimiter) -> None:
    """A second of answers at 300 a second, then throttles with no answer between: each halves
    the pace, to 300/16; the next answer restores it to 300."""
    now = time.monotonic()
    for i in range(300):
        window.record(Outcome.ANSWERED, 0.02, window.epoch, 8, now=now - 1.1 + i / 300)
    for i in range(5):
        window.record(Outcome.THROTTLED, 0.001, window.epoch, 8, now=now - 0.05 + i / 100)
    assert window.pace is not None
    assert window.pace < 20


@pytest.mark.parametrize("slowed", [probing, throttled_again_and_again])
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
