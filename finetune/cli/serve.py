"""`domainclip serve INDEX_DIR` (also `python scripts/serve.py`): load the index and its export once per
worker process, then run uvicorn. Binds 127.0.0.1 unless told otherwise, and warns when it is told.

With `--workers N > 1` uvicorn starts N processes that each build the app through `app_from_env`
(uvicorn's `factory=True`), reading the settings this command put in DOMAINCLIP_SERVE_SETTINGS.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
from pathlib import Path

from finetune.cli.search import require_index_folder
from finetune.errors import ServeError
from finetune.retrieval.serve.limits import Batching, Limits

SETTINGS_ENV = "DOMAINCLIP_SERVE_SETTINGS"


def build_from_settings(settings: dict):
    """The app from plain settings: {index_dir, backend, cache_size, limits: {...}, batching: {...}}."""
    from finetune.retrieval.search import Searcher
    from finetune.retrieval.serve.app import build_app

    searcher = Searcher(settings["index_dir"], backend=settings["backend"])
    return build_app(
        searcher,
        limits=Limits(**settings["limits"]),
        batching=Batching(**settings["batching"]),
        cache_size=settings["cache_size"],
        backend=settings["backend"],
    )


def app_from_env():
    """uvicorn factory for worker processes (`--workers N`)."""
    from finetune.quiet import quiet_third_party_notices

    quiet_third_party_notices()
    return build_from_settings(json.loads(os.environ[SETTINGS_ENV]))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_parser(sub) -> None:
    limits, batching = Limits(), Batching()
    parser = sub.add_parser(
        "serve",
        help="HTTP service over an index: /search, /healthz, /info, /docs",
        description="HTTP service over an index folder: POST /search (JSON text, multipart image, or both fused; k; "
        "filters on id-map fields), GET /healthz, GET /info, OpenAPI docs at /docs.",
    )
    parser.add_argument("index_dir", help="a folder written by `domainclip index`")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=_positive_int, default=1, help="uvicorn worker processes; each loads the model once")
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx", "onnx-int8"),
        default="torch",
        help="onnx / onnx-int8: the export's ONNX graphs through onnxruntime (export --onnx / --onnx-int8)",
    )
    parser.add_argument("--max-batch", type=_positive_int, default=batching.max_batch, help="items per batched forward")
    parser.add_argument("--max-wait-ms", type=float, default=batching.max_wait_ms, help="longest wait for a batch to fill")
    parser.add_argument("--no-batching", action="store_true", help="one forward per request (the baseline)")
    parser.add_argument("--cache-size", type=int, default=1024, help="text query embeddings kept (LRU)")
    parser.add_argument("--max-body-bytes", type=_positive_int, default=limits.max_body_bytes)
    parser.add_argument("--max-image-pixels", type=_positive_int, default=limits.max_image_pixels)
    parser.add_argument("--max-text-chars", type=_positive_int, default=limits.max_text_chars)
    parser.add_argument("--max-k", type=_positive_int, default=limits.max_k)
    parser.add_argument("--access-log", action="store_true", help="log every request (off: it costs time under load)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.set_defaults(run=run)


def port_in_use(host: str, port: int) -> bool:
    """True when another process already listens on (host, port): said before the banner, not after it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is not "in use"
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def run(args) -> int:
    if args.max_wait_ms < 0:
        raise ServeError(422, "max_wait_ms", f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    settings = {
        "index_dir": str(Path(args.index_dir).resolve()),
        "backend": args.backend,
        "cache_size": args.cache_size,
        "limits": {
            "max_body_bytes": args.max_body_bytes,
            "max_image_pixels": args.max_image_pixels,
            "max_text_chars": args.max_text_chars,
            "max_k": args.max_k,
        },
        "batching": {"enabled": not args.no_batching, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms},
    }
    require_index_folder(args.index_dir)
    if port_in_use(args.host, args.port):
        raise ServeError(409, "port", f"port {args.port} on {args.host} is in use by another process: stop it or pick another with --port")

    import uvicorn

    from finetune.quiet import quiet_third_party_notices
    from finetune.retrieval.index import read_index_manifest

    quiet_third_party_notices()
    if not is_loopback(args.host):
        print(f"warning: binding {args.host}: the service is reachable from other machines, with no authentication", file=sys.stderr)
    manifest = read_index_manifest(args.index_dir)
    counts = ", ".join(f"{kind} {entry['vectors']} vectors ({entry['factory']})" for kind, entry in manifest["indexes"].items())
    batch = "off" if args.no_batching else f"up to {args.max_batch} items / {args.max_wait_ms:g} ms"
    options = dict(host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)
    app = build_from_settings(settings)  # load errors surface here, before any port is bound or worker started
    workers = "" if args.workers == 1 else f"; {args.workers} workers"
    print(
        f"Serving {args.index_dir}: {counts}; backend {args.backend}; batching {batch}{workers}; docs http://{args.host}:{args.port}/docs",
        flush=True,
    )
    if args.workers == 1:
        uvicorn.run(app, **options)
        return 0
    del app  # each worker process builds its own
    os.environ[SETTINGS_ENV] = json.dumps(settings)
    uvicorn.run("finetune.cli.serve:app_from_env", factory=True, workers=args.workers, **options)
    return 0
