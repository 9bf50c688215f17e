"""`domainclip serve`: an HTTP service over an index folder (FastAPI).

    POST /search   JSON {"text", "k", "weight", "against", "filters"}; or multipart/form-data with an
                   `image` file and the same fields as form fields (`filters` as a JSON string).
                   Text -> text query; image -> image query; both -> fused (w * image + (1 - w) * text)
    GET  /healthz  {"status": "ok", ...}
    GET  /info     model (export manifest), index manifest, backend, batching, cache, request counts
    GET  /docs     OpenAPI docs (FastAPI's)

The search itself is `finetune.retrieval.search.Searcher` (same fusion, same hits, same filters); this
module adds what a service needs around it: micro-batching of concurrent requests (one text batcher,
one image batcher, model on a worker thread), an LRU cache of text embeddings, limits on every input
and JSON errors that name the field. A request the service refuses is a 4xx; an internal error is a
500 with a JSON body, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from contextlib import asynccontextmanager
from typing import Literal, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from finetune.errors import ExportError, ServeError
from finetune.retrieval.search import LRUCache, fuse
from finetune.retrieval.serve.batcher import MicroBatcher
from finetune.retrieval.serve.limits import Batching, Limits, check_query, decode_upload

log = logging.getLogger("domainclip.serve")

FilterValue = Union[StrictStr, StrictInt, StrictFloat, StrictBool]


class SearchQuery(BaseModel):
    """The fields of POST /search (a JSON body, or the form fields beside an uploaded `image`)."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    k: int = 10
    weight: float = 0.5  # fused query: weight of the image embedding, 0..1
    against: Literal["image", "text"] | None = None  # which index; default image when built
    filters: dict[str, Union[FilterValue, list[FilterValue]]] | None = None  # id-map field -> value or any of values


FORM_FIELDS = ("image", *SearchQuery.model_fields)

SEARCH_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": SearchQuery.model_json_schema()},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "image": {"type": "string", "format": "binary"},
                    "text": {"type": "string"},
                    "k": {"type": "integer"},
                    "weight": {"type": "number"},
                    "against": {"type": "string", "enum": ["image", "text"]},
                    "filters": {"type": "string", "description": 'JSON object, e.g. {"label": "circle"}'},
                },
            }
        },
    },
}


