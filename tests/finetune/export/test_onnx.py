"""`domainclip export --onnx / --onnx-int8` and `OnnxEmbedder`: the graphs reproduce PyTorch on other batch
sizes and sequence lengths than they were traced with, the int8 graphs are smaller and within the R@1 gate,
the manifest records files / opset / sha256 / parity, a broken graph trips the parity gate and writes
nothing, and the dual encoder (XLM-R text tower) exports too."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx as onnx_lib
import pytest
import torch
import torch.nn.functional as F

from data_tools.collate import encode_captions, preprocess_images
from data_tools.synthetic.domains import generate_domain
from finetune.cli.main import main as cli_main
from finetune.errors import ExportError
from finetune.export import onnx as onnx_export
from finetune.export.exporter import export_run
from finetune.export.merge import file_sha256, load_export
from finetune.models.towers import image_features, text_features
from finetune.retrieval.embedders import OnnxEmbedder, OnnxTowers, TorchEmbedder
from tests.finetune.runs import DEMO_BASE, make_run

CAPTIONS = [  # lengths differ from the two example captions the graphs were traced with
    "large round opacity, crimson tint, upper left",
    "ring",
    "a small blue square in the bottom right corner, drawn twice over a dark textured background",
    "boxy",
    "star star star",
]


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tiny_clip_dir):
    """A tiny CLIP run exported with --onnx-int8 (the gate opened wide: an untrained tiny model's R@1 is noise)."""
    root = tmp_path_factory.mktemp("onnx-export")
    run = make_run(root / "run", tiny_clip_dir, export={"max_r1_drop": 100.0})
    manifest = export_run(run, root / "export", alpha=1.0, onnx_int8=True, log=quiet)
    return root / "export", manifest


def torch_reference(model, processor, images, texts, max_len):
    """The PyTorch path written out: processor, model table forward, L2 normalisation."""
    with torch.no_grad():
        image = F.normalize(image_features(model, preprocess_images(processor, images)), dim=-1)
        tokens = encode_captions(processor, texts, max_len)
        text = F.normalize(text_features(model, tokens["input_ids"], tokens["attention_mask"]), dim=-1)
    return image.numpy(), text.numpy()


def images(n, seed=5):
    return generate_domain("target", n, image_size=48, seed=seed)["image"]  # not the processor's size: it resizes


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_graphs_match_pytorch_on_other_batch_sizes_and_sequence_lengths(tiny_export):
    out, manifest = tiny_export
    model, processor, _ = load_export(out)
    towers = OnnxTowers(out / "onnx", {"image": "image.onnx", "text": "text.onnx"}, num_threads=1)
    for batch in (1, 5):  # traced with 2 images and 2 captions of another length
        pixels = preprocess_images(processor, images(batch))
        tokens = encode_captions(processor, CAPTIONS[:batch], manifest["max_text_length"])
        with torch.no_grad():
            ref_image = F.normalize(image_features(model, pixels), dim=-1).numpy()
            ref_text = F.normalize(text_features(model, tokens["input_ids"], tokens["attention_mask"]), dim=-1).numpy()
        got_image = towers.image_embeddings(pixels.numpy())
        got_text = towers.text_embeddings(tokens["input_ids"].numpy(), tokens["attention_mask"].numpy())
        assert got_image.shape == ref_image.shape == (batch, manifest["embedding_dim"])
        assert got_text.shape == (batch, manifest["embedding_dim"])
        assert cosines(got_image, ref_image).min() >= 0.999 and cosines(got_text, ref_text).min() >= 0.999
        np.testing.assert_allclose(np.linalg.norm(got_text, axis=1), 1.0, atol=1e-5)
    assert tokens["input_ids"].shape[1] > 7  # the longest caption is longer than the traced ones
    graph = onnx_lib.load(str(out / "onnx" / "text.onnx")).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}


