"""The adaptive window's rules against window limiters, on a clock the test drives: the floor of a
decrease (what the server was seen to admit) and the pace after a throttle.

Each test feeds the limiter outcomes and the times they ended (``now=``) and reads the window,
never a duration.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import pytest

from support.limits import Admission, Limits
from zarr_anyio import AdaptiveLimiter
from zarr_anyio._core.adaptive import (
    PACE_CREDIT,
    PACE_FLOOR,
    PROBE_LEAST,
    RETRY_AFTER_QUIET,
    RETRY_AFTER_STEP,
    RETURN_AFTER,
    RETURN_TIME,
    Outcome,
)


def answer_a_second(window: AdaptiveLimiter, start: float, rate: int, latency: float) -> float:
    """``rate`` answers of ``latency`` seconds, evenly over the second from ``start``, each sent
    with the whole window in use; gives the time of the last."""
    now = start
    for i in range(rate):
        now = start + (i + 1) / rate
        window.record(Outcome.ANSWERED, latency, window.epoch, round(window.window), now=now)
    return now


def answer_counts(window: AdaptiveLimiter, counts: tuple[tuple[float, int, float], ...]) -> float:
    """For each (start, count, span): ``count`` answers of 20 ms, evenly over ``span`` seconds
    from ``start``, the whole window in use; gives the time of the last."""
    now = 0.0
    for start, count, span in counts:
        for i in range(1, count + 1):
            now = start + span * i / count
            window.record(Outcome.ANSWERED, 0.02, window.epoch, round(window.window), now=now)
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
    # Refused again with no answer between: probing halves its pace, down to `PACE_FLOOR`.
    paces: list[float | None] = []
    for i in range(8):
        throttle(window, now + 0.01 * (i + 1))
        paces.append(window.pace)
    assert paces[:3] == pytest.approx([150, 75, 37.5])
    assert paces[-1] == pytest.approx(PACE_FLOOR * 300)
    # Turns booked at the old pace do not hold back one booked after the pace fell.
    assert window.reserve(now=now + 0.1) <= 1 / (PACE_FLOOR * 300)
    # The first answer: the server admits again, at the pace it began at. (Within
    # `SPENT_GAP` of the answer before: after a longer gap the pace is checked against the
    # last second's answers, as a fixed window's reset ends the gap.)
    window.record(Outcome.ANSWERED, 0.02, window.epoch, 32, now=now + 0.09)
    assert window.pace is not None
    assert window.pace >= 300


def test_turns_missed_while_the_client_was_busy_are_taken_late_up_to_the_credit() -> None:
    # A client sharing its cores hears answers in bunches: paced a turn apart, a bunch's next
    # requests waited their turns holding the window's tokens, which a cap on requests in
    # flight counts as requests not sent.
    window = AdaptiveLimiter(128, initial=32)
    now = answer_a_second(window, 0.0, 300, 0.02)
    throttle(window, now)
    assert window.pace == pytest.approx(300)
    # Pacing just began: no turn was missed before it.
    assert [window.reserve(now=now) for _ in range(3)] == pytest.approx([0, 1 / 300, 2 / 300])
    # Busy for 0.1 s, the client then hears a bunch of answers at once: the turns it missed
    # go at once, as many as `PACE_CREDIT` holds (6 at 300 a second), the rest a turn apart.
    later = now + 0.1
    credit = round(PACE_CREDIT * 300)
    bunch = [window.reserve(now=later) for _ in range(credit + 3)]
    assert bunch == pytest.approx([0.0] * (credit + 1) + [1 / 300, 2 / 300], abs=1e-9)
    # Over time the rate is still the pace: bunches of 10 every 10 ms, 1,000 asked a second,
    # send no more in a second than the pace and the credit.
    start = later + 1
    sent = [
        at + window.reserve(now=at)
        for at in (start + i / 100 for i in range(100))
        for _ in range(10)
    ]
    in_a_second = sum(start <= when < start + 1 for when in sent)
    assert 300 <= in_a_second <= 300 + credit + 1
    # A pace lowered (refused again, no answer between) starts without credit, however long
    # the client has not sent: a throttle is no time for a burst.
    idle = max(sent) + 1
    throttle(window, idle)
    assert window.pace == pytest.approx(150)
    assert [window.reserve(now=idle) for _ in range(3)] == pytest.approx([0, 1 / 150, 2 / 150])


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
    # as the server's. Neither is paced at; a second of answers is. Until the next answer the
    # spent count is only probed (`PROBE_LEAST`), and that answer ends the probing.
    window = AdaptiveLimiter(128, initial=32)
    for i in range(1, 31):
        window.record(Outcome.ANSWERED, 0.02, window.epoch, 32, now=i / 300)
    throttle(window, 0.1)
    assert window.pace == PROBE_LEAST
    window.record(Outcome.ANSWERED, 0.02, window.epoch, 32, now=0.101)
    assert window.pace is None
    assert window.reserve(now=0.101) == 0.0
    now = answer_a_second(window, 0.101, 300, 0.02)
    throttle(window, now)
    assert window.pace == pytest.approx(300, abs=1)


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


DROP = ((2.0, 100.0), (4.0, 300.0))
"""300 requests/s, 100 from 2 s after the first request, 300 again from 4 s."""


def test_the_servers_token_bucket_refills_at_its_new_rate_once_the_rate_rises() -> None:
    # The policy the fake clock and the loopback servers share. A client that spent the burst
    # and sends at about the bucket's 100 a second keeps it empty; once the rate rises to 300, the
    # bucket refills at 300, so a client that sends just under it is refused nothing (a
    # bucket that kept the slots it had booked at 100 a second refused the first 60 ms).
    limits = Limits(rate=100, burst=10, rate_changes=((1.0, 300.0),))
    admission = Admission()
    admission.arrives("first", 0.0)
    verdicts = [admission.judge(limits, 0.0, 1).refused for _ in range(10)]
    verdicts += [admission.judge(limits, i / 99, 1).refused for i in range(1, 99)]
    verdicts += [admission.judge(limits, 1.0 + i / 290, 1).refused for i in range(290)]
    assert not any(verdicts)
    # Past the burst, at the new rate as at the old, it refuses.
    assert admission.judge(limits, 2.0, 1).refused is False
    assert any(admission.judge(limits, 2.0, 1).refused for _ in range(12))


def against(
    window: AdaptiveLimiter,
    limits: Limits,
    seconds: float,
    latency: float = 0.02,
    start: float = 0.0,
) -> list[tuple[float, bool]]:
    """The limiter in front of a server of ``limits`` (the benchmarks' and the loopback
    servers' own policy) for ``seconds`` of a clock stepped by the millisecond from ``start``
    (a fixed window resets on the clock's whole seconds), with always a request to send: each
    holds a token from its booking to its answer, waits its turn under the pace, and is
    admitted (answered ``latency`` later) or refused (at once). Gives the server's answers,
    (when, admitted)."""
    admission = Admission()
    booked: list[float] = []  # when each booked request goes out
    # (when answered, admitted, when sent, epoch, in flight)
    answering: list[tuple[float, bool, float, int, int]] = []
    answers: list[tuple[float, bool]] = []
    held = 0
    for tick in range(1, round(seconds * 1000) + 1):
        now = start + tick / 1000
        while answering and answering[0][0] <= now:
            when, admitted, sent, epoch, in_flight = heapq.heappop(answering)
            outcome = Outcome.ANSWERED if admitted else Outcome.THROTTLED
            window.record(outcome, when - sent, epoch, in_flight, now=when)
            answers.append((when, admitted))
            held -= 1
        while held < window.total_tokens:
            heapq.heappush(booked, now + window.reserve(now=now))
            held += 1
        while booked and booked[0] <= now:
            heapq.heappop(booked)
            admission.arrives(f"{tick}", now)
            refused = admission.judge(limits, now, len(answering) + 1).refused
            when = now + (0.001 if refused else latency)
            heapq.heappush(answering, (when, not refused, now, window.epoch, held))
    return answers


def answer_at_pace(window: AdaptiveLimiter, start: float, seconds: float, latency: float) -> float:
    """Answers for ``seconds`` from ``start``, each a turn of the pace after the last (a
    millisecond apart while not pacing), the whole window in use: a server admitting all the
    client sends. Gives the time of the last."""
    now = start
    while now < start + seconds:
        now += 1 / (window.pace or 1000.0)
        window.record(Outcome.ANSWERED, latency, window.epoch, round(window.window), now=now)
    return now


def admitted_between(answers: list[tuple[float, bool]], start: float, end: float) -> int:
    return sum(admitted for when, admitted in answers if start <= when < end)


def refused_between(answers: list[tuple[float, bool]], start: float, end: float) -> int:
    return sum(not admitted for when, admitted in answers if start <= when < end)


def test_the_pace_returns_fast_to_the_rate_that_held_before_a_drop() -> None:
    # The benchmarks' drop server: a token bucket of 300 requests/s, 100 from 2 s after the
    # first request, 300 again from 4 s. Growing 10% a second (doubling every 0.3 s) from what
    # the low rate taught it, the pace took seconds to find 300 again (here: 419 answers in
    # the 2.5 s from 4.5 s, 56% of what the server admitted); it remembers the rate that held
    # and, a fifth of a second clean, returns to it in a third of a second, the window
    # following the pace.
    window = AdaptiveLimiter(128, initial=32)
    answers = against(window, Limits(rate=300, burst=10, rate_changes=DROP), 7.0)
    assert admitted_between(answers, 2.5, 4.0) == pytest.approx(150, abs=5)
    back = admitted_between(answers, 4.5, 7.0)
    assert back >= 0.85 * 300 * 2.5
    # Quickly back, and no hammering: the return is refused rarely once the rate has held.
    assert refused_between(answers, 4.5, 7.0) <= 0.05 * back


@pytest.mark.parametrize("start", [0.0, 0.8, 0.9])
def test_a_fixed_window_is_not_taken_for_more_than_its_count(start: float) -> None:
    # The benchmarks' fixed window: 300 requests in each second of the clock, refused at once
    # beyond. A second of answers that holds two of its counts (slow start's burst across a
    # reset, late in a second) measured 450-650 a second, and a pace probing upward, stepped
    # down at each refusal, ratcheted the rate that held up a tenth a second; each return went
    # back there, and each second's count was spent early (started at 0.8 s: 323 refused in
    # the 4 s after the first two, the pace up to 635; now about a hundred, at most 444, as
    # for a read that starts early in a second).
    window = AdaptiveLimiter(128, initial=32)
    paces: list[float] = []
    record = window.record

    def noting(*args: Any, **kwargs: Any) -> None:
        record(*args, **kwargs)
        if window.pace is not None and kwargs["now"] > start + 2:
            paces.append(window.pace)

    window.record = noting  # type: ignore[method-assign]
    answers = against(window, Limits(window=300, window_kind="fixed"), 6.0, start=start)
    admitted = admitted_between(answers, start + 2, start + 6)
    assert admitted >= 0.95 * 1200
    assert refused_between(answers, start + 2, start + 6) <= 0.1 * admitted
    assert max(paces) < 1.6 * 300


def test_a_second_that_holds_a_fixed_windows_reset_is_not_taken_for_its_rate() -> None:
    # A fixed window of 300 a second: one count spent by 0.9 s, the next left unspent (200
    # answers: the tokens asleep in their backoffs at the reset), the next spent in half a
    # second. The last second's answers say 400 a second; paced there, and returned to as the
    # rate that held, every later second's count went early. Two seconds' answers, over two,
    # are the check: 316.
    window = AdaptiveLimiter(128, initial=32)
    now = answer_counts(window, ((0.0, 300, 0.9), (1.0, 200, 1.0), (2.0, 300, 0.5)))
    throttle(window, now)
    assert window.pace is not None
    assert window.pace < 1.1 * 300
    # Where no two seconds of answers are behind, the last second is the rate, as before.
    young = AdaptiveLimiter(128, initial=32)
    now = answer_a_second(young, 0.0, 300, 0.02)
    throttle(young, now)
    assert young.pace == pytest.approx(300)


def test_a_spent_count_is_probed_gently_before_there_is_a_rate() -> None:
    # A read that starts half-way through a fixed window's second: slow start spends the
    # count in a tenth of a second, and the rest of that second refuses everything. There is
    # no rate to pace at yet (less than a second of answers), but the window's tokens need not
    # each hammer the spent count: it is probed at `PACE_FLOOR` of the answers a second, or
    # `PROBE_LEAST`, until it admits again: at most twice that, as a refusal brings the next
    # turn to one turn from now (as under any pace: `reserve`). (Without backoffs, as here,
    # the tokens probed it some 2,000 times in those three tenths of a second.)
    window = AdaptiveLimiter(128, initial=32)
    answers = against(window, Limits(window=300, window_kind="fixed"), 0.9, start=0.5)
    assert admitted_between(answers, 0.5, 1.0) == 300
    spent_from = max(when for when, admitted in answers if admitted and when < 1.0)
    probes = refused_between(answers, spent_from + 0.03, 1.0)
    most = (1.0 - spent_from) * max(PROBE_LEAST, PACE_FLOOR * 300)
    assert probes <= 2 * most + 2
    # The count reset at 1.0 s: the first answer after it ends the probing.
    assert admitted_between(answers, 1.0, 1.1) > 0
    assert window.pace is None or window.pace > PROBE_LEAST


def test_a_window_brought_down_to_the_last_second_is_not_taken_for_bound() -> None:
    # A fixed window of 300 a second, whose reset-holding second answered 400 (as in the
    # test above). The throttles that follow, each sent after the decrease before and
    # refused in a millisecond, each a new episode, bring the window down to what that second
    # held: the window then looks full of requests the server held (`WINDOW_BOUND`), and what
    # it sends (8 at 20 ms: 400 a second) is that same second's double count. It is checked
    # as the rate answered is: paced at 400, every later second's count went early.
    window = AdaptiveLimiter(128, initial=32)
    now = answer_counts(window, ((0.0, 300, 0.9), (1.0, 200, 1.0), (2.0, 300, 0.5)))
    for _ in range(40):
        now += 0.001
        throttle(window, now)
        now += 0.001
        window.record(Outcome.ANSWERED, 0.02, window.epoch - 1, 1, now=now)
    assert window.window == pytest.approx(window.admitted(now), rel=0.05)
    assert window.pace is not None
    assert window.pace < 1.1 * 300


def test_after_a_spent_count_the_pace_is_checked_against_the_second_before_its_reset() -> None:
    # A fixed window of 300 a second, a read started late in a second: slow start's burst
    # spends one count, the next second is climbed slowly, and the count after the reset at
    # 2 s goes early. The throttle at 2.3 s, less than two seconds after the first answer
    # (`RATE_CHECK` has nothing to check by), finds 425 answers in the last second: two
    # counts' worth. Paced there, and returned to as the rate that held, every later second's
    # count went early. The count is spent until the reset at 3 s; the first answer after that
    # gap came at a reset, so the second before it holds one count, and the pace is checked
    # against it.
    window = AdaptiveLimiter(128, initial=32)
    for i in range(1, 301):
        window.record(Outcome.ANSWERED, 0.02, window.epoch, 32, now=0.8 + 0.1 * i / 300)
    throttle(window, 0.9)
    now = answer_counts(window, ((1.0, 250, 1.0), (2.0, 250, 0.3)))
    throttle(window, now)
    assert window.pace == pytest.approx(425, rel=0.02)
    while now < 3.0:
        now += 0.01
        throttle(window, now)
    window.record(Outcome.ANSWERED, 0.02, window.epoch, 1, now=3.02)
    assert window.pace is not None
    assert window.pace < 1.1 * 300


@pytest.mark.parametrize(("refused_until", "answered_at"), [(2.5, 2.52), (1.05, 1.87)])
def test_an_outage_or_our_own_slow_probing_is_not_taken_for_a_reset(
    refused_until: float, answered_at: float
) -> None:
    # 300 answers a second, then a run of throttles, then the server admits again. The check
    # after a spent count (above) is not for these: after 1.5 s of refusals (an outage) the
    # last second holds only the new answer, and a pace restored to it (or the rate that held
    # taken down to it) held a client at a request a second; nor for a gap our own halved pace
    # made, refused last 0.8 s before the answered request went (a slow server probed at a
    # request a second). Either way the first answer restores the pace the run began at.
    window = AdaptiveLimiter(128, initial=8)
    now = answer_a_second(window, 0.0, 300, 0.02)
    while now < refused_until:
        now += 0.01
        throttle(window, now)
    assert window.pace is not None
    assert window.pace < 30
    window.record(Outcome.ANSWERED, 0.02, window.epoch, 1, now=answered_at)
    assert window.pace == pytest.approx(300, rel=0.02)


def test_a_throttle_that_finds_the_window_full_paces_at_what_the_window_sends() -> None:
    # A cap on requests in flight (48, 100 ms each: 480 requests/s). The window, not a rate,
    # is the limit: a second of answers while it grew to 48 is 400 requests/s (the server
    # held 40 at once), where 48 in flight send 480.
    window = AdaptiveLimiter(128, initial=48)
    now = 0.0
    for i in range(400):
        now = (i + 1) / 400
        # Each sent with 23 in flight: the window is not grown past the 48 it starts at.
        window.record(Outcome.ANSWERED, 0.1, window.epoch, 23, now=now)
    assert window.window == 48
    assert window.admitted(now) == pytest.approx(40)
    throttle(window, now)
    # Paced at what the window sends after its decrease (43.2 in flight at 100 ms), not at
    # the second's 400 answers.
    assert window.window == pytest.approx(43.2)
    assert window.pace == pytest.approx(432)
    # Answers at the window's rate, clean for a third of a second, and the window full again:
    # the next throttle steps the window down, and leaves the pace where it was.
    for _ in range(160):
        now += 1 / 480
        window.record(Outcome.ANSWERED, 0.1, window.epoch, 23, now=now)
    before = window.pace
    assert before is not None
    throttle(window, now)
    after = window.pace
    assert after is not None
    assert after >= before


def test_beyond_the_rate_that_held_the_pace_grows_only_as_answers_keep_up() -> None:
    # After a throttle at 300 a second, a second and a half of answers at half that (a fixed
    # window's second whose count went unspent, the tokens asleep in their backoffs): no
    # refusal, but no sign that the server admits more either. The pace's doubling growth
    # ran on regardless (to 500 here), and the next second's count went early.
    window = AdaptiveLimiter(128, initial=32)
    now = answer_a_second(window, 0.0, 300, 0.02)
    throttle(window, now)
    assert window.pace == pytest.approx(300)
    start = now
    for i in range(1, 226):
        now = start + i / 150
        window.record(Outcome.ANSWERED, 0.02, window.epoch, round(window.window), now=now)
    assert window.pace is not None
    assert window.pace <= 1.01 * 300
    # Answers that keep up with the pace: it probes on.
    now = answer_at_pace(window, now, 2.0, 0.02)
    assert window.pace is not None
    assert window.pace > 1.1 * 300


def drop_to_100(window: AdaptiveLimiter) -> float:
    """A second at 300 requests/s and a throttle, a second at 100 and refusals close
    together, answers between, that take the pace to it; gives the time of the last."""
    now = answer_a_second(window, 0.0, 300, 0.02)
    throttle(window, now)
    now = answer_a_second(window, now, 100, 0.02)
    for _ in range(3):
        throttle(window, now)
        now += 0.01
        window.record(Outcome.ANSWERED, 0.02, window.epoch, 32, now=now)
        now += 0.01
    assert window.pace == pytest.approx(100, rel=0.05)
    return now


def test_refusals_soon_after_a_return_do_not_take_the_pace_to_the_lagging_second() -> None:
    # Back at the rate that held (300 requests/s), refusals with answers between (a token
    # bucket whose burst the return spent) each set the pace to the last second's rate, which
    # still counts the low rate before the return: 156 a second here, held for a third of a
    # second until the next return (the drop server's reads lost 0.1-0.3 s there). For a
    # second after a return began, the rate is what was answered since it began.
    window = AdaptiveLimiter(128, initial=32)
    now = drop_to_100(window)
    now = answer_at_pace(window, now, RETURN_AFTER + RETURN_TIME + 0.05, 0.02)
    assert window.pace == pytest.approx(300, rel=0.1)
    for _ in range(3):
        throttle(window, now)
        now += 0.005
        window.record(Outcome.ANSWERED, 0.02, window.epoch, 32, now=now)
        now += 0.005
    assert window.pace is not None
    assert window.pace > 0.8 * 300


def test_the_first_refused_return_waits_longer_and_aims_as_high() -> None:
    # A server that lowers its limit for two seconds refuses the return made once the pace has
    # come down to the low rate; the next return waits twice as long, and still aims at the
    # rate that held (a step lower, 270, left the pace short of 300 once the server came back;
    # later refused returns still aim lower: the next test).
    window = AdaptiveLimiter(128, initial=32)
    now = drop_to_100(window)
    now = answer_at_pace(window, now, RETURN_AFTER + 0.05, 0.02)
    assert window.pace is not None
    assert window.pace > 150  # on the way back
    throttle(window, now)
    now = answer_at_pace(window, now + 0.01, 2 * RETURN_AFTER + RETURN_TIME + 0.05, 0.02)
    assert window.pace is not None
    assert window.pace >= 300


def test_the_second_refused_return_waits_as_long_as_the_first_and_later_ones_twice_as_long() -> (
    None
):
    # A server that lowers its limit for two seconds refuses two returns in them, the second
    # often just before it comes back: doubled again, the wait for the third ran 0.8 s past
    # it (the drop server's reads at 87-89%, one in 14). Waits after the last refusal until
    # a return lifts the pace: 0.2 s clean for the first, then 0.4, 0.4, 0.8 (each plus the
    # curve's rise to 150 a second).
    window = AdaptiveLimiter(128, initial=32)
    now = drop_to_100(window)
    waits = []
    for _ in range(4):
        start = now
        while (window.pace or 0.0) <= 150:
            now += 1 / (window.pace or 1000.0)
            window.record(Outcome.ANSWERED, 0.02, window.epoch, round(window.window), now=now)
            assert now - start < 3.0
        waits.append(now - start)
        throttle(window, now)
    rise = waits[0] - RETURN_AFTER
    assert 0 < rise < 0.05
    assert waits[1:] == pytest.approx(
        [2 * RETURN_AFTER + rise, 2 * RETURN_AFTER + rise, 4 * RETURN_AFTER + rise], abs=0.03
    )


def test_a_limit_that_dropped_for_good_is_forgotten_in_a_few_returns() -> None:
    # The rate that held is a memory, not a target: each return the server refuses waits
    # twice as long as the last and aims a step lower, so a server that stays at 100 is not
    # probed toward 300 for good.
    window = AdaptiveLimiter(128, initial=32)
    answers = against(window, Limits(rate=300, burst=10, rate_changes=DROP[:1]), 8.0)
    admitted = admitted_between(answers, 4.0, 8.0)
    assert admitted == pytest.approx(400, abs=5)
    assert refused_between(answers, 4.0, 8.0) <= 0.1 * admitted
    assert refused_between(answers, 6.0, 8.0) <= 0.05 * admitted


def test_a_retry_after_paces_a_step_below_the_rate_and_probes_seldom() -> None:
    # A refusal that says when to come back costs its request that long (one in a read's last
    # second holds the whole read for it): the pace goes a step below the rate answered (a
    # rate at the server's limit is refused again within a fraction of a second) and does not
    # probe upward until the wait and RETRY_AFTER_QUIET more have passed (probing 0.3-0.5 s
    # after each wait, a 5 s read against 300/s with Retry-After: 1 was refused in its last
    # second in most runs: 80-88% of the rate).
    window = AdaptiveLimiter(128, initial=32)
    now = answer_a_second(window, 0.0, 300, 0.02)
    window.record(Outcome.THROTTLED, 0.001, window.epoch, 32, now=now, retry_after=1.0)
    held = window.pace
    assert held is not None
    assert held == pytest.approx(300 * RETRY_AFTER_STEP)
    now = answer_at_pace(window, now, 1.0 + RETRY_AFTER_QUIET - 0.1, 0.02)
    assert window.pace == held
    # A later throttle, told to wait again, holds it again from then, a step below the rate
    # answered since.
    window.record(Outcome.THROTTLED, 0.001, window.epoch, 32, now=now, retry_after=1.0)
    again = window.pace
    assert again is not None
    assert again == pytest.approx(held * RETRY_AFTER_STEP, rel=0.01)
    now = answer_at_pace(window, now, 1.0 + RETRY_AFTER_QUIET - 0.1, 0.02)
    assert window.pace == again
    # Once the quiet has passed, probing goes on as after any throttle.
    answer_at_pace(window, now, 0.5, 0.02)
    assert window.pace is not None
    assert window.pace > again


def test_a_retry_after_quiet_does_not_hold_the_return_to_the_rate_that_held() -> None:
    # A server that drops its limit and refuses with Retry-After: 1 takes the pace down (each
    # refusal with no answer since halves it); once it admits again, the pace returns to the
    # rate that held as after any throttle: the quiet after a Retry-After holds probing beyond
    # it, not the return (held too, a server that lowered its limit for two seconds and raised
    # it again was read at 52-57% of what it admitted).
    window = AdaptiveLimiter(128, initial=32)
    now = answer_a_second(window, 0.0, 300, 0.02)
    window.record(Outcome.THROTTLED, 0.001, window.epoch, 32, now=now, retry_after=1.0)
    # The server drops to 100 requests/s: a second of that, then refusals close together,
    # answers between, take the pace to the last second's rate.
    now = answer_a_second(window, now, 100, 0.02)
    for _ in range(2):
        window.record(Outcome.THROTTLED, 0.001, window.epoch, 32, now=now, retry_after=1.0)
        now += 0.01
        window.record(Outcome.ANSWERED, 0.02, window.epoch, 32, now=now)
        now += 0.01
    low = window.pace
    assert low is not None
    assert low < 0.5 * 300
    now = answer_at_pace(window, now, 1.0 + RETURN_AFTER + RETURN_TIME + 0.1, 0.02)
    assert window.pace == pytest.approx(300)
    # ... and no further while the quiet lasts.
    answer_at_pace(window, now, RETRY_AFTER_QUIET - RETURN_AFTER - RETURN_TIME - 0.5, 0.02)
    assert window.pace == pytest.approx(300)
