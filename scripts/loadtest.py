"""Load test of `domainclip serve`: a real uvicorn on 127.0.0.1, a bounded load, one JSON object.

    python scripts/loadtest.py [--index runs/demo-index] [--requests 2000] [--concurrency 16] [--seed 0]

Starts `scripts/serve.py INDEX` in a subprocess on a free 127.0.0.1 port (twice: batching on, then
`--no-batching`), waits for /healthz, sends a warm-up, then the same seeded sequence of requests both
times with httpx.AsyncClient at the given concurrency: text, image (multipart upload), fused (image +
text, half of them filtered on a label) and malformed ones (unknown field, empty text, k out of range,
invalid JSON, undecodable image, a decompression-bomb PNG header, text over the limit, a body over the
limit, wrong content type). Half the text queries repeat a caption (the cache can serve them), half are
new strings (it cannot). Prints one JSON object: requests/s, latency p50/p95/p99, statuses and errors
by kind per mode, the server's /info batching and cache figures, and the throughput ratio batching
on / off. Exits 1 if any request got a 5xx, any malformed request was not answered 4xx, or any valid
one was not answered 200. Needs an index (the README's demo: export -> index, `runs/demo-index`).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("text", "image", "fused", "malformed")
MALFORMED = (
    "unknown_field",
    "empty_text",
    "k_out_of_range",
    "bad_json",
    "undecodable_image",
    "bomb_image",
    "oversize_text",
    "oversize_body",
    "wrong_content_type",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height grey pixels, with a tiny (truncated) IDAT: a few hundred bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


def query_material(index_dir: Path, n_images: int, seed: int) -> dict:
    """Captions and labels from the index's id map; PNG query images (synthetic renders at the model's size)."""
    import pandas as pd

    from data_tools.synthetic.domains import generate_domain
    from finetune.retrieval.index import read_index_manifest

    manifest = read_index_manifest(index_dir)
    kind = "image" if "image" in manifest["indexes"] else "text"
    ids = pd.read_parquet(index_dir / manifest["indexes"][kind]["id_map"])
    captions = [c for c in ids["caption"].dropna().astype(str).unique()]
    labels = [str(x) for x in ids["label"].dropna().unique()] if "label" in ids and ids["label"].notna().any() else []
    images = []
    for image in generate_domain("target", n_images, image_size=64, seed=seed)["image"]:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        images.append(buf.getvalue())
    return {"captions": captions, "labels": labels, "images": images}


def plan_requests(material: dict, n: int, seed: int, *, max_body_bytes: int, max_text_chars: int, max_k: int) -> list[dict]:
    """A seeded list of requests: {"kind", "malformed" (its kind or None), "json" | "files"+"data" | "content"}."""
    rng = np.random.default_rng(seed)
    captions, images, labels = material["captions"], material["images"], material["labels"]
    plans = []
    for i in range(n):
        kind = KINDS[int(rng.choice(4, p=[0.4, 0.25, 0.2, 0.15]))]
        caption = captions[int(rng.integers(len(captions)))]
        text = caption if rng.random() < 0.5 else f"{caption} {i}"  # repeated (cacheable) or new
        image = images[int(rng.integers(len(images)))]
        k = int(rng.integers(1, 11))
        if kind == "text":
            plans.append({"kind": kind, "malformed": None, "json": {"text": text, "k": k}})
        elif kind == "image":
            plans.append({"kind": kind, "malformed": None, "files": {"image": ("q.png", image, "image/png")}, "data": {"k": str(k)}})
        elif kind == "fused":
            data = {"text": text, "k": str(k), "weight": f"{rng.uniform(0.2, 0.8):.2f}"}
            if labels and rng.random() < 0.5:
                data["filters"] = json.dumps({"label": labels[int(rng.integers(len(labels)))]})
            plans.append({"kind": kind, "malformed": None, "files": {"image": ("q.png", image, "image/png")}, "data": data})
        else:
            bad = MALFORMED[int(rng.integers(len(MALFORMED)))]
            plan = {"kind": kind, "malformed": bad}
            if bad == "unknown_field":
                plan["json"] = {"text": caption, "topk": 5}
            elif bad == "empty_text":
                plan["json"] = {"text": "   "}
            elif bad == "k_out_of_range":
                plan["json"] = {"text": caption, "k": [0, max_k + 1, -3][int(rng.integers(3))]}
            elif bad == "bad_json":
                plan["content"], plan["content_type"] = b'{"text": "unterminated', "application/json"
            elif bad == "undecodable_image":
                plan["files"], plan["data"] = {"image": ("q.png", image[: len(image) // 3], "image/png")}, {}
            elif bad == "bomb_image":
                plan["files"], plan["data"] = {"image": ("bomb.png", bomb_png(60000, 60000), "image/png")}, {}
            elif bad == "oversize_text":
                plan["json"] = {"text": "x" * (max_text_chars + 1)}
            elif bad == "oversize_body":
                plan["files"], plan["data"] = {"image": ("big.png", b"\0" * (max_body_bytes + 1), "image/png")}, {}
            else:
                plan["content"], plan["content_type"] = caption.encode(), "text/plain"
            plans.append(plan)
    return plans


async def send_one(client, plan: dict) -> tuple[int, float]:
    t0 = time.perf_counter()
    if "json" in plan:
        response = await client.post("/search", json=plan["json"])
    elif "files" in plan:
        response = await client.post("/search", files=plan["files"], data=plan["data"])
    else:
        response = await client.post("/search", content=plan["content"], headers={"content-type": plan["content_type"]})
    await response.aread()
    return response.status_code, (time.perf_counter() - t0) * 1000.0


async def run_load(base_url: str, plans: list[dict], concurrency: int, desc: str) -> dict:
    import httpx
    from tqdm import tqdm

    results: list = [None] * len(plans)
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        warm = [p for p in plans if not p["malformed"]][: 2 * concurrency]
        await asyncio.gather(*(send_one(client, p) for p in warm))
        stats_before = (await client.get("/info")).json()
        bar = tqdm(total=len(plans), desc=desc, file=sys.stderr, mininterval=1.0)

        async def one(i, plan):
            async with semaphore:
                try:
                    results[i] = await send_one(client, plan)
                except httpx.HTTPError as exc:  # connection dropped / refused: counted as a server failure
                    results[i] = (f"client error: {type(exc).__name__}", float("nan"))
            bar.update()

        started = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(plans)))
        elapsed = time.perf_counter() - started
        bar.close()
        info = (await client.get("/info")).json()
    return summarise(plans, results, elapsed, stats_before, info)


def _percentiles(values) -> dict:
    values = np.asarray([v for v in values if v == v], dtype=float)
    if not len(values):
        return {}
    return {f"p{q}": round(float(np.percentile(values, q)), 2) for q in (50, 95, 99)}


def summarise(plans, results, elapsed: float, before: dict, info: dict) -> dict:
    by_kind, malformed, server_errors, malformed_not_4xx, valid_not_200 = {}, {}, 0, [], 0
    for plan, (status, _) in zip(plans, results):
        key = str(status)
        by_kind.setdefault(plan["kind"], {}).setdefault(key, 0)
        by_kind[plan["kind"]][key] += 1
        is_4xx = isinstance(status, int) and 400 <= status < 500
        if not isinstance(status, int) or status >= 500:
            server_errors += 1
        if plan["malformed"]:
            malformed.setdefault(plan["malformed"], {}).setdefault(key, 0)
            malformed[plan["malformed"]][key] += 1
            if not is_4xx:
                malformed_not_4xx.append(plan["malformed"])
        elif status != 200:
            valid_not_200 += 1
    latencies = [ms for _, ms in results]
    batching = info["batching"]

    def forwards(kind):
        return batching[kind]["forwards"] - before["batching"][kind]["forwards"], batching[kind]["items"] - before["batching"][kind][
            "items"
        ]

    fw = {kind: forwards(kind) for kind in ("text", "image")}
    cache_asked = (info["cache"]["hits"] + info["cache"]["misses"]) - (before["cache"]["hits"] + before["cache"]["misses"])
    return {
        "requests": len(plans),
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(plans) / elapsed, 1),
        "latency_ms": {
            "all": _percentiles(latencies),
            **{kind: _percentiles(ms for p, (_, ms) in zip(plans, results) if p["kind"] == kind) for kind in KINDS},
        },
        "status_by_kind": by_kind,
        "malformed_by_kind": malformed,
        "server_errors": server_errors,
        "malformed_not_4xx": len(malformed_not_4xx),
        "valid_not_200": valid_not_200,
        "model_forwards": {kind: {"forwards": f, "items": n, "mean_batch": round(n / f, 2) if f else None} for kind, (f, n) in fw.items()},
        "largest_batch": {kind: batching[kind]["largest_batch"] for kind in ("text", "image")},
        "cache_hit_rate": round((info["cache"]["hits"] - before["cache"]["hits"]) / cache_asked, 3) if cache_asked else None,
    }


def start_server(index_dir: Path, port: int, extra: list[str], log_path: Path, startup_timeout: float) -> subprocess.Popen:
    import httpx

    log = open(log_path, "ab")
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "serve.py"),
            str(index_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before answering /healthz; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(process)
    raise RuntimeError(f"no answer from /healthz within {startup_timeout:.0f} s; see {log_path}")


def stop_server(process: subprocess.Popen) -> int | None:
    process.terminate()  # uvicorn shuts down cleanly on SIGTERM
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def main(argv=None) -> int:
    from finetune.retrieval.serve.limits import Limits

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", default="runs/demo-index", help="an index folder (the README's demo: runs/demo-index)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx", "onnx-int8"),
        default="torch",
        help="the server's embedder (onnx / onnx-int8 need an export made with --onnx / --onnx-int8)",
    )
    parser.add_argument("--modes", default="on,off", help="batching modes to run, in order: on,off | on | off")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--log", default=None, help="server output (default: a file in the system temp folder)")
    args = parser.parse_args(argv)
    index_dir = Path(args.index)
    if not (index_dir / "manifest.json").is_file():
        print(
            f"error: --index {index_dir}: no manifest.json; build the demo index first (README: export -> index), or pass --index DIR",
            file=sys.stderr,
        )
        return 2
    limits = Limits()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes):
        parser.error(f"--modes: on, off or on,off; got {args.modes!r}")
    material = query_material(index_dir, 32, args.seed)
    plans = plan_requests(
        material, args.requests, args.seed, max_body_bytes=limits.max_body_bytes, max_text_chars=limits.max_text_chars, max_k=limits.max_k
    )
    import tempfile

    log_path = Path(args.log) if args.log else Path(tempfile.gettempdir()) / f"domainclip-loadtest-{os.getpid()}.log"
    report = {
        "index": str(index_dir),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "seed": args.seed,
        "mix": {kind: sum(p["kind"] == kind for p in plans) for kind in KINDS},
        "backend": args.backend,
        "batching": {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms},
        "machine": {"cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in os.getloadavg()]},
    }
    for mode in modes:
        extra = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--backend", args.backend]
        if mode == "off":
            extra.append("--no-batching")
        port = free_port()
        process = start_server(index_dir, port, extra, log_path, args.startup_timeout)
        try:
            result = asyncio.run(run_load(f"http://127.0.0.1:{port}", plans, args.concurrency, f"batching {mode}"))
        finally:
            code = stop_server(process)
        result["server_alive_until_stopped"] = code in (0, -15)  # it never died under the load
        report[f"batching_{mode}"] = result
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if "batching_on" in report and "batching_off" in report:
        report["throughput_ratio_on_vs_off"] = round(report["batching_on"]["requests_per_s"] / report["batching_off"]["requests_per_s"], 2)
    runs = [report[f"batching_{m}"] for m in modes]
    report["ok"] = all(
        r["server_errors"] == 0 and r["malformed_not_4xx"] == 0 and r["valid_not_200"] == 0 and r["server_alive_until_stopped"]
        for r in runs
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