def test_manifest_records_files_opset_hashes_parity_and_throughput(tiny_export):
    out, manifest = tiny_export
    assert json.loads((out / "manifest.json").read_text()) == manifest
    entry = manifest["onnx"]
    assert entry["exporter"] == "torch.onnx.export(dynamo=True)" and entry["opset"] >= 17
    assert entry["opset"] == onnx_export.graph_opset(out / "onnx" / "text.onnx")
    assert set(entry["files"]) == {"fp32", "int8"}
    for kind in ("fp32", "int8"):
        for tower in ("image", "text"):
            f = entry["files"][kind][tower]
            assert f["sha256"] == file_sha256(out / f["path"]) and f["bytes"] == (out / f["path"]).stat().st_size
    parity = entry["parity"]
    assert parity["images"] == 24 and parity["captions"] >= 1 and parity["min_cosine_required"] == 0.999
    assert parity["fp32"]["min_cosine"] >= 0.999 and parity["fp32"]["image_mean_cosine"] >= parity["fp32"]["image_min_cosine"]
    assert set(entry["throughput"]) == {"pytorch_fp32", "onnx_fp32", "onnx_int8"}
    assert all(v["images_per_s"] > 0 and v["captions_per_s"] > 0 for v in entry["throughput"].values())
    # The results table holds the ONNX rows next to fp32, and the deltas agree with the parity entry.
    results = manifest["results"]
    assert set(results) == {"fp32", "onnx_fp32", "onnx_int8"}
    assert results["onnx_fp32"]["target"]["t2i"]["R@1"] == pytest.approx(results["fp32"]["target"]["t2i"]["R@1"])
    assert (out / "eval" / "results.md").read_text().count("onnx-int8") >= 1


def test_int8_graphs_are_smaller_and_close(tiny_export):
    out, manifest = tiny_export
    files = manifest["onnx"]["files"]
    for tower in ("image", "text"):
        assert files["int8"][tower]["bytes"] < 0.75 * files["fp32"][tower]["bytes"]
    assert manifest["onnx"]["parity"]["int8"]["min_cosine"] > 0.95  # measured 0.99+ on this tiny model


def test_one_interface_torch_and_onnx_embedders_agree(tiny_export):
    """The torch backend (from the export folder, in batches of 3) and the ONNX backend give the same rows
    as the reference forward, with the same embedding_dim and the same empty-input shape."""
    out, manifest = tiny_export
    model, processor, _ = load_export(out)
    pics = images(7)
    ref_image, ref_text = torch_reference(model, processor, pics, CAPTIONS, manifest["max_text_length"])
    torch_backend = TorchEmbedder.from_export(out, batch_size=3)
    onnx_backend = OnnxEmbedder(out, num_threads=1, batch_size=3)
    assert torch_backend.manifest == onnx_backend.manifest == manifest
    for embedder in (torch_backend, onnx_backend):
        assert embedder.embedding_dim == manifest["embedding_dim"]
        np.testing.assert_allclose(embedder.embed_images(pics), ref_image, atol=2e-5)
        np.testing.assert_allclose(embedder.embed_texts(CAPTIONS), ref_text, atol=2e-5)
        assert embedder.embed_images([]).shape == embedder.embed_texts([]).shape == (0, manifest["embedding_dim"])


