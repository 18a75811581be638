"""The benchmark script runs (on small arrays) and prints its ratios; it asserts no timing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from support import TOP


def test_benchmark_script_runs_quick() -> None:
    done = subprocess.run(
        [sys.executable, str(TOP / "benchmarks" / "run.py"), "--quick", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ratio arr[:] ours/theirs") == 2
    assert done.stdout.count("ratio into one preallocated out= ours/theirs") == 1
    assert done.stdout.count("ratio our bulk read trio/asyncio") == 2
    assert done.stdout.count("ratio zip arr[:] ours/theirs") == 1


def test_remote_benchmark_script_runs_quick() -> None:
    done = subprocess.run(
        [sys.executable, str(TOP / "benchmarks" / "remote.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "ratio our ObjectStore / zarr's ObjectStore" in done.stdout
    assert done.stdout.count("of ideal") == 1
    assert "zarr.storage.ObjectStore" in done.stdout.split("## HTTP")[1]


REPLAY = "throttling_replay.py"


def run_throttling(
    *options: str, script: str = "throttling.py"
) -> subprocess.CompletedProcess[str]:
    """`benchmarks/throttling.py` (or ``script``) on a few reads, at ceiling 32; it must
    succeed."""
    done = subprocess.run(
        [
            sys.executable,
            str(TOP / "benchmarks" / script),
            *("--count", "30", "--ceilings", "32", *options),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_throttling_benchmark_runs_the_whole_matrix(tmp_path: Path) -> None:
    plot = tmp_path / "throttling.png"
    done = run_throttling("--plot", str(plot))
    kinds = ["rate", "sliding", "fixed", "concurrency", "queue", "retry-after", "drop"]
    assert [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("## ")] == [
        *(f"## {kind}" for kind in kinds),
        "## The matrix",
        "## Plot",
    ]
    ours = [line for line in done.stdout.splitlines() if line.startswith("zarr_anyio.")]
    assert len(ours) == 4 * len(kinds)  # both backends, the oracle and ceiling 32
    assert not any("fails" in line for line in ours)
    assert f"| client | {' | '.join(kinds)} |" in done.stdout
    assert done.stdout.count("| zarr.storage.ObjectStore, async.concurrency=10 |") == 1
    assert plot.stat().st_size > 0
    assert "Unclosed" not in done.stderr  # every session closed
    # 30 reads are no read to judge: cells miss, each beside its library's oracle in the run.
    summary = done.stdout.split("cells missing")[1].split("\n#")[0]
    missed = [line for line in summary.splitlines()[1:] if line.startswith("  ")]
    assert missed
    assert all(re.search(r"\(the oracle: \d+%\)$", line) for line in missed), missed


def test_throttling_benchmark_runs_one_kind() -> None:
    done = run_throttling("--only", "sliding", "--no-oracle")
    assert "## sliding: 300 in any 1 s (sliding window)" in done.stdout
    assert "## fixed" not in done.stdout
    ours = [line for line in done.stdout.splitlines() if line.startswith("zarr_anyio.")]
    assert len(ours) == 2


def test_throttling_benchmark_judges_a_ceiling_below_the_server_by_what_it_allows() -> None:
    # 32 in flight at 100 ms is 320 of the 480 requests a second the server admits: the raw
    # share is beside the share of what the server admits at that ceiling.
    done = run_throttling("--only", "concurrency", "--no-oracle")
    ours = [line for line in done.stdout.splitlines() if line.startswith("| zarr_anyio.")]
    assert len(ours) == 2
    assert all(line.count("(") == 1 for line in ours)
    # zarr's 10 in flight bound it too; against a 20 ms server of 300/s no ceiling does.
    assert "| zarr.storage.ObjectStore, async.concurrency=10 | " in done.stdout
    sliding = run_throttling("--only", "sliding", "--no-oracle")
    rows = [line for line in sliding.stdout.splitlines() if line.startswith("| ")]
    assert rows
    assert not any("(" in row for row in rows)


def replayed_share(*options: str) -> float:
    done = run_throttling("--only", "concurrency", "--seeds", "3", *options, script=REPLAY)
    row = done.stdout.splitlines()[-1]
    return float(row.split(" | ")[2].split("%")[0])


def test_the_replay_models_a_client_sharing_its_cores() -> None:
    # A client on the CPU a third of the time hears answers in bunches and sends late: 60
    # reads from the 48-place server at ceiling 32 take it longer than one always on.
    assert replayed_share("--share", "0.3") < replayed_share() - 1


SCHEDULE = """
import random, sys
sys.path.insert(0, sys.argv[1])
from throttling_replay import Scheduler
for share in (0.3, 0.5, 0.7):
    client = Scheduler(random.Random(1), share, 0.004)
    client.awake(999.0)
    asked = random.Random(2)
    instants = [1000 + 10 * asked.random() for _ in range(20000)]
    first = [client.awake(when) for when in instants]
    again = [client.awake(when) for when in reversed(instants)][::-1]
    on = sum(woke == when for woke, when in zip(first, instants)) / len(instants)
    print(share, on, first == again, all(woke >= when for woke, when in zip(first, instants)))
"""


def test_the_replays_client_runs_its_share_of_the_time_whatever_is_asked_first() -> None:
    # The schedule is a fixed function of time: asked in any order, an instant is on or off
    # the same, and the client is on its share of the time.
    done = subprocess.run(
        [sys.executable, "-c", SCHEDULE, str(TOP / "benchmarks")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    for line in done.stdout.splitlines():
        share, on, same, never_earlier = line.split()
        assert abs(float(on) - float(share)) < 0.02, line
        assert same == never_earlier == "True", line


def test_the_throttling_replay_runs_every_kind() -> None:
    done = run_throttling("--seeds", "2", script=REPLAY)
    rows = [line.split(" | ")[0] for line in done.stdout.splitlines() if line.startswith("| ")]
    kinds = ["rate", "sliding", "fixed", "concurrency", "drop"]
    assert rows == ["| kind", *(f"| {kind}" for kind in kinds)]
    assert all(line.endswith(" of 2 |") for line in done.stdout.splitlines()[2:])
