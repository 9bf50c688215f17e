"""Hard-negative mining for a run: embed data.train with the current model, mine (data_tools/mining.py),
write `<output_dir>/mining/negatives-stepNNNNNNNN.parquet` + `.json` atomically; and the in-loop refresh.

    domainclip mine recipes/demo.yaml [key.sub=value ...] [--adapter RUN_DIR] [--out FILE]

Which model embeds: `domainclip mine` uses the recipe's base checkpoint (zero-shot), or a finished
run's adapter with `--adapter RUN_DIR` (`load_adapted`). Training (`mining.enabled: true`) mines at
step 0 with the model it starts from (the base: LoRA's B matrices start at zero), then every
`mining.refresh_every_steps` with the adapted model of that step, after the optimizer step and before
that step's checkpoint. The base's step-0 file written by `domainclip mine` is the same file training
would write, so training reuses it.

When the sampler switches: at the start of the next epoch. The file in use for the current epoch
(`TrainerState.negatives_in_use`) and the newest file (`TrainerState.latest_negatives`) are saved in
every checkpoint, and a mined file is never rewritten once complete (atomic writes), so a resumed run
reads exactly the files the uninterrupted run used. Mining runs under a forked RNG: it draws nothing
from the global generator (dropout masks stay those of a run without mining).

Several processes: each embeds its shard (evaluate.py's sharded embedding), the main process mines and
writes, every process then reads the same file: deterministic either way.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from data_tools.loading import RetrievalSet
from data_tools.mining import (
    COLUMNS,
    MinedNegativeSampler,
    MiningResult,
    MiningSettings,
    content_hash,
    format_guard_counts,
    mine_hard_negatives,
    negatives_by_anchor,
)
from data_tools.sampling import EpochSampler
from finetune.config.schema import RecipeConfig
from finetune.evaluation.evaluate import embed_retrieval_set
from finetune.io import atomic_write_bytes, atomic_write_text

MINING_DIR = "mining"
SCHEMA = pa.schema(
    [
        ("anchor_row", pa.int64()),
        ("anchor_image_id", pa.string()),
        ("negative_row", pa.int64()),
        ("negative_image_id", pa.string()),
        ("direction", pa.string()),
        ("score", pa.float32()),
        ("positive_score", pa.float32()),
        ("rank", pa.int64()),
    ]
)


def mining_settings(cfg: RecipeConfig) -> MiningSettings:
    m = cfg.mining
    return MiningSettings(
        negatives_per_anchor=m.negatives_per_anchor,
        rank_min=m.rank_min,
        rank_max=m.rank_max,
        absolute_margin=m.absolute_margin,
        relative_margin=m.relative_margin,
        near_duplicate_threshold=m.near_duplicate_threshold,
        sampling=m.sampling,
        directions=tuple(m.directions),
        seed=cfg.train.seed,
    )


def negatives_name(step: int) -> str:
    """The mined file of `step`, relative to the output folder (what TrainerState records)."""
    return f"{MINING_DIR}/negatives-step{step:08d}.parquet"


def primary_retrieval_set(pairs, num_primary: int) -> RetrievalSet:
    """data.train's rows (the first `num_primary` rows of the training set) regrouped by image."""
    return RetrievalSet.from_pairs(pairs.select(range(num_primary)) if num_primary < len(pairs) else pairs)


def image_hashes(rset: RetrievalSet, valid: np.ndarray) -> list[str]:
    """Content hash (stored bytes) of each readable unique image, in set order."""
    rows = rset.image_rows[valid].tolist()
    images = rset.pairs.select(rows).select_columns(["image"])
    hashes: list[str] = []
    for batch in images.iter(batch_size=1024):
        hashes.extend(content_hash(value) for value in batch["image"])
    return hashes


def mine_training_set(
    model,
    processor,
    pairs,
    num_primary: int,
    settings: MiningSettings,
    *,
    batch_size: int,
    max_text_length: int,
    num_workers: int = 0,
    accelerator=None,
    desc: str = "mining",
) -> MiningResult | None:
    """Embed data.train (collective with several processes) and mine; None on every process but the main one."""
    rset = primary_retrieval_set(pairs, num_primary)
    emb = embed_retrieval_set(
        model,
        processor,
        rset,
        batch_size=batch_size,
        max_text_length=max_text_length,
        num_workers=num_workers,
        accelerator=accelerator,
        name="data.train",
        desc=desc,
    )
    if accelerator is not None and not accelerator.is_main_process:
        return None
    valid = emb["image_valid"].numpy()  # (N_img,)
    keep_text = valid[rset.text_to_image]  # (N_txt,) captions of readable images
    pair_rows = np.flatnonzero(keep_text)  # caption i of the set is pair row i
    images = np.flatnonzero(valid)
    return mine_hard_negatives(
        F.normalize(emb["image_emb"].float(), dim=-1).numpy(),
        F.normalize(emb["text_emb"].float(), dim=-1).numpy(),
        emb["text_to_image"].numpy(),
        pair_rows=pair_rows,
        image_ids=[rset.image_ids[i] for i in images],
        captions=[rset.captions[i] for i in pair_rows],
        image_labels=[rset.labels[i] or None for i in images] if rset.labels is not None else None,
        image_hashes=image_hashes(rset, valid),
        settings=settings,
    )