def test_embedder_equals_the_torch_path_and_picks_int8_when_asked(tiny_export):
    out, manifest = tiny_export
    model, processor, _ = load_export(out)
    pics = images(7)
    ref_image, ref_text = torch_reference(model, processor, pics, CAPTIONS, manifest["max_text_length"])

    embedder = OnnxEmbedder(out, num_threads=1, batch_size=3)  # batches of 3: 7 images in 3 calls
    got_image, got_text = embedder.embed_images(pics), embedder.embed_texts(CAPTIONS)
    assert got_image.dtype == np.float32 and got_image.shape == (7, manifest["embedding_dim"])
    np.testing.assert_allclose(got_image, ref_image, atol=2e-5)
    np.testing.assert_allclose(got_text, ref_text, atol=2e-5)
    assert embedder.embed_texts([]).shape == (0, manifest["embedding_dim"])

    int8 = OnnxEmbedder(out, quantized=True, num_threads=1)
    q_image, q_text = int8.embed_images(pics), int8.embed_texts(CAPTIONS)
    assert not np.allclose(q_image, got_image, atol=1e-6)  # really the other graphs
    assert cosines(q_image, ref_image).min() > 0.95 and cosines(q_text, ref_text).min() > 0.95
    np.testing.assert_allclose(np.linalg.norm(q_image, axis=1), 1.0, atol=1e-5)


def reuse_graphs(monkeypatch, source_dir, corrupt_text_projection: float = 0.0):
    """Stand-in for the (slow) dynamo export: copy graphs exported from the same model by a fixture.

    make_run is deterministic, so a run made with the same arguments merges into the same model and
    the fixture's graphs are exactly what export_towers would write; `corrupt_text_projection` adds
    that much noise to the text graph's projection weight (a deliberately broken graph).
    """
    import shutil

    def export_towers(model, processor, out_dir, **kwargs):
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in onnx_export.TOWER_FILES.values():
            shutil.copy(source_dir / name, out_dir / name)
        if corrupt_text_projection:
            proto = onnx_lib.load(str(out_dir / "text.onnx"))
            weight = next(i for i in proto.graph.initializer if i.name == "model.text_projection.weight")
            array = onnx_lib.numpy_helper.to_array(weight)
            noise = np.random.default_rng(0).standard_normal(array.shape).astype(array.dtype) * corrupt_text_projection
            weight.CopyFrom(onnx_lib.numpy_helper.from_array(array + noise, weight.name))
            onnx_lib.save(proto, str(out_dir / "text.onnx"))
        return dict(onnx_export.TOWER_FILES)

    monkeypatch.setattr(onnx_export, "export_towers", export_towers)


def test_clear_errors_without_onnx_towers_or_int8_and_for_a_missing_cuda_provider(tiny_export, tmp_path, tiny_clip_dir, monkeypatch):
    run = make_run(tmp_path / "run", tiny_clip_dir, export={"max_r1_drop": 100.0})  # the fixture's run
    plain = tmp_path / "plain"
    export_run(run, plain, alpha=1.0, log=quiet)
    with pytest.raises(ExportError, match=r"holds no ONNX towers .*--onnx"):
        OnnxEmbedder(plain)
    reuse_graphs(monkeypatch, tiny_export[0] / "onnx")
    fp32_only = tmp_path / "fp32-only"
    manifest = export_run(run, fp32_only, alpha=1.0, onnx=True, log=quiet)
    assert set(manifest["onnx"]["files"]) == {"fp32"} and not (fp32_only / "onnx" / "image.int8.onnx").exists()
    with pytest.raises(ExportError, match="holds no int8 ONNX towers.*--onnx-int8"):
        OnnxEmbedder(fp32_only, quantized=True)
    (fp32_only / "onnx" / "text.onnx").unlink()
    with pytest.raises(ExportError, match=r"text.onnx is missing \(named in .*manifest.json\)"):
        OnnxEmbedder(fp32_only)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ExportError, match="no CUDAExecutionProvider"):
            OnnxEmbedder(tiny_export[0], device="cuda")


