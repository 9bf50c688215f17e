"""Tests for finetune.evaluation.evaluate: worker decoding changes nothing, identical captions tie exactly,
unreadable images are skipped and counted, an unreadable set stops with its name, and sharded
evaluation (two ranks, simulated with threads) equals one process."""

from __future__ import annotations

import contextlib
import io
import threading

import datasets
import numpy as np
import pytest
import torch

import finetune.evaluation.evaluate as evaluate
from data_tools.collate import encode_captions, preprocess_images
from data_tools.loading import RetrievalSet, decode_image, load_image_text_dataset
from data_tools.synthetic.domains import all_caption_text, generate_domain
from finetune.errors import DataLoadError
from finetune.evaluation.evaluate import (
    embed_retrieval_set,
    evaluate_retrieval,
    shard_range,
)
from finetune.evaluation.metrics import retrieval_metrics
from finetune.models.lora import encode_images, encode_texts
from finetune.models.tiny_clip import build_tiny_clip

BROKEN = b"not an image"


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model, processor = build_tiny_clip(all_caption_text(per_domain=50), vocab_size=300, width=32, layers=2)
    return model.eval(), processor


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def pairs_from(image_bytes: list[bytes], captions: list[str], text_to_image: list[int]) -> datasets.Dataset:
    """A dataset in the normal form: one row per caption, images stored undecoded."""
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": image_bytes[i], "path": None} for i in text_to_image],
            "caption": captions,
            "image_index": text_to_image,
            "source_row": text_to_image,
            "image_id": [str(i) for i in text_to_image],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(decode=False),
                "caption": datasets.Value("string"),
                "image_index": datasets.Value("int64"),
                "source_row": datasets.Value("int64"),
                "image_id": datasets.Value("string"),
            }
        ),
    )


def synthetic_images(n: int, seed: int = 3) -> list[bytes]:
    return [png_bytes(im) for im in generate_domain("target", n, image_size=32, seed=seed)["image"]]


def direct_embeddings(model, processor, image_bytes, captions):
    """The reference: every readable image and every caption through the encoders in one batch each."""
    images = [decode_image(b) for b in image_bytes]
    image_emb = encode_images(model, preprocess_images(processor, [im for im in images if im is not None]))
    tokens = encode_captions(processor, captions, 32)
    return image_emb, encode_texts(model, tokens["input_ids"], tokens["attention_mask"])


def test_workers_give_identical_results(clip):
    model, processor = clip
    rset = RetrievalSet.from_pairs(
        load_image_text_dataset(
            key="data.eval.target", synthetic={"domain": "target", "num_images": 12, "captions_per_image": 2, "seed": 2}
        )
    )
    kwargs = dict(batch_size=5, max_text_length=32)
    in_main = embed_retrieval_set(model, processor, rset, num_workers=0, **kwargs)
    in_workers = embed_retrieval_set(model, processor, rset, num_workers=2, **kwargs)
    for name in ("image_emb", "text_emb", "text_to_image"):
        assert torch.equal(in_main[name], in_workers[name]), name
    assert in_main["image_emb"].shape == (12, 32) and in_main["text_emb"].shape == (24, 32)
    assert in_main["text_to_image"].tolist() == [i for i in range(12) for _ in range(2)]
    r0, c0 = evaluate_retrieval(model, processor, {"target": rset}, ks=(1, 5), num_workers=0, **kwargs)
    r2, c2 = evaluate_retrieval(model, processor, {"target": rset}, ks=(1, 5), num_workers=2, **kwargs)
    assert r0 == r2 and c0 == c2 == {"target": 0}
    assert set(r0["target"]) == {"t2i", "i2t"} and "R@5" in r0["target"]["t2i"]


def test_embeddings_match_the_encoders_and_duplicate_captions_tie_exactly(clip, monkeypatch):
    model, processor = clip
    image_bytes = synthetic_images(4)
    captions = ["round crimson opacity", "small boxy focus", "round crimson opacity", "linear bar", "small boxy focus", "x"]
    t2i = [0, 1, 2, 2, 3, 0]
    rset = RetrievalSet.from_pairs(pairs_from(image_bytes, captions, t2i))
    encoded_rows = []

    def counting_encode_texts(model, input_ids, attention_mask):
        encoded_rows.append(input_ids.shape[0])
        return encode_texts(model, input_ids, attention_mask)

    monkeypatch.setattr(evaluate, "encode_texts", counting_encode_texts)
    emb = embed_retrieval_set(model, processor, rset, batch_size=3, max_text_length=32)
    assert encoded_rows == [3, 1]  # 4 distinct texts embedded, in batches of 3
    image_ref, text_ref = direct_embeddings(model, processor, image_bytes, captions)
    torch.testing.assert_close(emb["image_emb"], image_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb["text_emb"], text_ref, rtol=1e-5, atol=1e-6)
    text = emb["text_emb"]
    assert torch.equal(text[0], text[2]) and torch.equal(text[1], text[4])  # bit-identical: ties are real ties
    assert not torch.equal(text[0], text[1])
    assert emb["text_to_image"].tolist() == t2i and emb["corrupt_images"] == 0


