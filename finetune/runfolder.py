"""The names inside run, export and index folders, in one place: every command reads what another wrote.

RUN_DIR (domainclip train)      config.yaml, train_log.jsonl, adapter/, checkpoints/, eval/
EXPORT_DIR (domainclip export)  manifest.json, model.safetensors, config.yaml, eval/, onnx/, alpha_sweep/
INDEX_DIR (domainclip index)    manifest.json, {image,text}.faiss, {image,text}_ids.parquet
"""

from __future__ import annotations

# A run folder.
CONFIG = "config.yaml"  # the resolved recipe; later commands read the run's settings from here
TRAIN_LOG = "train_log.jsonl"
ADAPTER = "adapter"  # PEFT adapter folder (adapter_config.json + safetensors)
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINTS = "checkpoints"
BASE_MODEL_DIR = "base_model"  # a text-tower swap: the swapped (and distilled) model its adapter sits on
EVAL = "eval"  # results.json / .md / .png, zero_shot.json, per-class plots
ZERO_SHOT = "zero_shot.json"
BASELINES = "baselines.json"  # linear probe and k-NN on frozen features, and what their selection picked
RESULTS_JSON = "results.json"
DATA_REPORT = "data_report"  # `domainclip data inspect`'s default output, under train.output_dir

# An export folder.
MANIFEST = "manifest.json"  # export and index folders both describe themselves here
WEIGHTS = "model.safetensors"
ONNX = "onnx"
ALPHA_SWEEP = "alpha_sweep"