def test_a_broken_graph_trips_the_parity_gate_and_writes_nothing(tiny_export, tmp_path, tiny_clip_dir, monkeypatch, capsys):
    reuse_graphs(monkeypatch, tiny_export[0] / "onnx", corrupt_text_projection=0.05)
    run = make_run(tmp_path / "run", tiny_clip_dir, export={"max_r1_drop": 100.0})
    out = tmp_path / "export"
    assert cli_main(["export", str(run), "--out", str(out), "--alpha", "1", "--onnx"]) == 3
    err = capsys.readouterr().err
    assert "ONNX parity: the fp32 ONNX towers do not reproduce the PyTorch embeddings" in err
    assert "min cosine image 1.0000" in err and "Worst rows: caption 0" in err and "Nothing was written" in err
    assert not out.exists() and not (tmp_path / ".onnx-export").exists()


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    """The demo base (it retrieves its source domain far above chance) exported by the command with --onnx-int8."""
    root = tmp_path_factory.mktemp("onnx-demo")
    run = make_run(
        root / "run", DEMO_BASE, eval_images=120, target_domain="source", lora_scale=0.01, export={"max_r1_drop": 2.0}
    )  # 120 images: one query is 0.83 points
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = cli_main(["export", str(run), "--out", str(root / "export"), "--onnx-int8"])
    return status, root / "export", printed.getvalue()


def test_int8_on_the_demo_base_passes_its_gate_and_the_command_prints_the_summary(demo_export):
    status, out, printed = demo_export
    assert status == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["results"]["fp32"]["target"]["t2i"]["R@1"] > 40
    deltas = manifest["onnx"]["parity"]["int8"]["r1_delta_points_vs_pytorch_fp32"]
    assert min(deltas.values()) >= -2.0 and manifest["onnx"]["int8"]["max_r1_drop"] == 2.0
    assert deltas["t2i"] == pytest.approx(
        manifest["results"]["onnx_int8"]["target"]["t2i"]["R@1"] - manifest["results"]["fp32"]["target"]["t2i"]["R@1"]
    )
    assert manifest["onnx"]["parity"]["fp32"]["min_cosine"] >= 0.999
    assert "ONNX int8 quality gate passed" in printed and "ONNX fp32: min cosine vs PyTorch" in printed
    assert "ONNX int8:" in printed and "throughput vs PyTorch fp32" in printed


def test_an_int8_graph_that_loses_r1_trips_the_gate(demo_export, tmp_path, monkeypatch, capsys):
    def quantize_then_break(onnx_dir):
        files = real_quantize(onnx_dir)
        path = onnx_dir / files["text"]
        proto = onnx_lib.load(str(path))
        for init in proto.graph.initializer:  # zero every int8 weight of the text tower
            if init.data_type == onnx_lib.TensorProto.INT8:
                init.CopyFrom(onnx_lib.numpy_helper.from_array(np.zeros_like(onnx_lib.numpy_helper.to_array(init)), init.name))
        onnx_lib.save(proto, str(path))
        return files

    real_quantize = onnx_export.quantize_towers_int8
    reuse_graphs(monkeypatch, demo_export[1] / "onnx")
    monkeypatch.setattr(onnx_export, "quantize_towers_int8", quantize_then_break)
    run = make_run(tmp_path / "run", DEMO_BASE, eval_images=120, target_domain="source", lora_scale=0.01, export={"max_r1_drop": 2.0})
    out = tmp_path / "export"
    assert cli_main(["export", str(run), "--out", str(out), "--onnx-int8"]) == 3
    err = capsys.readouterr().err
    assert "quality gate: the ONNX int8 towers lose more target R@1 than export.max_r1_drop=2.0" in err
    assert not out.exists()


