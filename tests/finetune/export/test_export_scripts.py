"""scripts/export.py, index.py, search.py, push.py are the same commands as `domainclip <name>`."""

from __future__ import annotations

import importlib

import pytest

from finetune.cli.main import main as cli_main


@pytest.mark.parametrize("name", ["export", "index", "search", "push"])
def test_script_and_subcommand_share_one_parser(name, capsys):
    script = importlib.import_module(f"scripts.{name}")
    with pytest.raises(SystemExit) as exit_script:
        script.main(["--help"])
    from_script = capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_cli:
        cli_main([name, "--help"])
    assert exit_script.value.code == exit_cli.value.code == 0
    assert from_script == capsys.readouterr().out and f"usage: domainclip {name}" in from_script


def test_search_without_a_query_gets_the_services_message(capsys):
    assert cli_main(["search", "some-index"]) == 2
    assert capsys.readouterr().err == "error: text: give a text, an image (multipart `image` file), or both\n"


def test_export_of_a_folder_that_is_no_run_names_it(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert f"no resolved config at {tmp_path}/config.yaml" in capsys.readouterr().err
