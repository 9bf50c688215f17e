"""The micro-batcher groups concurrent items into few forwards, a batch embeds like its rows one by one,
a failing item fails only its own request, and the service answers the same with batching on or off."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from finetune.errors import ExportError
from finetune.retrieval.embedders import TorchEmbedder, load_embedder
from finetune.retrieval.serve.app import build_app
from finetune.retrieval.serve.batcher import MicroBatcher
from finetune.retrieval.serve.limits import Batching, Limits

from .conftest import png_bytes


class CountingEmbed:
    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, items):
        self.calls.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot embed {self.fail_on!r}")
        return np.array([[float(i), 1.0] for i in items], dtype=np.float32)  # (N, 2)


def gather(batcher, items):
    async def go():
        return await asyncio.gather(*(batcher.submit(i) for i in items), return_exceptions=True)

    return asyncio.run(go())


def test_concurrent_items_share_one_forward_and_get_their_own_rows():
    embed = CountingEmbed()
    rows = gather(MicroBatcher(embed, max_batch=32, max_wait_ms=50, name="t"), list(range(10)))
    assert len(embed.calls) == 1 and embed.calls[0] == list(range(10))
    assert [r[0] for r in rows] == list(range(10))


def test_max_batch_bounds_a_forward_and_max_batch_1_is_one_forward_per_item():
    embed = CountingEmbed()
    batcher = MicroBatcher(embed, max_batch=4, max_wait_ms=50, name="t")
    rows = gather(batcher, list(range(10)))
    assert [len(c) for c in embed.calls] == [4, 4, 2] and [r[0] for r in rows] == list(range(10))
    assert batcher.stats()["forwards"] == 3 and batcher.stats()["largest_batch"] == 4
    single = CountingEmbed()
    gather(MicroBatcher(single, max_batch=1, max_wait_ms=0, name="t"), list(range(5)))
    assert [len(c) for c in single.calls] == [1] * 5


def test_a_failing_item_fails_only_its_own_request():
    embed = CountingEmbed(fail_on=3)
    rows = gather(MicroBatcher(embed, max_batch=8, max_wait_ms=50, name="t"), [1, 2, 3, 4])
    assert isinstance(rows[2], ValueError) and "cannot embed 3" in str(rows[2])
    assert [r[0] for i, r in enumerate(rows) if i != 2] == [1, 2, 4]


def test_a_batch_embeds_like_its_rows_one_by_one(tiny_index, corpus, searcher):
    embedder = searcher.embedder
    assert isinstance(embedder, TorchEmbedder)
    texts = [corpus["caption"][0][0], "a", corpus["caption"][5][1] + " and a much longer tail of words here", "ring"]
    batch = embedder.embed_texts(texts)  # (4, D), padded to the longest
    one_by_one = np.stack([embedder.embed_texts([t])[0] for t in texts])
    assert batch.dtype == np.float32 and batch.shape == (4, searcher.manifest["embedding_dim"])
    np.testing.assert_allclose(batch, one_by_one, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    images = [corpus["image"][i] for i in (0, 3, 9)]
    np.testing.assert_allclose(embedder.embed_images(images), np.stack([embedder.embed_images([im])[0] for im in images]), atol=1e-5)


def test_the_service_batches_concurrent_requests_and_answers_as_unbatched(searcher, corpus):
    """16 concurrent requests (texts and images) through the ASGI app: few forwards, same hits as batching off."""
    texts = [corpus["caption"][i][0] + f" {i}" for i in range(8)]  # new strings: no cache hits
    images = [png_bytes(corpus["image"][i]) for i in range(8)]

    async def run(batching: Batching):
        app = build_app(searcher, limits=Limits(), batching=batching, cache_size=64, backend="torch")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            answers = await asyncio.gather(
                *(client.post("/search", json={"text": t, "k": 5}) for t in texts),
                *(client.post("/search", files={"image": ("q.png", b, "image/png")}, data={"k": "5"}) for b in images),
            )
            info = (await client.get("/info")).json()
        assert all(a.status_code == 200 for a in answers)
        return [a.json()["hits"] for a in answers], info["batching"]

    on, on_stats = asyncio.run(run(Batching(enabled=True, max_batch=32, max_wait_ms=200)))
    off, off_stats = asyncio.run(run(Batching(enabled=False)))
    assert off_stats["text"]["forwards"] == 8 and off_stats["image"]["forwards"] == 8
    assert on_stats["text"]["items"] == 8 and on_stats["text"]["forwards"] <= 2
    assert on_stats["image"]["items"] == 8 and on_stats["image"]["forwards"] <= 2
    for a, b in zip(on, off):
        assert [h["vector_row"] for h in a] == [h["vector_row"] for h in b]
        np.testing.assert_allclose([h["score"] for h in a], [h["score"] for h in b], atol=2e-4)


def test_onnx_backend_errors_clearly_without_an_onnx_folder_or_module(tiny_index, searcher, monkeypatch, tmp_path):
    import shutil
    import sys

    export = searcher.manifest["export_dir"]
    with pytest.raises(ExportError, match="no onnx/ folder"):
        load_embedder(export, "onnx")
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    (copy / "onnx").mkdir()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the optional runtime is not installed
    with pytest.raises(ExportError, match="--backend onnx is not available"):
        load_embedder(copy, "onnx")
    with pytest.raises(ExportError, match="--backend must be one of torch, onnx"):
        load_embedder(export, "tensorrt")