def test_the_dual_encoder_with_an_xlmr_text_tower_exports_both_towers_with_external_data(
    tmp_path, tiny_clip_dir, tiny_xlmr_dir, monkeypatch
):
    from finetune.models.text_swap import build_text_tower_swap

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # the path a > 1.5 GB model takes
    torch.manual_seed(0)
    model, processor = build_text_tower_swap(str(tiny_clip_dir), str(tiny_xlmr_dir))
    onnx_export.export_towers(model, processor, tmp_path)
    assert (tmp_path / "text.onnx.data").stat().st_size > 10_000  # the large tensors moved out of the graph file
    towers = OnnxTowers(tmp_path, onnx_export.TOWER_FILES, num_threads=1)
    texts = ["Ring in Lila, groß, oben links", "左上角有一个大的紫色圆环", "a large purple ring in the top left"]
    ref_image, ref_text = torch_reference(model, processor, images(3), texts, 40)
    tokens = encode_captions(processor, texts, 40)
    got_text = towers.text_embeddings(tokens["input_ids"].numpy(), tokens["attention_mask"].numpy())
    got_image = towers.image_embeddings(preprocess_images(processor, images(3)).numpy())
    assert cosines(got_text, ref_text).min() >= 0.999 and cosines(got_image, ref_image).min() >= 0.999
    files = onnx_export.quantize_towers_int8(tmp_path)
    int8 = OnnxTowers(tmp_path, files, num_threads=1)
    q_text = int8.text_embeddings(tokens["input_ids"].numpy(), tokens["attention_mask"].numpy())
    assert cosines(q_text, ref_text).min() > 0.95


def test_benchmark_prints_json_with_every_variant_side_by_side(tiny_export, capsys):
    from scripts import benchmark_onnx

    assert benchmark_onnx.main([str(tiny_export[0]), "--batch", "1,3", "--repeats", "1", "--threads", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["threads"] == 1 and set(doc["batches"]) == {"1", "3"}
    for rows in doc["batches"].values():
        assert set(rows) == {"pytorch_fp32", "onnx_fp32", "onnx_int8"}
        assert rows["pytorch_fp32"]["images_ratio_vs_pytorch_fp32"] == 1.0
        assert rows["onnx_fp32"]["min_cosine_vs_pytorch_fp32"] >= 0.999 and rows["onnx_int8"]["images_per_s"] > 0
    assert doc["onnx_bytes"]["int8"] < doc["onnx_bytes"]["fp32"]


def test_the_service_answers_from_the_onnx_graphs_like_from_pytorch(tiny_export, tmp_path):
    """`domainclip serve --backend onnx|onnx-int8` over an index of the ONNX export: the same hits as the
    torch backend (fp32 graphs to 1e-4 in score), and /info names the backend."""
    from fastapi.testclient import TestClient

    from finetune.retrieval.search import Searcher
    from finetune.retrieval.serve.app import build_app
    from finetune.retrieval.serve.limits import Batching, Limits

    out, _ = tiny_export
    corpus = "{synthetic: {domain: target, num_images: 24, captions_per_image: 2, seed: 4}, label_column: label}"
    assert cli_main(["index", str(out), "--corpus", corpus, "--out", str(tmp_path / "index"), "--modality", "both"]) == 0
    image = io.BytesIO()
    images(1, seed=9)[0].save(image, format="PNG")
    answers = {}
    for backend in ("torch", "onnx", "onnx-int8"):
        searcher = Searcher(tmp_path / "index", backend=backend)
        app = build_app(searcher, limits=Limits(), batching=Batching(), cache_size=8, backend=backend)
        with TestClient(app) as client:
            assert client.get("/info").json()["backend"] == backend
            text = client.post("/search", json={"text": CAPTIONS[0], "k": 5})
            fused = client.post("/search", data={"text": CAPTIONS[2], "k": 5}, files={"image": ("q.png", image.getvalue(), "image/png")})
            assert text.status_code == 200 and fused.status_code == 200, (text.text, fused.text)
            answers[backend] = [text.json()["hits"], fused.json()["hits"]]
    for reference, onnx in zip(answers["torch"], answers["onnx"]):
        assert [h["vector_row"] for h in onnx] == [h["vector_row"] for h in reference]
        np.testing.assert_allclose([h["score"] for h in onnx], [h["score"] for h in reference], atol=1e-4)
    for reference, int8 in zip(answers["torch"], answers["onnx-int8"]):  # int8: close scores, same size answers
        assert len(int8) == len(reference) == 5
        assert abs(int8[0]["score"] - reference[0]["score"]) < 0.05
