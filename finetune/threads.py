"""CPU threads that share the machine: as many as the cores other processes leave free, chosen at start and
followed while a run trains.

    choice = set_cpu_threads()          # torch's intra-op threads from the load now, split among local processes
    print(choice.describe())            # CPU threads: 1 of 2 cores (load 1.3 from other processes); set ...
    follower = ThreadFollower(choice)   # then once per training step:
    follower.step()                     # every few seconds, the load over one step; a new count when it changed

Why: torch's CPU kernels run on OpenMP threads, and a parallel region ends when its slowest thread does.
When another process keeps the cores busy, one of a run's threads is always the one the scheduler has just put
aside, and the others wait for it (spinning, by default, for milliseconds): two 2-thread runs on 2 cores each
ran several times slower than alone. One thread has no one to wait for. So a run takes no more threads than
the cores other processes leave free, and drops to fewer when load arrives later.

How OpenMP waits is left as it is (its default, or the user's OMP_WAIT_POLICY / GOMP_SPINCOUNT): passive
waiting and a short spin were measured and rejected (docs/performance.md): passive waiting (no spin) made the
demo model's step twice as slow on an idle machine; a short spin gained nothing idle and lost under load.

The user's settings win: DOMAINCLIP_NUM_THREADS, or OMP_NUM_THREADS except the 1 that `accelerate launch`
sets when nobody asked. Then nothing is measured, followed or changed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from finetune.errors import DomainClipError
from finetune.timing import available_cores

WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # OpenMP's, libgomp's, Intel / LLVM OpenMP's
LOAD_SAMPLE_S = 0.2  # long enough for 100 Hz CPU accounting to see a busy process; short beside a model load
FOLLOW_EVERY_S = 5.0  # how often a training run looks at the load again (a look: ~1 ms of reading /proc)


# ----------------------------------------------------------------------------- load from other processes


def cpu_seconds_by_process() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far: user + system, all threads) for every process /proc shows."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "stat")) as f:
                stat = f.read()
        except OSError:  # ended between the listing and the read
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ..., utime (11), stime (12)
        out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return out


def other_processes_load(seconds: float = LOAD_SAMPLE_S, *, exclude_siblings: bool = False) -> float | None:
    """Cores other processes kept busy over a short sample (None where there is no /proc: not Linux).

    A sample, not /proc/loadavg: the load average lags a minute behind and counts this process too."""
    if not Path("/proc/self/stat").exists():
        return None
    before = cpu_seconds_by_process()
    start = time.monotonic()
    time.sleep(seconds)
    after = cpu_seconds_by_process()
    elapsed = time.monotonic() - start
    return busy_cores(before, after, elapsed, me=os.getpid(), parent=os.getppid(), exclude_siblings=exclude_siblings)


def busy_cores(
    before: dict[int, tuple[int, float]],
    after: dict[int, tuple[int, float]],
    seconds: float,
    *,
    me: int,
    parent: int,
    exclude_siblings: bool,
) -> float:
    """Other processes' CPU seconds between two `cpu_seconds_by_process` snapshots, over the wall seconds.

    Not counted: this process, its children, and with `exclude_siblings` the processes that share its parent
    (the other local processes of this run: the split among local processes already accounts for them).
    Processes seen only once (started or ended in between) are left out."""

    def ours(pid: int, ppid: int) -> bool:
        return pid == me or ppid == me or (exclude_siblings and ppid == parent)

    busy = sum(t - before[pid][1] for pid, (ppid, t) in after.items() if pid in before and not ours(pid, ppid))
    return max(0.0, busy / seconds)


# ----------------------------------------------------------------------------- the choice


def user_thread_setting(env: Mapping[str, str]) -> str | None:
    """The variable through which the user chose the thread count, or None.

    `accelerate launch` without a config sets OMP_NUM_THREADS=1 for the script (ACCELERATE_DYNAMO_BACKEND
    marks its processes): that 1 is its default, not the user's choice."""
    if env.get("DOMAINCLIP_NUM_THREADS"):
        return "DOMAINCLIP_NUM_THREADS"
    launched_by_accelerate = "ACCELERATE_DYNAMO_BACKEND" in env
    if env.get("OMP_NUM_THREADS") and not (launched_by_accelerate and env["OMP_NUM_THREADS"] == "1"):
        return "OMP_NUM_THREADS"
    return None


@dataclass(frozen=True)
class ThreadChoice:
    threads: int | None  # torch intra-op threads to set; None: keep what OMP_NUM_THREADS gave torch
    cores: int  # this process's affinity
    local_processes: int
    other_load: float | None  # cores busy with other processes when measured; None: not measured
    source: str  # "policy", or the user's setting: "DOMAINCLIP_NUM_THREADS=3", "OMP_NUM_THREADS=4"
    wait: str = ""  # the user's OpenMP wait setting, e.g. "OMP_WAIT_POLICY=PASSIVE" ("" none: OpenMP's default)

    def describe(self) -> str:
        """One line for the run's output: the choice, its reason, and how to override it."""
        if self.source == "policy":
            per = " per process" if self.local_processes > 1 else ""
            why = [f"{self.local_processes} local processes"] if self.local_processes > 1 else []
            if self.other_load is not None:
                why.append(f"load {self.other_load:.1f} from other processes")
            threads = f"{self.threads}{per} of {self.cores} cores" + (f" ({', '.join(why)})" if why else "")
            hint = "; set DOMAINCLIP_NUM_THREADS to override"
        else:
            count = self.source.partition("=")[2].split(",")[0]  # OMP_NUM_THREADS may list nested levels: 4,2
            threads, hint = f"{count} of {self.cores} cores ({self.source})", ""
        wait = f", OpenMP waits as {self.wait} says" if self.wait else ""
        return f"CPU threads: {threads}{wait}{hint}"