def test_unreadable_images_are_skipped_with_their_captions_and_counted(clip):
    model, processor = clip
    image_bytes = synthetic_images(5)
    image_bytes[1] = BROKEN
    image_bytes[3] = BROKEN[:4]
    captions = ["c0", "c1 a", "c2", "c3", "c4", "c1 b", "c0 b"]
    t2i = [0, 1, 2, 3, 4, 1, 0]
    rset = RetrievalSet.from_pairs(pairs_from(image_bytes, captions, t2i))
    emb = embed_retrieval_set(model, processor, rset, batch_size=2, max_text_length=32)
    assert emb["corrupt_images"] == 2
    assert emb["image_emb"].shape == (3, 32)
    assert emb["text_to_image"].tolist() == [0, 1, 2, 0]  # images 0, 2, 4 renumbered; captions of 1 and 3 gone
    image_ref, text_ref = direct_embeddings(model, processor, image_bytes, ["c0", "c2", "c4", "c0 b"])
    torch.testing.assert_close(emb["image_emb"], image_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb["text_emb"], text_ref, rtol=1e-5, atol=1e-6)
    results, corrupt = evaluate_retrieval(model, processor, {"target": rset}, batch_size=2, max_text_length=32, ks=(1,))
    assert corrupt == {"target": 2}
    assert results["target"] == retrieval_metrics(image_ref, text_ref, torch.tensor([0, 1, 2, 0]), (1,))


def test_an_all_unreadable_set_stops_with_its_name(clip):
    model, processor = clip
    rset = RetrievalSet.from_pairs(pairs_from([BROKEN] * 12, [f"c{i}" for i in range(12)], list(range(12))))
    with pytest.raises(DataLoadError, match=r"^eval set 'target': all 12 images are unreadable"):
        evaluate_retrieval(model, processor, {"target": rset}, batch_size=5, max_text_length=32)
    assert not model.training  # left as it was found


@pytest.mark.parametrize("n, procs", [(10, 3), (2, 3), (0, 2), (7, 1), (8, 4)])
def test_shards_are_contiguous_balanced_and_cover_everything(n, procs):
    shards = [shard_range(n, procs, p) for p in range(procs)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# --------------------------------------------------------------------------------------------------
# several processes, simulated with threads that share one all-gather


class FakeAccelerator:
    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes = rank, world
        self.device = torch.device("cpu")
        self.is_local_main_process = rank == 0

    def autocast(self):
        return contextlib.nullcontext()


def run_ranks(monkeypatch, world: int, fn) -> list:
    """fn(accelerator) on `world` threads; gather_object behaves like the collective across them."""
    barrier = threading.Barrier(world, timeout=60)
    slots: list = [None] * world
    local = threading.local()

    def gather_object(items):
        slots[local.rank] = items
        barrier.wait()
        out = [x for slot in slots for x in slot]
        barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out

    monkeypatch.setattr(evaluate, "gather_object", gather_object)
    results: list = [None] * world

    def target(rank):
        local.rank = rank
        try:
            results[rank] = fn(FakeAccelerator(rank, world))
        except Exception as exc:  # returned, so the test can check every rank raised the same
            results[rank] = exc

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_ranks_equal_one_process_even_when_a_shard_is_all_unreadable(clip, monkeypatch):
    model, processor = clip
    image_bytes = synthetic_images(5)
    image_bytes[3] = image_bytes[4] = BROKEN  # rank 1's shard (images 3, 4) has nothing readable
    captions = ["same words", "b", "same words", "d", "e", "b", "g"]
    t2i = [0, 1, 2, 3, 4, 1, 2]
    rset = RetrievalSet.from_pairs(pairs_from(image_bytes, captions, t2i))
    kwargs = dict(batch_size=2, max_text_length=32)
    one = embed_retrieval_set(model, processor, rset, **kwargs)
    ranks = run_ranks(monkeypatch, 2, lambda acc: embed_retrieval_set(model, processor, rset, accelerator=acc, **kwargs))
    for emb in ranks:
        assert not isinstance(emb, Exception), emb
        assert emb["corrupt_images"] == one["corrupt_images"] == 2
        assert torch.equal(emb["text_to_image"], one["text_to_image"])
        torch.testing.assert_close(emb["image_emb"], one["image_emb"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(emb["text_emb"], one["text_emb"], rtol=1e-5, atol=1e-6)
        assert torch.equal(emb["text_emb"][0], emb["text_emb"][2])  # "same words" embedded once
    assert one["text_to_image"].tolist() == [0, 1, 2, 1, 2]
    assert torch.equal(ranks[0]["image_emb"], ranks[1]["image_emb"])  # every rank scores the same set


def test_two_ranks_all_unreadable_raise_together(clip, monkeypatch):
    model, processor = clip
    rset = RetrievalSet.from_pairs(pairs_from([BROKEN] * 3, ["a", "b", "c"], [0, 1, 2]))
    ranks = run_ranks(
        monkeypatch,
        2,
        lambda acc: embed_retrieval_set(model, processor, rset, batch_size=2, max_text_length=32, accelerator=acc, name="source"),
    )
    for outcome in ranks:
        assert isinstance(outcome, DataLoadError)
        assert str(outcome).startswith("eval set 'source': all 3 images are unreadable")


def test_retrieval_set_holds_rows_not_bytes():
    ds = load_image_text_dataset(key="data.eval.target", synthetic={"domain": "target", "num_images": 4, "captions_per_image": 2})
    rset = RetrievalSet.from_pairs(ds)
    assert rset.image_rows.tolist() == [0, 2, 4, 6]
    assert not any(isinstance(v, (bytes, dict)) for v in vars(rset).values())
    assert np.array_equal(rset.text_to_image, np.repeat(np.arange(4), 2))
