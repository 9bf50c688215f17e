"""Query and corpus embedders: one per backend, one interface.

    embed_texts(texts: list[str])            -> np.ndarray (N, D) float32, rows L2-normalised
    embed_images(images: list[PIL.Image])    -> np.ndarray (N, D) float32, rows L2-normalised

`TorchEmbedder` runs a model with PyTorch: an export folder's (`TorchEmbedder.from_export`, in the
dtype its manifest names; int8 is quantized at load) or one in memory (the ONNX parity check's
reference). `OnnxEmbedder` runs an export's ONNX towers through onnxruntime. Both tokenise
(`data_tools.collate.encode_captions`, the export's `max_text_length`) and preprocess
(`preprocess_images`) the same way. `load_embedder(export_dir, backend)` is what `search` and `serve`
call.

A batch embeds to the same vectors as its rows one by one (within float rounding; captions are padded
to the longest in the batch and masked), which is what lets `serve` batch concurrent requests. The
exception is int8 (torch or ONNX): dynamic quantization scales activations per batch.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch

from finetune.errors import ExportError
from finetune.runfolder import ONNX

BACKENDS = ("torch", "onnx", "onnx-int8")


def default_threads() -> int:
    """Threads for either backend: torch's intra-op threads (OMP_NUM_THREADS / DOMAINCLIP_NUM_THREADS set them)."""
    return torch.get_num_threads()


def _normalised(emb: torch.Tensor) -> np.ndarray:
    """Rows L2-normalised in float32 (a bf16 model's features are cast first). # (N, D)"""
    return torch.nn.functional.normalize(emb.float(), dim=-1).numpy().astype(np.float32, copy=False)


class TorchEmbedder:
    """A model's two towers with PyTorch, in batches of `batch_size`.

    Args:
        model: a CLIP-like model of the model table (merged, or a PEFT wrapper); put in eval mode.
        processor: its processor (tokenizer + image processor).
        max_text_length: captions are truncated to this many tokens.
        manifest: the export's manifest.json when the model came from an export folder.
    """

    backend = "torch"

    def __init__(self, model, processor, max_text_length: int, *, batch_size: int = 64, manifest: dict | None = None):
        from finetune.models.towers import embedding_dim

        self.model, self.processor = model.eval(), processor
        self.max_text_length, self.batch_size = int(max_text_length), batch_size
        self.manifest = manifest
        self.embedding_dim = int(manifest["embedding_dim"]) if manifest else embedding_dim(model)
        # One forward at a time per model: callers may come from several threads (a server's executor).
        self._lock = threading.Lock()

    @classmethod
    def from_export(cls, export_dir: str | os.PathLike, *, batch_size: int = 64) -> TorchEmbedder:
        """The model of an export folder, as `finetune.export.merge.load_export` gives it back."""
        from finetune.export.merge import load_export

        model, processor, manifest = load_export(export_dir)
        embedder = cls(model, processor, manifest["max_text_length"], batch_size=batch_size, manifest=manifest)
        embedder.export_dir = Path(export_dir)
        return embedder

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        from data_tools.collate import encode_captions
        from finetune.models.towers import text_features

        parts = [np.zeros((0, self.embedding_dim), np.float32)]
        for start in range(0, len(texts), self.batch_size):
            tokens = encode_captions(self.processor, list(texts[start : start + self.batch_size]), self.max_text_length)
            with self._lock, torch.inference_mode():
                emb = text_features(self.model, tokens["input_ids"], tokens["attention_mask"]).float()  # (b, D)
            parts.append(_normalised(emb))
        return np.concatenate(parts)

    def embed_images(self, images: list) -> np.ndarray:
        from data_tools.collate import preprocess_images
        from finetune.models.towers import image_features

        parts = [np.zeros((0, self.embedding_dim), np.float32)]
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            pixels = preprocess_images(self.processor, batch)  # (b, 3, H, W)
            with self._lock, torch.inference_mode():
                emb = image_features(self.model, pixels).float()  # (b, D)
            parts.append(_normalised(emb))
        return np.concatenate(parts)


# ----------------------------------------------------------------------------- onnxruntime


def session_options(num_threads: int):
    """Explicit threads: `num_threads` intra-op (inside one matmul), 1 inter-op (the towers are one chain)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(num_threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    # Idle intra-op threads sleep instead of spinning: in a server the spinning threads would take the
    # cores the event loop and request parsing need between forwards.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def execution_providers(device: str) -> list[str]:
    """`cpu`: CPUExecutionProvider; `cuda`: CUDAExecutionProvider first, only when this onnxruntime has it."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise ExportError(
                f"device='cuda': this onnxruntime has no CUDAExecutionProvider (it has {', '.join(available)}); "
                "install onnxruntime-gpu or use device='cpu'"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def open_session(path: str | os.PathLike, *, num_threads: int, device: str = "cpu"):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=session_options(num_threads), providers=execution_providers(device))


class OnnxTowers:
    """The two graph sessions of one folder, on preprocessed arrays (no tokenizer, no processor)."""

    def __init__(self, onnx_dir: str | os.PathLike, files: dict, *, num_threads: int, device: str = "cpu"):
        self.image = open_session(Path(onnx_dir) / files["image"], num_threads=num_threads, device=device)
        self.text = open_session(Path(onnx_dir) / files["text"], num_threads=num_threads, device=device)

    @property
    def embedding_dim(self) -> int:
        return int(self.image.get_outputs()[0].shape[1])

    def image_embeddings(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 -> (B, D) float32, L2-normalised."""
        return self.image.run(None, {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)})[0]

    def text_embeddings(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(B, L) int64 twice -> (B, D) float32, L2-normalised."""
        feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64), "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        return self.text.run(None, feeds)[0]