class _BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """Outermost guard: body size (413 before or while reading), a JSON 500 for anything unexpected
    (logged with its traceback; the server keeps serving), and request counts by status.

    A refused body is read and discarded up to DRAIN_FACTOR x the limit before the 413 goes out:
    a client still sending would otherwise see its connection reset instead of the answer. Beyond
    that the 413 goes out at once and the connection closes."""

    DRAIN_FACTOR = 4

    def __init__(self, app, *, max_body_bytes: int, counts: Counter):
        self.app, self.max_body_bytes, self.counts = app, max_body_bytes, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "too_large": False, "status": 500, "body_done": False}
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        if length is not None and (declared is None or declared > self.max_body_bytes):
            state["too_large"] = True
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    state["too_large"] = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                if state["too_large"]:  # the app answered a body it could not finish reading
                    raise _BodyTooLarge()
                state["started"], state["status"] = True, message["status"]
            await send(message)

        try:
            if state["too_large"]:
                raise _BodyTooLarge()
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not state["started"]:
                if declared is None or declared <= self.DRAIN_FACTOR * self.max_body_bytes:
                    await self._drain(receive, state, self.DRAIN_FACTOR * self.max_body_bytes)
                await self._answer(
                    send, state, 413, {"error": f"request body over {self.max_body_bytes:,} bytes (--max-body-bytes)", "field": "body"}
                )
        except Exception as exc:
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if not state["started"]:
                await self._answer(send, state, 500, {"error": f"internal error ({type(exc).__name__})", "field": None})
        finally:
            self.counts[str(state["status"])] += 1

    @staticmethod
    async def _drain(receive, state, cap: int) -> None:
        drained = 0
        while not state["body_done"] and drained <= cap:
            message = await receive()
            drained += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True

    @staticmethod
    async def _answer(send, state, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        state["started"], state["status"] = True, status
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _validation_error(exc: ValidationError, form: bool = False) -> ServeError:
    """A pydantic error as a 422 naming the first field (and saying what is wrong with each field once)."""
    problems = {}
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        # filters.<key>: a union's member types (str, int, list[...]) also appear in loc; the key is what counts
        field = ".".join(loc[:2]) if loc and loc[0] == "filters" and len(loc) > 1 else (loc[0] if loc else "body")
        if field in problems:
            continue
        if err["type"] == "extra_forbidden":
            problems[field] = f"{field}: unknown field (fields: {', '.join(FORM_FIELDS if form else SearchQuery.model_fields)})"
        else:
            problems[field] = f"{field}: {err['msg']}"
    return ServeError(422, next(iter(problems)), "; ".join(problems.values()))


async def read_query(request: Request, limits: Limits) -> tuple[SearchQuery, bytes | None, str | None]:
    """(fields, image bytes or None, image filename) of a POST /search, JSON or multipart."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ServeError(400, "body", f"body: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ServeError(422, "body", f"body: expected a JSON object of search fields, got {type(data).__name__}")
        if "image" in data:
            raise ServeError(422, "image", "image: upload images as multipart/form-data (an `image` file part), not in JSON")
        try:
            return SearchQuery.model_validate(data), None, None
        except ValidationError as exc:
            raise _validation_error(exc) from None
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=len(FORM_FIELDS))
        except _BodyTooLarge:
            raise
        except Exception as exc:  # starlette's MultiPartException / HTTPException: a malformed form
            raise ServeError(400, "body", f"body: malformed multipart form ({getattr(exc, 'detail', None) or exc})") from None
        unknown = [key for key in form.keys() if key not in FORM_FIELDS]
        if unknown:
            raise ServeError(422, unknown[0], f"{unknown[0]}: unknown field (fields: {', '.join(FORM_FIELDS)})")
        fields, image, filename = {}, None, None
        for key in form.keys():
            values = form.getlist(key)
            if len(values) > 1:
                raise ServeError(422, key, f"{key}: given {len(values)} times, expected once")
            value = values[0]
            if key == "image":
                if isinstance(value, str):
                    raise ServeError(422, "image", "image: expected a file part (multipart upload), got a text field")
                image, filename = await value.read(), value.filename
            elif not isinstance(value, str):
                raise ServeError(422, key, f"{key}: expected a text field, got a file")
            elif key == "filters":
                try:
                    fields[key] = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ServeError(422, "filters", f"filters: not a JSON object ({exc})") from None
            else:
                fields[key] = value
        await form.close()
        try:
            return SearchQuery.model_validate(fields), image, filename
        except ValidationError as exc:
            raise _validation_error(exc, form=True) from None
    raise ServeError(415, "content-type", f"content-type: send application/json or multipart/form-data, got {ctype or 'none'!r}")


def export_summary(manifest: dict) -> dict:
    keys = (
        "base_model",
        "base_revision",
        "alpha",
        "dtype",
        "architecture",
        "embedding_dim",
        "max_text_length",
        "weights_sha256",
        "size_on_disk_bytes",
        "run_dir",
    )
    return {key: manifest.get(key) for key in keys}


def build_app(searcher, *, limits: Limits, batching: Batching, cache_size: int, backend: str) -> FastAPI:
    """The service over a loaded `Searcher` (its embedder runs the model). Tests drive it with TestClient."""
    embedder = searcher.embedder
    if batching.enabled:
        text_batcher = MicroBatcher(embedder.embed_texts, max_batch=batching.max_batch, max_wait_ms=batching.max_wait_ms, name="text")
        image_batcher = MicroBatcher(embedder.embed_images, max_batch=batching.max_batch, max_wait_ms=batching.max_wait_ms, name="image")
    else:  # the unbatched baseline: one forward per request, one at a time
        text_batcher = MicroBatcher(embedder.embed_texts, max_batch=1, max_wait_ms=0, name="text")
        image_batcher = MicroBatcher(embedder.embed_images, max_batch=1, max_wait_ms=0, name="image")
    cache = LRUCache(cache_size)
    counts: Counter = Counter()
    started = time.time()

    @asynccontextmanager
    async def lifespan(app):
        yield
        await text_batcher.close()
        await image_batcher.close()

    app = FastAPI(
        title="domainclip serve",
        lifespan=lifespan,
        description="Text, image and fused queries over a FAISS index built by `domainclip index`.",
    )
    app.state.searcher, app.state.cache = searcher, cache
    app.state.batchers = {"text": text_batcher, "image": image_batcher}
    app.add_middleware(GuardMiddleware, max_body_bytes=limits.max_body_bytes, counts=counts)

    @app.exception_handler(ServeError)
    async def serve_error(request, exc: ServeError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail), "field": None}, status_code=exc.status_code)

    async def text_vector(text: str):
        vector = cache.lookup(text)
        if vector is None:
            vector = await text_batcher.submit(text)
            cache.put(text, vector)
        return vector  # (D,)

    async def image_vector(data: bytes):
        image = await asyncio.to_thread(decode_upload, data, limits.max_image_pixels)  # 413 / 422 before the batch
        return await image_batcher.submit(image)  # (D,)

    @app.post("/search", openapi_extra={"requestBody": SEARCH_BODY}, summary="Text, image or fused query; filters on id-map fields")
    async def search(request: Request):
        t0 = time.perf_counter()
        query, image, filename = await read_query(request, limits)
        check_query(query.text, image is not None, query.k, query.weight, limits)
        try:
            against = searcher.resolve_against(query.against)
        except ExportError as exc:
            raise ServeError(400, "against", f"against: {exc}") from None
        allowed = searcher.filter_fields(against)
        for field in query.filters or {}:
            if field not in allowed:
                raise ServeError(
                    400, f"filters.{field}", f"filters.{field}: not a field of the {against} id map; filter on one of {', '.join(allowed)}"
                )
        if query.text is not None and image is not None:
            image_vec, text_vec = await asyncio.gather(image_vector(image), text_vector(query.text))
            vector, kind = fuse(image_vec, text_vec, query.weight), f"fused (image weight {query.weight:g})"
        elif image is not None:
            vector, kind = await image_vector(image), "image"
        else:
            vector, kind = await text_vector(query.text), "text"
        hits = await asyncio.to_thread(searcher.search_vector, vector, k=query.k, against=against, filters=query.filters)
        return {
            "query": {"kind": kind, "text": query.text, "image": filename, "weight": query.weight if kind.startswith("fused") else None},
            "against": against,
            "k": query.k,
            "filters": query.filters,
            "hits": hits,
            "took_ms": round((time.perf_counter() - t0) * 1000, 3),
        }

    @app.get("/healthz", summary="Liveness: the model and indexes are loaded")
    async def healthz():
        return {"status": "ok", "indexes": {kind: int(index.ntotal) for kind, index in searcher.indexes.items()}}

    @app.get("/info", summary="Model, index manifest, backend, batching, cache and request counts")
    async def info():
        return {
            "model": export_summary(searcher.export_manifest),
            "index": searcher.manifest,
            "filter_fields": {kind: searcher.filter_fields(kind) for kind in searcher.indexes},
            "backend": backend,
            "limits": limits.as_dict(),
            "batching": {**batching.as_dict(), "text": text_batcher.stats(), "image": image_batcher.stats()},
            "cache": cache.stats(),
            "requests": {"total": sum(counts.values()), "by_status": dict(sorted(counts.items()))},
            "uptime_s": round(time.time() - started, 1),
        }

    return app
