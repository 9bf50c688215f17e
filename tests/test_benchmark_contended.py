"""scripts/benchmark.py's contended_step entry: old and new CPU thread policies, idle and beside a busy process,
each in worker processes of its own (the numbers are meaningless at the tiny size; the shape of the entry is not)."""

from __future__ import annotations

import pytest

from finetune import threads
from scripts import benchmark

TINY = dict(model="tiny", batch=8, steps=1, rounds=1, idle_rounds=1, competitor_n=64)


def test_workers_start_as_an_untuned_cpu_run(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("DOMAINCLIP_NUM_THREADS", "2")
    env = benchmark.worker_env(DOMAINCLIP_NUM_THREADS="1")
    assert not {"OMP_NUM_THREADS", *threads.WAIT_SETTINGS} & set(env)
    assert env["DOMAINCLIP_NUM_THREADS"] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.slow  # seven processes, each loading torch
def test_contended_step_measures_both_policies_idle_and_busy():
    e = benchmark.bench_contended_step({"contended": TINY})
    m = e["measured"]
    assert e["name"] == "contended_step" and e["met"] in (True, False)
    idle = {"old", "new", "following", "following_off", "passive", "one_thread"}
    busy = {"old", "new", "following", "passive", "new_started_busy"}
    assert set(m["idle_steps_per_s"]) == idle and min(m["idle_steps_per_s"].values()) > 0
    assert set(m["busy_steps_per_s"]) == busy and min(m["busy_steps_per_s"].values()) > 0
    assert set(m["threads_idle"]) == idle and set(m["threads_busy"]) == busy
    assert m["new_idle_over_old_idle"] > 0 and m["new_idle_over_old_idle_across_processes"] > 0
    assert set(m["busy_over_idle"]) == {"old", "new_started_busy", "new_started_idle", "following", "passive"}
    choices = m["choices_at_start"]
    assert choices["old"]["openmp_wait"] == "default" and choices["old"]["other_load_at_start"] is None
    assert choices["passive"]["openmp_wait"] == "OMP_WAIT_POLICY=PASSIVE" and choices["one_thread"]["threads"] == 1
    assert choices["new_started_busy"]["other_load_at_start"] is not None
    assert {"cpu", "isa", "cores"} <= set(m["machine"]) and set(m["steal_share"]) == {"idle", "busy"}
