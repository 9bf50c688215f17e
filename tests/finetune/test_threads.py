"""finetune/threads.py: a CPU run takes the cores other processes leave free, shared among its local processes,
follows the load while it trains, and the user's own settings win."""

from __future__ import annotations

import os

import pytest
import torch

from finetune import threads
from finetune.errors import DomainClipError
from finetune.threads import ThreadChoice, ThreadFollower, busy_cores, choose_cpu_threads, user_thread_setting

ACCELERATE = {"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1"}  # what `accelerate launch` sets without a config


def choose(cores=2, local=1, load=0.0, **env) -> ThreadChoice:
    return choose_cpu_threads(cores=cores, local_processes=local, other_load=load, env=env)


# --- how many threads


@pytest.mark.parametrize(
    "cores, local, load, expected",
    [
        (2, 1, 0.0, 2),  # idle: every core
        (2, 1, 0.3, 2),  # a little background work: still both
        (2, 1, 1.3, 1),  # another process on more than a core: what it leaves
        (2, 1, 2.0, 1),  # a busy machine: one thread, never none
        (2, 1, 5.0, 1),
        (16, 4, 0.0, 4),  # local processes split the cores
        (16, 4, 4.0, 3),  # ... and what other processes leave: 12 free cores / 4
        (16, 1, 3.6, 12),  # rounded to the nearest core
        (3, 2, 0.0, 1),  # an equal split rounds down
    ],
)
def test_threads_are_the_cores_other_processes_leave_free_split_among_local_processes(cores, local, load, expected):
    choice = choose(cores, local, load)
    assert choice.threads == expected and choice.source == "policy"


def test_an_unmeasured_load_counts_as_idle():
    assert choose(8, 2, None).threads == 4


def test_the_users_thread_settings_win_over_the_load():
    assert choose(2, 1, 2.0, DOMAINCLIP_NUM_THREADS="2").threads == 2
    chosen = choose(2, 1, 2.0, DOMAINCLIP_NUM_THREADS="3", OMP_NUM_THREADS="1")
    assert chosen.threads == 3 and chosen.source == "DOMAINCLIP_NUM_THREADS=3"
    omp = choose(2, 1, 2.0, OMP_NUM_THREADS="4")  # torch already read it: nothing to set
    assert omp.threads is None and omp.source == "OMP_NUM_THREADS=4"
    assert choose(2, 1, 0.0, OMP_NUM_THREADS="1").threads is None  # plain python with OMP_NUM_THREADS=1: the user's


def test_the_1_accelerate_launch_sets_is_not_the_users_choice():
    assert user_thread_setting(ACCELERATE) is None
    assert choose(4, 2, 0.0, **ACCELERATE).threads == 2
    assert user_thread_setting({**ACCELERATE, "OMP_NUM_THREADS": "3"}) == "OMP_NUM_THREADS"
    assert user_thread_setting({**ACCELERATE, "DOMAINCLIP_NUM_THREADS": "1"}) == "DOMAINCLIP_NUM_THREADS"


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_thread_count_that_is_not_a_whole_number_is_one_clear_error(value):
    with pytest.raises(DomainClipError, match=f"DOMAINCLIP_NUM_THREADS: must be a whole number >= 1, got '{value}'"):
        choose(DOMAINCLIP_NUM_THREADS=value)


# --- the load of other processes


def snapshot(**cpu_seconds: tuple[int, float]) -> dict[int, tuple[int, float]]:
    return {int(pid.removeprefix("p")): value for pid, value in cpu_seconds.items()}


def test_the_load_counts_other_processes_not_this_one_its_children_or_local_siblings():
    # pid 10 is this process (parent 1), 11 its child (a loader worker), 12 a sibling (another local process),
    # 20 and 21 unrelated processes, 30 one that started during the sample (seen once: left out)
    before = snapshot(p10=(1, 5.0), p11=(10, 1.0), p12=(1, 2.0), p20=(7, 100.0), p21=(7, 3.0))
    after = snapshot(p10=(1, 5.5), p11=(10, 1.5), p12=(1, 2.5), p20=(7, 100.4), p21=(7, 3.1), p30=(7, 9.0))
    alone = busy_cores(before, after, 0.5, me=10, parent=1, exclude_siblings=True)
    assert alone == pytest.approx((0.4 + 0.1) / 0.5)
    with_siblings = busy_cores(before, after, 0.5, me=10, parent=1, exclude_siblings=False)
    assert with_siblings == pytest.approx((0.4 + 0.1 + 0.5) / 0.5)


def test_cpu_seconds_are_read_for_this_process_with_its_parent():
    parent, seconds = threads.cpu_seconds_by_process()[os.getpid()]
    assert parent == os.getppid() and seconds > 0


