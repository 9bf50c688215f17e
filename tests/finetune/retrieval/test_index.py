"""Index choice, tuning to a recall target on a corpus big enough to need it, self-retrieval, the
manifest and id map round trip, and search through the command (text, image, image->text, fused)."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pandas as pd
import pytest

from finetune.cli.main import main as cli_main
from finetune.errors import ExportError
from finetune.export.exporter import export_run
from finetune.retrieval.index import (
    build_index,
    choose_factory,
    exact_neighbours,
    read_index_manifest,
    recall_at,
)
from finetune.retrieval.search import Searcher
from tests.finetune.runs import make_run


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_choose_factory_by_size_and_budget():
    assert choose_factory(3000, 64, 2 * 10**9)[0] == "Flat"
    assert choose_factory(50_000, 64, 2 * 10**9)[0] == "IVF1024,Flat"
    factory, why = choose_factory(1_000_000, 512, 200 * 10**6)  # 2 GB of raw floats in 200 MB
    assert factory.startswith("OPQ") and ",PQ" in factory and "exceed the budget" in why
    m = int(factory.split(",PQ")[1])
    assert 512 % m == 0 and 1_000_000 * m < 200 * 10**6
    with pytest.raises(ExportError, match="--memory-budget"):
        choose_factory(1_000_000, 512, 5 * 10**6)


def test_tight_budgets_get_the_widest_residual_scalar_codes_that_fit():
    flat = 1_000_000 * 512 * 4
    assert choose_factory(1_000_000, 512, int(0.3 * flat))[0] == "IVF4096,SQ8"
    factory, why = choose_factory(1_000_000, 512, int(0.2 * flat))
    assert factory == "IVF4096,SQ6" and "6-bit residual scalar codes" in why
    # 100k: 1024 lists' centroids (2 MB) leave no room for 6-bit codes; 512 lists do.
    assert choose_factory(100_000, 512, int(0.2 * 100_000 * 2048))[0] == "IVF512,SQ6"
    assert choose_factory(100_000, 512, int(0.15 * 100_000 * 2048))[0] == "IVF1024,SQ4"


def test_residual_scalar_codes_fit_the_budget_rank_better_than_whole_vector_codes_and_stop_tuning_at_their_cap():
    vectors = clustered(20_000, 64, 100, seed=0)
    tuning = clustered(300, 64, 100, seed=1)
    budget = int(0.2 * vectors.nbytes)
    with pytest.warns(UserWarning, match=r"IVF512,SQ4: best recall@10 0\.\d+ is below the target 0\.95"):
        index, entry = build_index(vectors, tuning, memory_budget=budget, target_recall=0.95)
    assert entry["factory"] == "IVF512,SQ4" and entry["index_type"] == "IndexIVFScalarQuantizer"
    assert len(faiss.serialize_index(index)) <= budget
    # The codes cap recall: tuning stops once doubling nprobe twice gains nothing, long before 512 lists.
    recalls = [t["recall_at_10"] for t in entry["tuning"]]
    assert entry["tuning"][-1]["nprobe"] < 512 and recalls[-1] <= recalls[-3]
    # Same lists, same bits, codes of the whole vector instead of its residual from the centroid.
    whole = faiss.index_factory(64, "IVF512,SQ4", faiss.METRIC_INNER_PRODUCT)
    whole.by_residual = False
    whole.train(vectors)
    whole.add(vectors)
    whole.nprobe = faiss.downcast_index(index).nprobe
    truth = exact_neighbours(vectors, tuning, 10)
    assert recall_at(index, tuning, truth) >= recall_at(whole, tuning, truth) + 0.2


def test_tuned_ivf_meets_its_recall_target_on_50k_clustered_vectors_and_finds_itself():
    vectors = clustered(50_000, 32, 200, seed=0)
    tuning, held_out = clustered(500, 32, 200, seed=1), clustered(500, 32, 200, seed=2)
    index, entry = build_index(vectors, tuning, memory_budget=2 * 10**9, target_recall=0.95)
    assert entry["factory"].startswith("IVF") and entry["target_met"] and entry["recall_at_10"] >= 0.95
    nprobe = int(entry["search_params"].split("=")[1])
    assert nprobe < int(entry["factory"][3:].split(",")[0])  # approximate: fewer lists than all of them
    assert entry["tuning"][-1]["nprobe"] == nprobe and all(t["recall_at_10"] < 0.95 for t in entry["tuning"][:-1])
    # Fresh queries from the same distribution, not used for tuning: the operating point holds.
    assert recall_at(index, held_out, exact_neighbours(vectors, held_out, 10)) >= 0.93
    _, first = index.search(vectors[:200], 1)
    assert (first[:, 0] == np.arange(200)).all()
    assert entry["latency_ms"]["p99"] >= entry["latency_ms"]["p50"] > 0


def test_flat_index_retrieves_every_vector_first():
    vectors = clustered(300, 16, 5, seed=0)
    index, entry = build_index(vectors, vectors[:50], memory_budget=10**9, target_recall=0.95)
    assert entry["factory"] == "Flat" and entry["recall_at_10"] == 1.0
    assert (index.search(vectors, 1)[1][:, 0] == np.arange(300)).all()


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_clip_dir):
    root = tmp_path_factory.mktemp("indexed")
    run = make_run(root / "run", tiny_clip_dir, eval_images=16)
    export_run(run, root / "export", alpha=1.0, log=lambda *_: None)
    corpus = "{synthetic: {domain: target, num_images: 40, captions_per_image: 2, seed: 4}}"
    assert cli_main(["index", str(root / "export"), "--corpus", corpus, "--out", str(root / "index"), "--modality", "both"]) == 0
    return root


def test_index_writes_plain_faiss_id_maps_and_a_manifest_that_round_trips(indexed):
    manifest = read_index_manifest(indexed / "index")
    assert json.loads((indexed / "index" / "manifest.json").read_text()) == manifest
    export = json.loads((indexed / "export" / "manifest.json").read_text())
    assert manifest["model_sha256"] == export["weights_sha256"] and manifest["embedding_dim"] == export["embedding_dim"]
    for kind, vectors in (("image", 40), ("text", 80)):
        entry = manifest["indexes"][kind]
        index = faiss.read_index(str(indexed / "index" / entry["file"]))  # plain faiss, no toolkit code
        ids = pd.read_parquet(indexed / "index" / entry["id_map"])
        assert index.ntotal == len(ids) == entry["vectors"] == vectors and index.d == export["embedding_dim"]
        assert entry["factory"] == "Flat" and entry["recall_at_10"] == 1.0
        assert {"p50", "p99"} <= set(entry["latency_ms"]) and entry["build_seconds"] >= 0
    ids = pd.read_parquet(indexed / "index" / "image_ids.parquet")
    assert list(ids["image_id"][:3]) == ["0", "1", "2"] and set(ids["label"]) and ids["caption"].str.len().min() > 0


def test_search_text_image_image_to_text_and_fused(indexed, tmp_path, capsys):
    from data_tools.synthetic.domains import generate_domain

    corpus = generate_domain("target", 40, captions_per_image=2, image_size=32, seed=4)
    image_path = tmp_path / "query.png"
    corpus["image"][7].save(image_path)
    searcher = Searcher(indexed / "index")
    by_image = searcher.search(image=str(image_path), k=3)
    assert by_image["hits"][0]["image_id"] == "7" and by_image["hits"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    to_text = searcher.search(image=str(image_path), k=5, against="text")
    assert to_text["against"] == "text" and len(to_text["hits"]) == 5
    text = corpus["caption"][7][0]
    by_text = searcher.search(text=text, k=5)
    assert by_text["query"]["kind"] == "text" and [h["rank"] for h in by_text["hits"]] == [1, 2, 3, 4, 5]
    fused = searcher.search(text=text, image=str(image_path), weight=0.5, k=3)
    assert fused["query"]["kind"].startswith("fused")
    # fused vector == normalised mean of the two unit embeddings
    v = searcher.embed_image(str(image_path)) * 0.5 + searcher.embed_text(text) * 0.5
    assert fused["hits"][0]["score"] == pytest.approx(
        float(searcher.indexes["image"].search((v / np.linalg.norm(v))[None], 1)[0][0, 0]), abs=1e-4
    )
    assert searcher.cache.hits >= 2  # the text and image embeddings were reused

    assert cli_main(["search", str(indexed / "index"), "--image", str(image_path), "-k", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["hits"][0]["image_id"] == "7" and len(printed["hits"]) == 2
    assert cli_main(["search", str(indexed / "index"), "--text", text, "-k", "2"]) == 0
    assert "text query" in capsys.readouterr().out

    # --filter: only the named ids, in the unfiltered ranking's order; a field the id map lacks is an error
    ranked = [h["image_id"] for h in searcher.search(text=text, k=40)["hits"]]
    wanted = ranked[5:10]
    args = [a for image_id in reversed(wanted) for a in ("--filter", f"image_id={image_id}")]
    assert cli_main(["search", str(indexed / "index"), "--text", text, "-k", "4", "--json", *args]) == 0
    assert [h["image_id"] for h in json.loads(capsys.readouterr().out)["hits"]] == wanted[:4]
    assert cli_main(["search", str(indexed / "index"), "--text", text, "--filter", "colour=red"]) == 2
    assert "filters.colour: not a field of the image id map" in capsys.readouterr().err


def test_search_refuses_an_index_built_with_another_model(indexed, tmp_path):
    import shutil

    copy = tmp_path / "index"
    shutil.copytree(indexed / "index", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="does not match export .*model hash"):
        Searcher(copy)


@pytest.mark.slow
def test_two_processes_index_the_same_vectors_as_one(indexed, tmp_path):
    """`accelerate launch` the same script: each process embeds a shard, the main one builds the index."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[3]
    corpus = "{synthetic: {domain: target, num_images: 40, captions_per_image: 2, seed: 4}}"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(port),
            str(root / "scripts" / "index.py"),
            str(indexed / "export"),
            "--corpus",
            corpus,
            "--out",
            str(tmp_path / "index"),
            "--modality",
            "both",
        ],
        check=True,
        cwd=root,
        timeout=300,
    )
    for kind in ("image", "text"):
        one = faiss.read_index(str(indexed / "index" / f"{kind}.faiss"))
        two = faiss.read_index(str(tmp_path / "index" / f"{kind}.faiss"))
        np.testing.assert_allclose(one.reconstruct_n(0, one.ntotal), two.reconstruct_n(0, two.ntotal), atol=1e-5)
        pd.testing.assert_frame_equal(
            pd.read_parquet(indexed / "index" / f"{kind}_ids.parquet"), pd.read_parquet(tmp_path / "index" / f"{kind}_ids.parquet")
        )