class OnnxEmbedder:
    """Embeds captions and images with an export's ONNX towers through onnxruntime.

    Args:
        export_dir: a folder written by `domainclip export --onnx` (or `--onnx-int8`).
        quantized: use the int8 graphs (`--onnx-int8`); an export without them is an error.
        num_threads: onnxruntime intra-op threads; None = `torch.get_num_threads()`, the same number the
            PyTorch path would use. Inter-op threads are 1.
        device: "cpu" (CPUExecutionProvider, the default) or "cuda" (CUDAExecutionProvider, needs
            onnxruntime-gpu; the CPU provider stays as the fallback for ops CUDA lacks).
        batch_size: images or captions per session call.
    """

    def __init__(
        self,
        export_dir: str | os.PathLike,
        *,
        quantized: bool = False,
        num_threads: int | None = None,
        device: str = "cpu",
        batch_size: int = 64,
    ):
        from finetune.export.merge import read_manifest
        from finetune.models.load import load_model_config
        from finetune.models.towers import architecture_for

        self.export_dir = Path(export_dir)
        manifest = read_manifest(self.export_dir)
        entry = manifest.get("onnx")
        onnx_dir = self.export_dir / ONNX
        if entry is None or not onnx_dir.is_dir():
            raise ExportError(
                f"{self.export_dir} holds no ONNX towers ({onnx_dir} or the manifest's 'onnx' entry is missing): "
                f"export it with `domainclip export RUN --out {self.export_dir} --onnx`"
            )
        kind = "int8" if quantized else "fp32"
        files = entry["files"].get(kind)
        if files is None:
            raise ExportError(
                f"{self.export_dir} holds no int8 ONNX towers: export it with `domainclip export RUN --out {self.export_dir} "
                "--onnx-int8`, or use quantized=False"
            )
        for name in ("image", "text"):
            if not (onnx_dir / files[name]["file"]).is_file():
                raise ExportError(f"{onnx_dir / files[name]['file']} is missing (named in {self.export_dir}/manifest.json)")
        config = load_model_config(str(self.export_dir))
        processor = architecture_for(config).processor_class.from_pretrained(self.export_dir)
        num_threads = int(num_threads or default_threads())
        towers = OnnxTowers(onnx_dir, {n: files[n]["file"] for n in files}, num_threads=num_threads, device=device)
        self._setup(towers, processor, manifest["max_text_length"], batch_size, num_threads)
        self.manifest = manifest  # the export's manifest.json, as TorchEmbedder.from_export has it
        self.backend = "onnx-int8" if quantized else "onnx"
        self.quantized = quantized

    @classmethod
    def from_graphs(cls, onnx_dir, files: dict, processor, max_text_length: int, *, batch_size: int = 64, num_threads: int | None = None):
        """Graphs not yet in an export folder (while `export --onnx` checks them)."""
        embedder = cls.__new__(cls)
        num_threads = int(num_threads or default_threads())
        embedder._setup(OnnxTowers(onnx_dir, files, num_threads=num_threads), processor, max_text_length, batch_size, num_threads)
        embedder.manifest, embedder.backend, embedder.quantized = None, "onnx", None
        return embedder

    def _setup(self, towers: OnnxTowers, processor, max_text_length: int, batch_size: int, num_threads: int) -> None:
        self.towers, self.processor = towers, processor
        self.max_text_length, self.batch_size, self.num_threads = int(max_text_length), batch_size, num_threads
        self.embedding_dim = towers.embedding_dim

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        from data_tools.collate import encode_captions

        parts = [np.zeros((0, self.embedding_dim), dtype=np.float32)]
        for start in range(0, len(texts), self.batch_size):
            tokens = encode_captions(self.processor, list(texts[start : start + self.batch_size]), self.max_text_length)
            parts.append(self.towers.text_embeddings(tokens["input_ids"].numpy(), tokens["attention_mask"].numpy()))
        return np.concatenate(parts)

    def embed_images(self, images: list) -> np.ndarray:
        from data_tools.collate import preprocess_images

        parts = [np.zeros((0, self.embedding_dim), dtype=np.float32)]
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            parts.append(self.towers.image_embeddings(preprocess_images(self.processor, batch).numpy()))
        return np.concatenate(parts)


def load_embedder(export_dir: str | os.PathLike, backend: str = "torch"):
    """The embedder of an export folder for `backend`: "torch", "onnx" (the fp32 graphs) or "onnx-int8"
    (the graphs `export --onnx-int8` quantized through ONNX Runtime)."""
    if backend == "torch":
        return TorchEmbedder.from_export(export_dir)
    if backend in ("onnx", "onnx-int8"):
        if not (Path(export_dir) / ONNX).is_dir():
            raise ExportError(
                f"--backend {backend}: {export_dir} has no {ONNX}/ folder; export the towers with "
                f"`domainclip export RUN --out DIR {'--onnx-int8' if backend == 'onnx-int8' else '--onnx'}` first, or serve with --backend torch"
            )
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ExportError(f"--backend {backend} is not available in this installation ({exc}); use --backend torch") from None
        return OnnxEmbedder(export_dir, quantized=backend == "onnx-int8")
    raise ExportError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