def wait_setting(env: Mapping[str, str]) -> str:
    """The user's say on how OpenMP waits, as libgomp reads it (GOMP_SPINCOUNT before OMP_WAIT_POLICY); "" none."""
    return next((f"{k}={env[k]}" for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "KMP_BLOCKTIME") if env.get(k)), "")


def choose_cpu_threads(*, cores: int, local_processes: int, other_load: float | None, env: Mapping[str, str]) -> ThreadChoice:
    """The user's thread count if they set one; else the cores other processes leave free, shared among the
    local processes, at least 1 and at most an equal split (rounded to the nearest core)."""
    local = max(1, local_processes)
    wait = wait_setting(env)
    source = user_thread_setting(env)
    if source == "DOMAINCLIP_NUM_THREADS":
        value = env["DOMAINCLIP_NUM_THREADS"]
        if not value.isdigit() or int(value) < 1:
            raise DomainClipError(f"DOMAINCLIP_NUM_THREADS: must be a whole number >= 1, got {value!r}")
        return ThreadChoice(int(value), cores, local, other_load, f"{source}={value}", wait)
    if source == "OMP_NUM_THREADS":  # torch read it when it loaded: nothing to set
        return ThreadChoice(None, cores, local, other_load, f"{source}={env[source]}", wait)
    free = cores - (other_load or 0.0)
    threads = max(1, min(cores // local, math.floor(free / local + 0.5)))
    return ThreadChoice(threads, cores, local, other_load, "policy", wait)


def set_torch_threads(n: int) -> None:
    import torch  # callers have torch already; this module stays importable without it

    # Only a change: torch.set_num_threads also pins MKL to every thread for the smallest matmul (MKL dynamic off).
    if n != torch.get_num_threads():
        torch.set_num_threads(n)


def set_cpu_threads(env: Mapping[str, str] = os.environ) -> ThreadChoice:
    """Measure the other processes' load (unless the user chose the count), choose, and set torch's threads."""
    local = int(env.get("LOCAL_WORLD_SIZE", "1"))
    load = None if user_thread_setting(env) else other_processes_load(exclude_siblings=local > 1)
    choice = choose_cpu_threads(cores=available_cores(), local_processes=local, other_load=load, env=env)
    if choice.threads is not None:
        set_torch_threads(choice.threads)
    return choice


class ThreadFollower:
    """Re-chooses the thread count while a run trains, for load that arrives (or leaves) after the start.

    Call `step()` once per training step, from the thread that runs the step (OpenMP's thread count is that
    thread's setting). Every `every_s` seconds it reads every process's CPU time, again once at least
    LOAD_SAMPLE_S later (a step or more: the load while this run computes, not while it waits), chooses as at
    the start and sets the new count when it differs. A user's own count is never changed."""

    def __init__(
        self,
        choice: ThreadChoice,
        *,
        every_s: float = FOLLOW_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        read: Callable[[], dict[int, tuple[int, float]]] = cpu_seconds_by_process,
        set_threads: Callable[[int], None] = set_torch_threads,
    ):
        self.choice = choice
        self.every_s, self.clock, self.read, self.set_threads = every_s, clock, read, set_threads
        self.active = choice.source == "policy" and Path("/proc/self/stat").exists()
        self.next_look = clock() + every_s
        self.window: tuple[float, dict[int, tuple[int, float]]] | None = None  # (start, snapshot) of a look under way

    def restart(self) -> None:
        """Forget a look under way: after a pause in which this run did not compute, its window would count the pause."""
        self.window = None

    def step(self) -> ThreadChoice | None:
        """The new choice when the thread count changed, else None."""
        if not self.active:
            return None
        now = self.clock()
        if self.window is None:
            if now >= self.next_look:
                self.window = (now, self.read())
            return None
        start, before = self.window
        if now - start < LOAD_SAMPLE_S:
            return None
        self.window, self.next_look = None, now + self.every_s
        c = self.choice
        load = busy_cores(before, self.read(), now - start, me=os.getpid(), parent=os.getppid(), exclude_siblings=c.local_processes > 1)
        new = choose_cpu_threads(cores=c.cores, local_processes=c.local_processes, other_load=load, env={})
        new = replace(new, wait=c.wait)
        changed = new.threads != c.threads
        self.choice = new
        if changed:
            self.set_threads(new.threads)
        return new if changed else None
