"""The adaptive window's rules against window limiters, on a clock the test drives: the floor of a
decrease (what the server was seen to admit) and the pace after a throttle.

Each test feeds the limiter outcomes and the times they ended (``now=``) and reads the window,
never a duration.
"""

from __future__ import annotations

import math

import pytest

from zarr_anyio import AdaptiveLimiter
from zarr_anyio._core.adaptive import Outcome


def answer_a_second(window: AdaptiveLimiter, start: float, rate: int, latency: float) -> float:
    """``rate`` answers of ``latency`` seconds, evenly over the second from ``start``, each sent
    with the whole window in use; gives the time of the last."""
    now = start
    for i in range(rate):
        now = start + (i + 1) / rate
        window.record(Outcome.ANSWERED, latency, window.epoch, round(window.window), now=now)
    return now


def throttle(window: AdaptiveLimiter, now: float, *, new_episode: bool = True) -> None:
    epoch = window.epoch if new_episode else window.epoch - 1
    window.record(Outcome.THROTTLED, 0.001, epoch, round(window.window), now=now)


def test_a_burst_of_throttles_stops_at_what_the_server_admitted() -> None:
    # 300 answers in the last second at 20 ms each: the server held 6 at once (Little's law).
    window = AdaptiveLimiter(128, initial=32)
    now = answer_a_second(window, 100.0, 300, 0.02)
    assert window.admitted(now) == pytest.approx(6.0, rel=0.01)
    grown = window.window
    # A window limiter's second is spent: every request refused, round after round of them.
    for _ in range(60):
        throttle(window, now)
        throttle(window, now, new_episode=False)
    assert window.window == pytest.approx(6.0, rel=0.01)
    assert window.window < grown
    # A second later those answers say nothing of the server's capacity: the floor is gone.
    later = now + 1.5
    assert window.admitted(later) == 0
    for _ in range(60):
        throttle(window, later)
    assert window.total_tokens == 1


def test_a_floor_above_the_window_holds_it_and_does_not_raise_it() -> None:
    window = AdaptiveLimiter(128, initial=4)
    # Answers of 1 s each would put the floor at the whole second's count; a decrease never
    # makes the window larger.
    for i in range(40):
        window.record(Outcome.ANSWERED, 1.0, window.epoch, 0, now=10.0 + i / 100)
    assert window.window == 4
    throttle(window, 10.5)
    assert window.window == 4


def test_a_throttle_paces_attempts_at_the_admitted_rate() -> None:
    window = AdaptiveLimiter(128, initial=32)
    assert window.pace is None
    assert window.reserve(now=0.0) == 0.0
    now = answer_a_second(window, 0.0, 300, 0.02)
    throttle(window, now)
    assert window.pace == pytest.approx(300)
    # Turns are booked 1/300 s apart, in order, whoever asks.
    turns = [window.reserve(now=now) for _ in range(4)]
    assert turns == pytest.approx([0, 1 / 300, 2 / 300, 3 / 300])
    # Refused again with no answer between: probing halves its pace, down to a tenth.
    paces: list[float | None] = []
    for i in range(8):
        throttle(window, now + 0.01 * (i + 1))
        paces.append(window.pace)
    assert paces[:3] == pytest.approx([150, 75, 37.5])
    assert paces[-1] == pytest.approx(30)
    # Turns booked at the old pace do not hold back one booked after the pace fell.
    assert window.reserve(now=now + 0.1) <= 1 / 30
    # The first answer: the server admits again, at the pace it began at.
    window.record(Outcome.ANSWERED, 0.02, window.epoch, 32, now=now + 0.2)
    assert window.pace is not None
    assert window.pace >= 300


def slow_down(window: AdaptiveLimiter, now: float) -> None:
    """One throttle that starts pacing, then the rest of its round: the window at its floor."""
    throttle(window, now)
    for _ in range(60):
        throttle(window, now, new_episode=False)


