"""Hub lookups fail fast when the Hub is out of reach: one connect check, the cache still serves, the
error says why and what to do."""

from __future__ import annotations

import logging
import shutil
import socket

import huggingface_hub
import pytest
from huggingface_hub import constants

from data_tools import hub
from data_tools.loading import load_image_text_dataset
from finetune.errors import DataLoadError, ModelLoadError
from finetune.models.load import load_model, load_model_config


@pytest.fixture
def closed_endpoint(monkeypatch):
    """HF_ENDPOINT pointed at a local port nobody listens on; offline switches off; no proxy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", *hub._PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_REACHABILITY", {})
    return port


def test_an_endpoint_nobody_listens_on_is_unreachable_and_remembered(closed_endpoint, monkeypatch):
    reason = hub.hub_unreachable()
    assert reason is not None and reason.startswith(f"127.0.0.1:{closed_endpoint}: ")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("checked twice"))
    assert hub.hub_unreachable() == reason  # one check per process


def test_a_proxy_skips_the_check(closed_endpoint, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert hub.hub_unreachable() is None


def test_hub_or_cache_turns_on_offline_mode_only_for_unreachable_hub_lookups(closed_endpoint, tmp_path):
    with hub.hub_or_cache("org/model"):
        assert huggingface_hub.constants.is_offline_mode()
    assert not huggingface_hub.constants.is_offline_mode()  # restored
    with pytest.raises(RuntimeError), hub.hub_or_cache("org/model"):
        raise RuntimeError("load failed")
    assert not huggingface_hub.constants.is_offline_mode()  # restored on errors too
    with hub.hub_or_cache(str(tmp_path)):  # a local folder is not a hub lookup
        assert not huggingface_hub.constants.is_offline_mode()


def test_an_unreachable_hub_id_fails_in_one_attempt_with_the_hint(closed_endpoint, caplog):
    caplog.set_level(logging.WARNING)
    with pytest.raises(ModelLoadError) as info:
        load_model_config("nonexistent-org/never-cached")
    message = str(info.value)
    assert message.startswith("model.name_or_path: could not load the model config from hub id 'nonexistent-org/never-cached'")
    assert f"The Hub cannot be reached (127.0.0.1:{closed_endpoint}: " in message
    assert "set HF_HUB_OFFLINE=1" in message
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]  # huggingface_hub never retried


def test_an_unreachable_hub_id_still_loads_from_the_cache(closed_endpoint, tiny_clip_dir, tmp_path, monkeypatch):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = tmp_path / "hub" / "models--org--tiny-clip"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_clip_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config = load_model_config("org/tiny-clip")
    assert config.projection_dim == load_model_config(str(tiny_clip_dir)).projection_dim
    model, processor = load_model("org/tiny-clip")
    assert type(model).__name__ == "CLIPModel" and processor is not None


def test_offline_note_names_the_cause(closed_endpoint, monkeypatch, tmp_path):
    assert "The Hub cannot be reached" in hub.offline_note("org/model")
    assert hub.offline_note(str(tmp_path)) == ""  # local: being offline is not the cause
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline_note("org/model") == " The machine is offline (HF_HUB_OFFLINE is set): only local folders and the cache can be used."


def test_an_unreachable_hub_dataset_fails_in_one_attempt_with_the_hint(closed_endpoint, caplog):
    caplog.set_level(logging.WARNING)
    with pytest.raises(DataLoadError) as info:
        load_image_text_dataset(key="data.train", path="nonexistent-org/never-cached-dataset", split="train")
    message = str(info.value)
    assert message.startswith("data.train.path: could not load dataset 'nonexistent-org/never-cached-dataset' (split 'train'): ")
    assert f"The Hub cannot be reached (127.0.0.1:{closed_endpoint}: " in message
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]
