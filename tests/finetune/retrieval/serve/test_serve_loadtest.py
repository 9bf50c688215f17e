"""The real thing: scripts/loadtest.py starts uvicorn on 127.0.0.1 (batching on, then off), sends a
small mixed load with malformed requests, and reports 0 server errors and every malformed one a 4xx."""

from __future__ import annotations

import json

import pytest

from finetune.cli.main import main as cli_main


def run_loadtest(index, tmp_path, capsys, *extra):
    from scripts.loadtest import main

    out = tmp_path / "load.json"
    code = main(["--index", str(index), "--concurrency", "8", "--out", str(out), "--log", str(tmp_path / "server.log"), *extra])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"], (tmp_path / "server.log").read_text()[-3000:]
    assert report == json.loads(out.read_text())
    return report


def check_run(run):
    from scripts.loadtest import MALFORMED

    assert run["server_errors"] == 0 and run["malformed_not_4xx"] == 0 and run["valid_not_200"] == 0
    assert run["server_alive_until_stopped"]
    assert run["requests_per_s"] > 0 and run["latency_ms"]["all"]["p99"] >= run["latency_ms"]["all"]["p50"] > 0
    assert run["malformed_by_kind"]
    for kind, statuses in run["malformed_by_kind"].items():
        assert kind in MALFORMED and all(400 <= int(s) < 500 for s in statuses)


def test_loadtest_against_a_real_server(tiny_index, tmp_path, capsys):
    report = run_loadtest(tiny_index, tmp_path, capsys, "--requests", "40", "--modes", "on")
    assert sum(report["mix"].values()) == 40 and report["mix"]["malformed"] > 0 and "batching_off" not in report
    assert report["backend"] == "torch"
    check_run(report["batching_on"])


@pytest.mark.slow
def test_loadtest_batching_on_and_off(tiny_index, tmp_path, capsys):
    report = run_loadtest(tiny_index, tmp_path, capsys, "--requests", "200")
    for mode in ("batching_on", "batching_off"):
        check_run(report[mode])
    assert report["batching_off"]["model_forwards"]["image"]["mean_batch"] == 1.0
    assert report["throughput_ratio_on_vs_off"] > 0


def test_serve_command_refuses_a_missing_index(tmp_path, capsys):
    assert cli_main(["serve", str(tmp_path / "nothing")]) == 2
    assert "nothing: no such index folder" in capsys.readouterr().err


def test_only_loopback_hosts_count_as_local():
    from finetune.cli.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def test_the_script_is_the_command(capsys):
    import pytest as _pytest

    from scripts.serve import main as script_main

    for entry in (lambda: script_main(["--help"]), lambda: cli_main(["serve", "--help"])):
        with _pytest.raises(SystemExit):
            entry()
    first, second = capsys.readouterr().out.split("usage: domainclip serve")[1:]
    assert first == second and "--max-image-pixels" in first