def answer_paced(window: AdaptiveLimiter, start: float, count: int, latency: float) -> float:
    """``count`` answers a millisecond apart from ``start``, the whole window in use."""
    now = start
    for i in range(1, count + 1):
        now = start + i / 1000
        window.record(Outcome.ANSWERED, latency, window.epoch, round(window.window), now=now)
    return now


def test_the_window_holds_while_the_pace_binds_with_room_to_spare() -> None:
    window = AdaptiveLimiter(128, initial=32)
    now = answer_a_second(window, 0.0, 300, 0.02)
    slow_down(window, now)
    assert window.window == pytest.approx(6.0, rel=0.01)
    # Answers with the whole window in use, where CUBIC heads back to the 128 that was
    # throttled: while the pace binds, the window's requests wait for turns holding their
    # tokens, so they prove nothing of the server; the window follows the pace (at most twice
    # what it keeps in flight), not the curve.
    now = answer_paced(window, now, 250, 0.02)
    assert window.pace is not None
    assert window.window <= 2 * window.pace * 0.02 + 1
    # But a window at just what the pace keeps in flight (6 at 300/s and 20 ms) is as much the
    # limit as the pace: it grows, or the pace could never be answered faster.
    assert window.window > 6 + 2


def test_the_pace_probes_gently_after_a_throttle_then_faster() -> None:
    window = AdaptiveLimiter(128, initial=32)
    now = answer_a_second(window, 0.0, 300, 0.02)
    slow_down(window, now)
    # Right after a throttle each answer raises the pace by a tenth of an attempt a second
    # (10% of the pace per second of answers), the growth doubling every 0.3 s without a
    # throttle: a limit that holds is probed gently, one that has risen is found in seconds.
    # Twice the rate that was throttled, answered cleanly, ends pacing. Latency has no say: a
    # client whose own CPU is the bottleneck sees it grow with its window.
    now = answer_paced(window, now, 300, 0.2)
    assert window.pace == pytest.approx(300 + 0.1 * 300 / math.log(2), rel=0.02)
    for i in range(1, 4000):
        window.record(Outcome.ANSWERED, 0.2, window.epoch, 0, now=now + i / 1000)
        if window.pace is None:
            break
    assert window.pace is None
    # 10% a second for good took 3,000 answers (3 s) to double the pace; doubling growth, 900.
    assert 300 + i == pytest.approx(300 * math.log2(1 + 300 * math.log(2) / 30), abs=5)
    assert window.reserve(now=now + 5) == 0.0


def test_less_than_a_second_of_answers_is_no_rate_to_pace_at() -> None:
    # 30 answers in the first tenth of a second: counted over the second that is 30/s against
    # a server admitting 300/s; counted over their span it is as much our own backoff's rate
    # as the server's. Neither is paced at; a second of answers is.
    window = AdaptiveLimiter(128, initial=32)
    for i in range(1, 31):
        window.record(Outcome.ANSWERED, 0.02, window.epoch, 32, now=i / 300)
    throttle(window, 0.1)
    assert window.pace is None
    assert window.reserve(now=0.1) == 0.0
    now = answer_a_second(window, 0.1, 300, 0.02)
    throttle(window, now)
    assert window.pace == pytest.approx(300)


def test_slow_start_doubles_at_most_every_fifth_of_a_second() -> None:
    # Answers every millisecond, the whole window in use: one more per answer would take the
    # window from 32 to the ceiling in 224 answers; in time it doubles at most every 0.2 s.
    window = AdaptiveLimiter(256, initial=32)
    for i in range(401):
        window.record(Outcome.ANSWERED, 0.001, window.epoch, 256, now=50.0 + i / 1000)
    assert window.total_tokens == 128
    # Answers slower than the doubling grow it by one each, as before (the first starts the
    # clock).
    slow = AdaptiveLimiter(256, initial=32)
    for i in range(8):
        slow.record(Outcome.ANSWERED, 0.2, slow.epoch, 256, now=i * 0.2)
    assert slow.total_tokens == 39
