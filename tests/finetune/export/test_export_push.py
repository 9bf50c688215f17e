"""`domainclip push`: the dry-run folder holds what would go up and a card whose model-index parses
with huggingface_hub and carries the metrics; the upload calls the Hub API with that folder (mocked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData

from finetune.cli.main import main as cli_main
from finetune.errors import ExportError
from finetune.export import push as push_module
from tests.finetune.runs import make_run

RESULTS = {
    "zero_shot": {"target": {"t2i": {"R@1": 1.5, "R@5": 4.0, "mean_rank": 30.0}, "i2t": {"R@1": 2.0, "R@5": 5.0}}},
    "adapted": {"target": {"t2i": {"R@1": 41.25, "R@5": 80.0, "mean_rank": 3.0}, "i2t": {"R@1": 38.0, "R@5": 77.0}}},
}


@pytest.fixture
def finished_run(tmp_path, tiny_clip_dir) -> Path:
    run = make_run(tmp_path / "run", tiny_clip_dir)
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps(RESULTS))
    return run


def metric(card: ModelCard, name: str, direction: str) -> float:
    return next(r.metric_value for r in card.data.eval_results if r.metric_name == name and r.task_type == f"{direction}-retrieval")


def test_dry_run_writes_the_folder_and_a_valid_card_with_the_metrics(finished_run, tmp_path, capsys):
    staging = tmp_path / "staging"
    assert cli_main(["push", str(finished_run), "--repo", "me/tiny-clip-lora", "--dry-run", "--staging", str(staging)]) == 0
    assert "nothing uploaded" in capsys.readouterr().out
    files = {str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.yaml",
        "README.md",
        "tokenizer.json",
        "processor_config.json",
        "eval/results.json",
    } <= files
    card = ModelCard.load(staging / "README.md")
    ModelCardData(**card.data.to_dict(), ignore_metadata_errors=False)  # huggingface_hub's own model-index parsing
    assert card.data.base_model is None and card.data.library_name == "peft"  # a local base is no hub id
    assert metric(card, "zero-shot R@1", "t2i") == 1.5 and metric(card, "adapted R@1", "t2i") == 41.25
    assert metric(card, "adapted R@5", "i2t") == 77.0
    assert not any("mean_rank" in r.metric_name for r in card.data.eval_results)
    assert "model-index" in (staging / "README.md").read_text().split("---")[1]


class FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        files = sorted(str(p.relative_to(kwargs["folder_path"])) for p in Path(kwargs["folder_path"]).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", {**kwargs, "files": files}))


def test_upload_calls_the_hub_with_the_repo_and_the_staged_files(finished_run, monkeypatch, capsys):
    api = FakeApi()
    monkeypatch.setattr(push_module, "HfApi", lambda: api)
    monkeypatch.setenv("HF_TOKEN", "hf_secretsecretsecret")
    assert cli_main(["push", str(finished_run), "--repo", "me/tiny", "--private"]) == 0
    (name1, create), (name2, upload) = api.calls
    assert name1 == "create_repo" and create == {"repo_id": "me/tiny", "private": True, "exist_ok": True, "repo_type": "model"}
    assert name2 == "upload_folder" and upload["repo_id"] == "me/tiny" and upload["repo_type"] == "model"
    assert {"README.md", "adapter_model.safetensors", "config.yaml"} <= set(upload["files"])
    out = capsys.readouterr()
    assert "https://huggingface.co/me/tiny" in out.out and "hf_secret" not in out.out + out.err


def test_push_names_what_is_missing(tmp_path, finished_run):
    with pytest.raises(ExportError, match="neither a run folder"):
        push_module.push(tmp_path, "me/x", dry_run=True)
    with pytest.raises(ExportError, match="--repo: expected user/name"):
        push_module.push(finished_run, "no-slash", dry_run=True)
    (finished_run / "eval" / "results.json").unlink()
    with pytest.raises(ExportError, match="results.json not found"):
        push_module.push(finished_run, "me/x", dry_run=True)
