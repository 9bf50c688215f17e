"""`domainclip`: recipes are validated before any process starts; several processes go through
Accelerate's launcher with every setting spelled out (so it has nothing to warn about)."""

from __future__ import annotations

import subprocess

import pytest

from finetune.cli import main as cli
from finetune.cli.train import TRAIN_SCRIPT


def test_validate_prints_the_resolved_recipe(capsys):
    assert cli.main(["validate", "recipes/demo.yaml", "lora.vision.rank=4"]) == 0
    out, err = capsys.readouterr()
    assert "rank: 4" in out and "batch_size: 128" in out
    assert "recipes/demo.yaml: valid" in err


@pytest.mark.parametrize("processes", ["1", "4"])
def test_a_bad_recipe_gets_one_clean_error_before_any_process_starts(processes, capsys, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a process was started for a bad recipe")

    monkeypatch.setattr(subprocess, "run", no_launch)
    monkeypatch.setattr("finetune.train.run", no_launch)
    code = cli.main(["train", "recipes/demo.yaml", "--num-processes", processes, "lora.vison.rank=4", "optim.lr=fast"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Invalid recipe recipes/demo.yaml (2 problems):")
    assert "lora.vison: unknown key; did you mean 'lora.vision'?" in err and "Traceback" not in err


def test_several_processes_go_through_the_launcher_with_every_setting(monkeypatch):
    seen = []
    monkeypatch.setattr(subprocess, "run", lambda command: seen.append(command) or subprocess.CompletedProcess(command, 3))
    assert cli.main(["train", "recipes/medical.yaml", "--num-processes", "2", "train.output_dir=/tmp/x"]) == 3
    (command,) = seen
    flags = dict(zip(command[3::2], command[4::2]))
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in command
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[command.index("--mixed_precision") + 1] == "bf16"  # the recipe's precision
    assert command[command.index("--dynamo_backend") + 1] == "no" and command[command.index("--num_machines") + 1] == "1"
    assert command[-3:] == [str(TRAIN_SCRIPT), "recipes/medical.yaml", "train.output_dir=/tmp/x"]
    assert flags  # the flag/value pairs parse


def test_num_processes_must_be_positive(capsys):
    assert cli.main(["train", "recipes/demo.yaml", "--num-processes", "0"]) == 2
    assert "--num-processes must be at least 1" in capsys.readouterr().err
