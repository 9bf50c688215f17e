"""A tiny index (tiny CLIP run -> export -> index of 40 target images with 2 captions each, both
modalities) and a Searcher over it, shared by the serve tests."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tests.finetune.runs import make_run  # a run folder without training


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory, tiny_clip_dir) -> Path:
    from finetune.cli.main import main as cli_main
    from finetune.export.exporter import export_run

    root = tmp_path_factory.mktemp("served")
    run = make_run(root / "run", tiny_clip_dir, eval_images=16)
    export_run(run, root / "export", alpha=1.0, log=lambda *_: None)
    corpus = "{synthetic: {domain: target, num_images: 40, captions_per_image: 2, seed: 4}, label_column: label}"
    assert cli_main(["index", str(root / "export"), "--corpus", corpus, "--out", str(root / "index"), "--modality", "both"]) == 0
    return root / "index"


@pytest.fixture(scope="session")
def corpus():
    from data_tools.synthetic.domains import generate_domain

    return generate_domain("target", 40, captions_per_image=2, image_size=32, seed=4)


@pytest.fixture(scope="session")
def searcher(tiny_index):
    from finetune.retrieval.search import Searcher

    return Searcher(tiny_index)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