# --- following the load while a run trains


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def follower_with(load_per_look: list[float], threads: int = 2, source: str = "policy"):
    """A ThreadFollower on a 2-core choice whose looks see these loads (one unrelated process, pid 1)."""
    clock, reads, set_to = Clock(), [], []
    cpu = {"seconds": 0.0}
    window = 0.5

    def read():
        reads.append(clock.now)
        if len(reads) % 2 == 0:  # the second read of a look: the load of this look over its window
            cpu["seconds"] += load_per_look[len(reads) // 2 - 1] * window
        return {1: (0, cpu["seconds"])}

    choice = ThreadChoice(threads, 2, 1, 0.0, source)
    follower = ThreadFollower(choice, every_s=5.0, clock=clock, read=read, set_threads=set_to.append)
    follower.active = source == "policy"  # whatever /proc the test machine has
    return follower, clock, reads, set_to


def test_the_follower_looks_every_few_seconds_over_a_window_of_steps_and_sets_what_changed():
    follower, clock, reads, set_to = follower_with([1.9, 1.8, 1.7, 0.1])
    for _ in range(3):  # steps within the first 5 s: no look
        clock.now += 1.0
        assert follower.step() is None
    assert reads == []
    clock.now += 2.0
    assert follower.step() is None and len(reads) == 1  # a look starts
    clock.now += 0.1
    assert follower.step() is None and len(reads) == 1  # a window shorter than LOAD_SAMPLE_S: it waits
    clock.now += 0.4
    new = follower.step()  # 0.5 s after the start: a busy neighbour, one thread
    assert new is not None and new.threads == 1 and new.other_load == pytest.approx(1.9) and set_to == [1]
    for _ in range(2):  # the next look: still busy, nothing to set
        clock.now += 5.0
        follower.step()
        clock.now += 0.5
        assert follower.step() is None
    assert set_to == [1] and follower.choice.other_load == pytest.approx(1.7)
    clock.now += 5.0
    follower.step()
    clock.now += 0.5
    back = follower.step()  # the neighbour left: both cores again
    assert back is not None and back.threads == 2 and set_to == [1, 2]


def test_a_pause_is_not_load_to_follow():
    follower, clock, reads, set_to = follower_with([1.9])
    clock.now += 6.0
    follower.step()  # a look starts ...
    follower.restart()  # ... and the run pauses (the benchmark's workers wait between calls)
    clock.now += 10.0
    assert follower.step() is None and len(reads) == 2  # a new look starts; the paused one is forgotten
    assert set_to == []


def test_the_users_thread_count_is_never_followed():
    follower, clock, reads, set_to = follower_with([1.9], threads=3, source="DOMAINCLIP_NUM_THREADS=3")
    for _ in range(20):
        clock.now += 1.0
        assert follower.step() is None
    assert reads == [] and set_to == []


# --- the line a run prints


def test_the_choice_is_one_line_that_says_why_and_how_to_override():
    line = ThreadChoice(1, 2, 1, 1.3, "policy").describe()
    assert line == "CPU threads: 1 of 2 cores (load 1.3 from other processes); set DOMAINCLIP_NUM_THREADS to override"
    split = ThreadChoice(4, 16, 4, 0.0, "policy").describe()
    assert split == (
        "CPU threads: 4 per process of 16 cores (4 local processes, load 0.0 from other processes); set DOMAINCLIP_NUM_THREADS to override"
    )
    users = ThreadChoice(3, 2, 1, None, "DOMAINCLIP_NUM_THREADS=3", "OMP_WAIT_POLICY=ACTIVE").describe()
    assert users == "CPU threads: 3 of 2 cores (DOMAINCLIP_NUM_THREADS=3), OpenMP waits as OMP_WAIT_POLICY=ACTIVE says"
    omp = ThreadChoice(None, 2, 1, None, "OMP_NUM_THREADS=4,2").describe()
    assert omp == "CPU threads: 4 of 2 cores (OMP_NUM_THREADS=4,2)"


def test_the_wait_setting_is_read_as_libgomp_reads_it():
    assert threads.wait_setting({}) == ""
    assert threads.wait_setting({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10"}) == "GOMP_SPINCOUNT=10"  # the count wins
    assert threads.wait_setting({"KMP_BLOCKTIME": "0"}) == "KMP_BLOCKTIME=0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the line is for CPU runs")
def test_a_cpu_run_prints_its_choice_once_and_sets_it(monkeypatch, capsys):
    from accelerate.state import AcceleratorState, GradientState

    from finetune import train
    from finetune.config.load import load_config

    before = torch.get_num_threads()
    for name in ("DOMAINCLIP_NUM_THREADS", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "ACCELERATE_DYNAMO_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    for name in threads.WAIT_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "other_processes_load", lambda **_: 1.3)
    try:
        train.build_accelerator(load_config("recipes/demo.yaml", []))
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("CPU threads:")]
        assert lines == ["CPU threads: 1 of 2 cores (load 1.3 from other processes); set DOMAINCLIP_NUM_THREADS to override"]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
