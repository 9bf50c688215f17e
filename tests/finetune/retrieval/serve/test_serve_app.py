"""The service through FastAPI's TestClient (no socket): every endpoint, results equal to Searcher's,
filters, the text cache, and a JSON 4xx naming the field for each kind of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from finetune.retrieval.serve.app import build_app
from finetune.retrieval.serve.limits import Batching, Limits

from .conftest import png_bytes


def make_client(searcher, *, limits: Limits | None = None, batching: Batching | None = None, cache_size: int = 64):
    app = build_app(
        searcher, limits=limits or Limits(max_k=20), batching=batching or Batching(max_wait_ms=2.0), cache_size=cache_size, backend="torch"
    )
    return TestClient(app)


@pytest.fixture(scope="module")
def client(searcher):
    with make_client(searcher) as c:
        yield c


def test_healthz_and_info(client, searcher):
    assert client.get("/healthz").json() == {"status": "ok", "indexes": {"image": 40, "text": 80}}
    info = client.get("/info").json()
    assert info["model"]["weights_sha256"] == searcher.manifest["model_sha256"] and info["model"]["alpha"] == 1.0
    assert info["model"]["dtype"] == "fp32" and info["model"]["embedding_dim"] == searcher.manifest["embedding_dim"]
    assert info["index"]["indexes"]["image"]["factory"] == "Flat" and info["index"]["indexes"]["image"]["recall_at_10"] == 1.0
    assert "build_seconds" in info["index"]["indexes"]["text"] and info["backend"] == "torch"
    assert info["batching"]["enabled"] and info["batching"]["max_batch"] == 32
    assert set(info["cache"]) >= {"hits", "misses", "hit_rate", "size"} and info["limits"]["max_k"] == 20
    assert "label" in info["filter_fields"]["image"] and info["requests"]["total"] >= 1
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/search"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)


def test_text_image_and_image_to_text_equal_searcher(client, searcher, corpus):
    text = corpus["caption"][7][0]
    got = client.post("/search", json={"text": text, "k": 5})
    assert got.status_code == 200, got.text
    assert got.json()["hits"] == searcher.search(text=text, k=5)["hits"] and got.json()["query"]["kind"] == "text"
    image = png_bytes(corpus["image"][7])
    by_image = client.post("/search", files={"image": ("q.png", image, "image/png")}, data={"k": "3"}).json()
    assert by_image["hits"][0]["image_id"] == "7" and by_image["hits"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert by_image["query"] == {"kind": "image", "text": None, "image": "q.png", "weight": None} and len(by_image["hits"]) == 3
    to_text = client.post("/search", files={"image": ("q.png", image, "image/png")}, data={"against": "text", "k": "4"}).json()
    assert to_text["against"] == "text" and len(to_text["hits"]) == 4 and all("caption" in h for h in to_text["hits"])


def test_fused_equals_searchers_fused_result(client, searcher, corpus, tmp_path):
    path = tmp_path / "q.png"
    corpus["image"][3].save(path)
    text = corpus["caption"][11][1]
    served = client.post(
        "/search", files={"image": ("q.png", path.read_bytes(), "image/png")}, data={"text": text, "weight": "0.3", "k": "6"}
    ).json()
    reference = searcher.search(text=text, image=str(path), weight=0.3, k=6)
    assert served["query"]["kind"] == reference["query"]["kind"] == "fused (image weight 0.3)"
    assert served["hits"] == reference["hits"]


def test_filters_keep_only_matching_rows_and_widen_until_k(client, searcher, corpus):
    ids = searcher.id_maps["image"]
    counts = ids["label"].value_counts()
    rare, common = counts.index[-1], counts.index[0]
    text = corpus["caption"][0][0]
    k = int(counts[rare]) + 3  # more than the rare class has: every one of them, nothing else
    got = client.post("/search", json={"text": text, "k": k, "filters": {"label": rare}}).json()
    assert [h["label"] for h in got["hits"]] == [rare] * int(counts[rare])
    assert sorted(h["image_id"] for h in got["hits"]) == sorted(ids.loc[ids["label"] == rare, "image_id"])
    # the filtered ranking is the unfiltered ranking restricted to the class
    unfiltered = client.post("/search", json={"text": text, "k": 20}).json()["hits"]
    expected = [h["image_id"] for h in searcher.search(text=text, k=40)["hits"] if h["label"] == common][:3]
    got = client.post("/search", json={"text": text, "k": 3, "filters": {"label": [common]}}).json()
    assert [h["image_id"] for h in got["hits"]] == expected and [h["rank"] for h in got["hits"]] == [1, 2, 3]
    assert len(unfiltered) == 20
    # a filter on another id-map field, in a multipart form
    one = client.post(
        "/search",
        files={"image": ("q.png", png_bytes(corpus["image"][5]), "image/png")},
        data={"filters": json.dumps({"image_id": "9"}), "k": "5"},
    ).json()
    assert [h["image_id"] for h in one["hits"]] == ["9"]


def test_unknown_filter_field_is_a_400_naming_it_and_the_allowed_ones(client):
    got = client.post("/search", json={"text": "a circle", "filters": {"colour": "red"}})
    assert got.status_code == 400
    body = got.json()
    assert body["field"] == "filters.colour" and "label" in body["error"] and "image_id" in body["error"]


def test_cache_hit_rate_rises_on_repeated_text(searcher):
    with make_client(searcher) as c:
        for _ in range(4):
            assert c.post("/search", json={"text": "large round opacity, crimson tint"}).status_code == 200
        cache = c.get("/info").json()["cache"]
    assert cache["misses"] == 1 and cache["hits"] == 3 and cache["hit_rate"] == 0.75


@pytest.mark.parametrize(
    "body, status, field, says",
    [
        ({"text": "a circle", "topk": 3}, 422, "topk", "unknown field"),
        ({"text": ""}, 422, "text", "empty"),
        ({"text": "   "}, 422, "text", "empty"),
        ({}, 422, "text", "give a text, an image"),
        ({"text": "a circle", "k": 0}, 422, "k", "1..20"),
        ({"text": "a circle", "k": 21}, 422, "k", "1..20"),
        ({"text": "a circle", "k": "many"}, 422, "k", "integer"),
        ({"text": "a circle", "weight": 1.5}, 422, "weight", "0..1"),
        ({"text": "a circle", "against": "video"}, 422, "against", "'image' or 'text'"),
        ({"text": 12}, 422, "text", "string"),
        ({"text": "x" * 1001}, 422, "text", "1,001 characters, the limit is 1,000"),
        ({"text": "a", "image": "aGVsbG8="}, 422, "image", "multipart"),
        ({"text": "a", "filters": {"label": {"nested": 1}}}, 422, "filters.label", ""),
        ([1, 2], 422, "body", "JSON object"),
    ],
)
def test_bad_json_requests_get_a_4xx_naming_the_field(client, body, status, field, says):
    got = client.post("/search", json=body)
    assert got.status_code == status, got.text
    assert got.json()["field"] == field and says in got.json()["error"]


def test_bad_bodies_content_types_and_routes(client, corpus):
    bad = client.post("/search", content=b'{"text": "unterminated', headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["field"] == "body"
    plain = client.post("/search", content=b"a circle", headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and plain.json()["field"] == "content-type"
    unknown = client.post("/search", files={"image": ("q.png", png_bytes(corpus["image"][0]), "image/png")}, data={"colour": "red"})
    assert unknown.status_code == 422 and unknown.json()["field"] == "colour"
    filters = client.post("/search", files={"image": ("q.png", png_bytes(corpus["image"][0]), "image/png")}, data={"filters": "{label"})
    assert filters.status_code == 422 and filters.json()["field"] == "filters"
    as_text = client.post("/search", data={"image": "not a file", "text": "a"}, files={"x": ("", b"", "text/plain")})
    assert as_text.status_code == 422
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found", "field": None}
    wrong_method = client.get("/search")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_undecodable_and_empty_images_are_422_for_the_image_field(client, corpus):
    png = png_bytes(corpus["image"][0])
    for data in (png[: len(png) // 2], b"GIF89a not really", b"\x00" * 100, b""):
        got = client.post("/search", files={"image": ("q.png", data, "image/png")})
        assert got.status_code == 422, (data[:10], got.text)
        assert got.json()["field"] == "image"


def bomb_png(width: int, height: int) -> bytes:
    from scripts.loadtest import bomb_png as make

    return make(width, height)


def test_decompression_bomb_is_refused_from_its_header_without_decoding(searcher, monkeypatch):
    from PIL import ImageFile

    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or original(self))
    with make_client(searcher, limits=Limits(max_image_pixels=100 * 100)) as c:
        for width, height in ((200, 200), (60_000, 60_000)):  # over our limit; the second also over PIL's own guard
            data = bomb_png(width, height)
            assert len(data) < 1000
            got = c.post("/search", files={"image": ("bomb.png", data, "image/png")})
            assert got.status_code == 413, got.text
            assert got.json()["field"] == "image" and ("pixels" in got.json()["error"] or "bomb" in got.json()["error"])
        assert loads == []  # no pixel was decoded
        ok = c.post("/search", files={"image": ("small.png", bomb_png(50, 50), "image/png")})
        assert ok.status_code == 422 and loads == [(50, 50)]  # within the limit: decoded (and found truncated)


def test_body_over_the_limit_is_413_whether_declared_or_streamed(searcher):
    with make_client(searcher, limits=Limits(max_body_bytes=2000)) as c:
        declared = c.post("/search", json={"text": "x" * 3000})
        assert declared.status_code == 413 and declared.json()["field"] == "body"

        def chunks():  # no content-length: counted while reading
            yield b'{"text": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        streamed = c.post("/search", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and streamed.json()["field"] == "body"
        assert c.get("/healthz").status_code == 200


def test_an_internal_error_is_a_json_500_and_the_service_keeps_serving(searcher, monkeypatch):
    with make_client(searcher) as c:
        calls = []

        def broken(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("disk on fire")

        original = searcher.search_vector
        monkeypatch.setattr(searcher, "search_vector", broken)
        got = c.post("/search", json={"text": "a circle"})
        assert got.status_code == 500 and got.json() == {"error": "internal error (RuntimeError)", "field": None}
        assert "disk on fire" not in got.text and calls
        monkeypatch.setattr(searcher, "search_vector", original)
        assert c.post("/search", json={"text": "a circle"}).status_code == 200
        assert c.get("/info").json()["requests"]["by_status"]["500"] == 1


def test_against_an_index_that_was_not_built_is_a_400(searcher, monkeypatch):
    monkeypatch.delitem(searcher.indexes, "text")
    with make_client(searcher) as c:
        got = c.post("/search", json={"text": "a circle", "against": "text"})
    assert got.status_code == 400 and got.json()["field"] == "against" and "image vectors only" in got.json()["error"]


def test_query_vectors_are_unit_and_equal_the_searchers(client, searcher, corpus):
    """The served text vector is the Searcher's: same scores for the same query against every row."""
    text = corpus["caption"][2][0]
    got = client.post("/search", json={"text": text, "k": 20}).json()["hits"]
    v = searcher.embed_text(text)
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
    scores, rows = searcher.indexes["image"].search(v[None], 20)
    assert [h["vector_row"] for h in got] == rows[0].tolist()
    np.testing.assert_allclose([h["score"] for h in got], np.round(scores[0], 4), atol=1e-4)
