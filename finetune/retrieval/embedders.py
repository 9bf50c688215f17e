"""Query embedders over an export folder: the one interface `search` and `serve` call.

    embed_texts(texts: list[str])            -> np.ndarray (N, D) float32, rows L2-normalised
    embed_images(images: list[PIL.Image])    -> np.ndarray (N, D) float32, rows L2-normalised

`TorchEmbedder` runs the exported model with PyTorch in the dtype its manifest names (int8 is
quantized at load). `load_embedder(export_dir, backend)` picks the backend: "torch", or "onnx"
(`finetune.export.onnx.OnnxEmbedder`, which needs the export's `onnx/` folder).

A batch embeds to the same vectors as its rows one by one (within float rounding; captions are padded
to the longest in the batch and masked), which is what lets `serve` batch concurrent requests. The
exception is an int8 export: dynamic quantization scales activations per batch.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch

from finetune.errors import ExportError

BACKENDS = ("torch", "onnx", "onnx-int8")


class TorchEmbedder:
    """An export folder's model with PyTorch. `manifest` is the export's manifest.json."""

    backend = "torch"

    def __init__(self, export_dir: str | os.PathLike):
        from finetune.export.exporter import load_export

        self.export_dir = Path(export_dir)
        self.model, self.processor, self.manifest = load_export(export_dir)
        self.max_text_length = int(self.manifest["max_text_length"])
        self.embedding_dim = int(self.manifest["embedding_dim"])
        # One forward at a time per model: callers may come from several threads (a server's executor).
        self._lock = threading.Lock()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        from data_tools.collate import encode_captions
        from finetune.models.towers import text_features

        if not texts:
            return np.zeros((0, self.embedding_dim), np.float32)
        tokens = encode_captions(self.processor, list(texts), self.max_text_length)
        with self._lock, torch.inference_mode():
            emb = text_features(self.model, tokens["input_ids"], tokens["attention_mask"]).float()  # (N, D)
        return torch.nn.functional.normalize(emb, dim=-1).numpy().astype(np.float32, copy=False)

    def embed_images(self, images: list) -> np.ndarray:
        from data_tools.collate import preprocess_images
        from finetune.models.towers import image_features

        if not images:
            return np.zeros((0, self.embedding_dim), np.float32)
        pixels = preprocess_images(self.processor, [im.convert("RGB") for im in images])  # (N, 3, H, W)
        with self._lock, torch.inference_mode():
            emb = image_features(self.model, pixels).float()  # (N, D)
        return torch.nn.functional.normalize(emb, dim=-1).numpy().astype(np.float32, copy=False)


def load_embedder(export_dir: str | os.PathLike, backend: str = "torch"):
    """The embedder of an export folder for `backend`: "torch", "onnx" (the fp32 graphs) or "onnx-int8"
    (the graphs `export --onnx-int8` quantized through ONNX Runtime)."""
    if backend == "torch":
        return TorchEmbedder(export_dir)
    if backend in ("onnx", "onnx-int8"):
        if not (Path(export_dir) / "onnx").is_dir():
            raise ExportError(
                f"--backend {backend}: {export_dir} has no onnx/ folder; export the towers with "
                f"`domainclip export RUN --out DIR {'--onnx-int8' if backend == 'onnx-int8' else '--onnx'}` first, or serve with --backend torch"
            )
        try:
            from finetune.export.onnx import OnnxEmbedder
        except ImportError as exc:
            raise ExportError(f"--backend {backend} is not available in this installation ({exc}); use --backend torch") from None
        return OnnxEmbedder(export_dir, quantized=backend == "onnx-int8")
    raise ExportError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
