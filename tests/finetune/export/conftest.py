"""Fixtures of the export tests: a finished run folder (see tests/finetune/runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.finetune.runs import make_run


@pytest.fixture
def run_dir(tmp_path, tiny_clip_dir) -> Path:
    return make_run(tmp_path / "run", tiny_clip_dir)