def write_negatives(result: MiningResult, path: Path, summary: dict) -> None:
    """The mined rows as parquet, then the summary JSON beside it, each written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({name: pa.array(result.rows[name].tolist(), type=SCHEMA.field(name).type) for name in COLUMNS}, schema=SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    atomic_write_text(path.with_suffix(".json"), json.dumps(summary, indent=2))


def read_negatives(path: Path) -> dict[int, list[int]]:
    """{anchor pair row: negative pair rows, highest score first} from a mined file."""
    table = pq.read_table(path, columns=["anchor_row", "negative_row", "score"]).to_pydict()
    return negatives_by_anchor(table["anchor_row"], table["negative_row"], table["score"])


def summarize(result: MiningResult, settings: MiningSettings, *, step: int | None, model: str, num_pairs: int, seconds: float) -> dict:
    return {
        "step": step,
        "model": model,
        "settings": asdict(settings) | {"directions": list(settings.directions)},
        "num_pairs": num_pairs,
        "rows": len(result),
        "counts": result.counts,
        "mean_score": result.mean_score,
        "seconds": round(seconds, 2),
    }


def reusable(path: Path, settings: MiningSettings, num_pairs: int) -> bool:
    """A complete file mined with these settings over this many pairs (written atomically: never half)."""
    summary = path.with_suffix(".json")
    if not (path.is_file() and summary.is_file()):
        return False
    saved = json.loads(summary.read_text())
    return saved.get("settings") == asdict(settings) | {"directions": list(settings.directions)} and saved.get("num_pairs") == num_pairs


def build_mined_sampler(cfg: RecipeConfig, base: EpochSampler, num_processes: int) -> EpochSampler:
    """The recipe's sampler, reordered so mined negatives share their anchor's global batch (when mining is on)."""
    if not cfg.mining.enabled:
        return base
    # The rows one loss sees: the global batch when features are gathered, else one process's batch
    # (Accelerate deals consecutive batch_size rows to each process, so either is a run of the order).
    together = cfg.train.batch_size * (num_processes if cfg.loss.gather_across_processes else 1)
    return MinedNegativeSampler(base, together, cfg.mining.negatives_per_anchor_in_batch, cfg.train.seed)


class Miner:
    """The loop's mining hooks: `start(model, state)` once, `start_epoch(state, sampler)` at each epoch,
    `after_step(model, state, max_steps)` after each optimizer step (see the module docstring)."""

    def __init__(self, cfg: RecipeConfig, processor, train_pairs, max_text_length: int, num_workers: int, accelerator, out: Path, log):
        self.cfg, self.processor, self.train_pairs = cfg, processor, train_pairs
        self.max_text_length, self.num_workers, self.accelerator, self.out = max_text_length, num_workers, accelerator, out
        self.settings = mining_settings(cfg)
        self.log = log  # a print function
        self._tables: dict[str, dict[int, list[int]]] = {}

    def start(self, model, state) -> None:
        if state.latest_negatives is None:  # a fresh run (or one resumed from before mining was on)
            state.latest_negatives = self.mine(model, state.step, verbose=True)

    def start_epoch(self, state, sampler: MinedNegativeSampler) -> None:
        if state.batches_done_in_epoch == 0:  # a new epoch takes the newest file; a resumed one keeps its own
            state.negatives_in_use = state.latest_negatives
        name = state.negatives_in_use
        if name not in self._tables:
            self._tables = {name: read_negatives(self.out / name)}
        while not isinstance(sampler, MinedNegativeSampler):  # under wrappers that key samples (augmentation)
            sampler = sampler.sampler
        sampler.set_negatives(self._tables[name], name)

    def after_step(self, model, state, max_steps: int) -> None:
        every = self.cfg.mining.refresh_every_steps
        if every and state.step % every == 0 and state.step < max_steps:
            state.latest_negatives = self.mine(model, state.step, verbose=False)

    def mine(self, model, step: int, *, verbose: bool) -> str:
        """Mine (or reuse the complete file of) `step` on every process; returns the file's name."""
        from accelerate.utils import broadcast_object_list

        name = negatives_name(step)
        path = self.out / name
        num_primary = self.train_pairs.num_primary
        decision = [reusable(path, self.settings, num_primary) if self.accelerator.is_main_process else None]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(decision)  # every process embeds, or none does
        if decision[0]:
            self.log(f"Mining: reusing {path}")
            return name
        started = time.time()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # mining draws nothing from the training RNG
            result = mine_training_set(
                model,
                self.processor,
                self.train_pairs.pairs,
                num_primary,
                self.settings,
                batch_size=self.cfg.eval.batch_size,
                max_text_length=self.max_text_length,
                num_workers=self.num_workers,
                accelerator=self.accelerator,
                desc=f"mining step {step}",
            )
        if self.accelerator.is_main_process:
            summary = summarize(
                result,
                self.settings,
                step=step,
                model="training model" if step else "base (step 0)",
                num_pairs=num_primary,
                seconds=time.time() - started,
            )
            write_negatives(result, path, summary)
            if verbose:
                self.log(format_guard_counts(result.counts, result.mean_score))
            self.log(f"Mining step {step}: {len(result)} negatives for {num_primary} pairs -> {path}")
        self.accelerator.wait_for_everyone()
        return name
