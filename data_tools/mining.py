"""Offline cross-modal hard-negative mining with false-negative guards, and the batch sampler that puts
each anchor's mined negatives in its global batch.

Everything here takes plain arguments (embeddings, ids, labels, hashes, texts); `finetune/training/mining.py`
embeds the training set with the current model and calls it.

Identifiers. An anchor is a training pair, named by its **pair row** (the row of the training set's
normal form, `data_tools/loading.py`; data.train's rows come first, so a row number means the same
pair in `domainclip mine` and in training) and its image's `image_id`. A negative is named the same
way: for caption -> image (`t2i`) the negative is an image, written as that image's first pair row;
for image -> caption (`i2t`) it is a caption, written as its own pair row.

Mining, per direction and anchor (the anchor's positive score is the cosine of its own pair):

1. FAISS exact inner-product search (`IndexFlatIP` on L2-normalised vectors: cosine) returns the
   `rank_max` nearest candidates; `rank` is the 1-based rank among *all* candidates, positives
   included. Only ranks in [rank_min, rank_max] are considered.
2. Guards, in this order; a candidate removed by several is counted under the first:
     same_image          the anchor's own image (t2i), or any caption of it (i2t)
     same_label          a candidate whose image has the anchor image's label (both labelled)
     duplicate_hash      a candidate image whose content hash equals the anchor image's
     near_duplicate      a candidate image with cosine > near_duplicate_threshold to the anchor image
     equal_caption_text  t2i: an image with a caption whose text equals one of the anchor image's
                         captions; i2t: a caption whose text equals one of the anchor image's captions
3. Margins: kept only if score <= positive - absolute_margin and score <= positive - relative_margin
   * |positive| (the absolute value keeps the relative margin "below" when a score is negative);
   candidates failing either are counted as `margin`.
4. Of the survivors, `negatives_per_anchor` are kept: "top" (the highest scores) or "random" (drawn
   uniformly with a generator seeded by (seed, direction, anchor row)), written in rank order.

The mean score of the kept negatives is reported beside that of random negatives (per anchor, the
same number drawn uniformly from the other modality, the anchor's own image excluded).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch

from data_tools.sampling import EpochSampler

GUARDS = ("same_image", "same_label", "duplicate_hash", "near_duplicate", "equal_caption_text")
DIRECTIONS = ("t2i", "i2t")
COLUMNS = ("anchor_row", "anchor_image_id", "negative_row", "negative_image_id", "direction", "score", "positive_score", "rank")


@dataclass(frozen=True)
class MiningSettings:
    """What to keep per anchor (see the module docstring); plain values, no defaults (they live in the recipe schema)."""

    negatives_per_anchor: int
    rank_min: int
    rank_max: int
    absolute_margin: float
    relative_margin: float
    near_duplicate_threshold: float
    sampling: str  # "top" | "random"
    directions: tuple[str, ...]
    seed: int

    def __post_init__(self):
        if self.sampling not in ("top", "random"):
            raise ValueError(f"sampling must be 'top' or 'random', got {self.sampling!r}")
        if not 1 <= self.rank_min <= self.rank_max:
            raise ValueError(f"need 1 <= rank_min <= rank_max, got {self.rank_min}, {self.rank_max}")
        unknown = [d for d in self.directions if d not in DIRECTIONS]
        if unknown or not self.directions:
            raise ValueError(f"directions must be a non-empty subset of {DIRECTIONS}, got {self.directions}")


@dataclass
class MiningResult:
    rows: dict[str, np.ndarray]  # COLUMNS -> (M,) arrays, anchors in row order, negatives in rank order
    counts: dict[str, dict[str, int]]  # direction -> {"candidates", *GUARDS, "margin", "eligible", "kept", "anchors"}
    mean_score: dict[str, dict[str, float]] = field(default_factory=dict)  # direction -> {"mined", "random"}

    def __len__(self) -> int:
        return len(self.rows["anchor_row"])


def content_hash(value) -> str:
    """blake2b of an image's stored bytes (the encoded file as loaded, not the decoded pixels): two rows
    holding the same file are exact duplicates; the same picture re-encoded is left to near_duplicate."""
    import hashlib
    import os

    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None and value.get("path"):
            with open(value["path"], "rb") as fh:
                data = fh.read()
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, (str, os.PathLike)):
        with open(value, "rb") as fh:
            data = fh.read()
    else:
        data = None
    if data is None:
        raise ValueError(f"cannot hash an image value of type {type(value).__name__}")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (Q, k), exact inner product, ties broken by candidate id for a stable order."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    order = np.lexsort((ids, -scores), axis=1)  # score descending, then id
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def mine_hard_negatives(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: np.ndarray,
    *,
    pair_rows: np.ndarray,
    image_ids: list[str],
    captions: list[str],
    image_labels: list[str | None] | None,
    image_hashes: list[str],
    settings: MiningSettings,
    anchors: np.ndarray | None = None,
) -> MiningResult:
    """Mine per the module docstring.

    image_emb (N_img, D) and text_emb (N_txt, D): L2-normalised. Caption i is a caption of image
    text_to_image[i] and is pair row pair_rows[i]; image_ids, image_labels (None = unlabelled) and
    image_hashes are per image; captions per caption. `anchors`: caption indices to mine for (all by
    default); every caption and image stays a candidate.
    """
    image_emb = np.asarray(image_emb, dtype=np.float32)
    text_emb = np.asarray(text_emb, dtype=np.float32)
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    pair_rows = np.asarray(pair_rows, dtype=np.int64)
    n_img, n_txt = len(image_emb), len(text_emb)
    if len(text_to_image) != n_txt or len(pair_rows) != n_txt or len(captions) != n_txt:
        raise ValueError("text_emb, text_to_image, pair_rows and captions must have one entry per caption")
    if len(image_ids) != n_img or len(image_hashes) != n_img or (image_labels is not None and len(image_labels) != n_img):
        raise ValueError("image_ids, image_hashes and image_labels must have one entry per image")

    # Small integer codes make every guard a vectorised comparison.
    label_code = _codes(image_labels) if image_labels is not None else np.full(n_img, -1)  # (N_img,) -1 = unlabelled
    hash_code = _codes(image_hashes)  # (N_img,)
    text_code = _codes(captions)  # (N_txt,) equal texts share a code
    texts_of_image: list[set[int]] = [set() for _ in range(n_img)]
    first_row = np.full(n_img, -1, dtype=np.int64)
    for i in np.argsort(pair_rows, kind="stable"):
        texts_of_image[text_to_image[i]].add(int(text_code[i]))
        if first_row[text_to_image[i]] < 0:
            first_row[text_to_image[i]] = pair_rows[i]
    positive = np.einsum("nd,nd->n", text_emb, image_emb[text_to_image])  # (N_txt,) cosine of each pair
    anchors = np.arange(n_txt) if anchors is None else np.asarray(anchors, dtype=np.int64)
    n_anchor = len(anchors)

    parts, counts, mean_score = [], {}, {}
    for direction in settings.directions:
        if direction == "t2i":  # queries: captions; candidates: images
            scores, cand = _search(image_emb, text_emb[anchors], min(settings.rank_max, n_img))  # (A, K)
            cand_image = cand
            anchor_image = np.repeat(text_to_image[anchors][:, None], cand.shape[1], 1)  # (A, K)
            equal_text = np.array(
                [[bool(texts_of_image[a] & texts_of_image[c]) for a, c in zip(ai, ci)] for ai, ci in zip(anchor_image, cand)],
                dtype=bool,
            ).reshape(cand.shape)
        else:  # queries: each pair's image; candidates: captions (searched once per image, shared by its captions)
            per_image_scores, per_image_cand = _search(text_emb, image_emb, min(settings.rank_max, n_txt))  # (N_img, K)
            scores, cand = per_image_scores[text_to_image[anchors]], per_image_cand[text_to_image[anchors]]  # (A, K)
            cand_image = text_to_image[cand]
            anchor_image = np.repeat(text_to_image[anchors][:, None], cand.shape[1], 1)
            equal_text = np.array(
                [[int(text_code[c]) in texts_of_image[a] for a, c in zip(ai, ci)] for ai, ci in zip(anchor_image, cand)],
                dtype=bool,
            ).reshape(cand.shape)
        rank = np.broadcast_to(np.arange(1, cand.shape[1] + 1), cand.shape)  # (A, K)
        in_window = rank >= settings.rank_min
        image_cos = np.empty(cand.shape, dtype=np.float32)  # (A, K) candidate image vs anchor image, in chunks of anchors
        for s in range(0, len(cand), 2048):
            image_cos[s : s + 2048] = np.einsum("qkd,qd->qk", image_emb[cand_image[s : s + 2048]], image_emb[anchor_image[s : s + 2048, 0]])
        guard_hits = {
            "same_image": cand_image == anchor_image,
            "same_label": (label_code[cand_image] == label_code[anchor_image]) & (label_code[anchor_image] >= 0),
            "duplicate_hash": hash_code[cand_image] == hash_code[anchor_image],
            "near_duplicate": image_cos > settings.near_duplicate_threshold,
            "equal_caption_text": equal_text,
        }
        alive = in_window.copy()
        c = {"anchors": n_anchor, "candidates": int(in_window.sum())}
        for guard in GUARDS:
            hit = alive & guard_hits[guard]
            c[guard] = int(hit.sum())
            alive &= ~hit
        pos = positive[anchors][:, None]  # (A, 1)
        below = (scores <= pos - settings.absolute_margin) & (scores <= pos - settings.relative_margin * np.abs(pos))
        c["margin"] = int((alive & ~below).sum())
        alive &= below
        c["eligible"] = int(alive.sum())

        direction_id = DIRECTIONS.index(direction)
        keep = np.zeros_like(alive)
        for q in range(n_anchor):
            slots = np.flatnonzero(alive[q])
            if settings.sampling == "random" and len(slots) > settings.negatives_per_anchor:
                rng = np.random.default_rng([settings.seed, direction_id, int(pair_rows[anchors[q]])])
                slots = np.sort(rng.choice(slots, settings.negatives_per_anchor, replace=False))
            keep[q, slots[: settings.negatives_per_anchor]] = True
        c["kept"] = int(keep.sum())
        counts[direction] = c

        q_idx, k_idx = np.nonzero(keep)  # row-major: anchors in order, negatives in rank order
        neg_image = cand_image[q_idx, k_idx]
        anchor_caption = anchors[q_idx]
        parts.append(
            {
                "anchor_row": pair_rows[anchor_caption],
                "anchor_image_id": np.asarray([image_ids[i] for i in text_to_image[anchor_caption]], dtype=object),
                "negative_row": first_row[neg_image] if direction == "t2i" else pair_rows[cand[q_idx, k_idx]],
                "negative_image_id": np.asarray([image_ids[i] for i in neg_image], dtype=object),
                "direction": np.asarray([direction] * len(q_idx), dtype=object),
                "score": scores[q_idx, k_idx].astype(np.float32),
                "positive_score": positive[anchor_caption].astype(np.float32),
                "rank": rank[q_idx, k_idx].astype(np.int64),
            }
        )
        random_scores = _random_negative_scores(image_emb, text_emb, text_to_image, anchors, direction, settings)
        mean_score[direction] = {
            "mined": float(scores[q_idx, k_idx].mean()) if len(q_idx) else float("nan"),
            "random": float(random_scores.mean()) if len(random_scores) else float("nan"),
        }

    rows = {name: np.concatenate([p[name] for p in parts]) for name in COLUMNS}
    order = np.lexsort((rows["rank"], np.array([DIRECTIONS.index(d) for d in rows["direction"]]), rows["anchor_row"]))
    return MiningResult(rows={k: v[order] for k, v in rows.items()}, counts=counts, mean_score=mean_score)


def _codes(values) -> np.ndarray:
    """Equal values -> equal non-negative integers; None -> -1."""
    table: dict = {}
    return np.array([-1 if v is None else table.setdefault(v, len(table)) for v in values], dtype=np.int64)


def _random_negative_scores(image_emb, text_emb, text_to_image, anchors, direction: str, settings: MiningSettings) -> np.ndarray:
    """Scores of `negatives_per_anchor` uniformly drawn negatives per anchor (its own image excluded): the baseline."""
    rng = np.random.default_rng([settings.seed, 7, DIRECTIONS.index(direction)])
    k = settings.negatives_per_anchor
    own = text_to_image[anchors][:, None]  # (A, 1)
    if direction == "t2i":
        draws = rng.integers(0, len(image_emb), size=(len(anchors), k))
        ok = draws != own
        scores = np.einsum("nd,nkd->nk", text_emb[anchors], image_emb[draws])
    else:
        draws = rng.integers(0, len(text_emb), size=(len(anchors), k))
        ok = text_to_image[draws] != own
        scores = np.einsum("nd,nkd->nk", image_emb[own[:, 0]], text_emb[draws])
    return scores[ok]


def _score(value: float) -> str:
    """A mean over no negatives is not a number: say "none kept" instead of printing nan."""
    return "none kept" if value != value else f"{value:.4f}"


def format_guard_counts(counts: dict[str, dict[str, int]], mean_score: dict[str, dict[str, float]] | None = None) -> str:
    """The guard counts as a markdown table: one row per guard (in the order they apply), one column per direction."""
    directions = list(counts)
    head = "| step | " + " | ".join(directions) + " | total |"
    lines = [head, "|:--" + "|--:" * (len(directions) + 1) + "|"]
    for key in ("anchors", "candidates", *GUARDS, "margin", "eligible", "kept"):
        label = {
            "candidates": "candidates in rank window",
            "eligible": "eligible after guards + margins",
            "kept": "kept (negatives_per_anchor)",
            "margin": "below margins (removed)",
        }.get(key, key)
        if key in GUARDS:
            label = f"guard: {key}"
        values = [counts[d][key] for d in directions]
        total = sum(values) if key != "anchors" else max(values)
        lines.append(f"| {label} | " + " | ".join(str(v) for v in values) + f" | {total} |")
    if mean_score:
        for kind in ("mined", "random"):
            lines.append(f"| mean score, {kind} negatives | " + " | ".join(_score(mean_score[d][kind]) for d in directions) + " | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the batch sampler


def negatives_by_anchor(anchor_rows, negative_rows, scores) -> dict[int, list[int]]:
    """{anchor row: its mined negative rows, highest score first (ties by row), each once}."""
    order = np.lexsort((np.asarray(negative_rows), -np.asarray(scores, dtype=np.float64), np.asarray(anchor_rows)))
    table: dict[int, list[int]] = {}
    for i in order:
        a, n = int(anchor_rows[i]), int(negative_rows[i])
        if n != a and n not in table.setdefault(a, []):
            table[a].append(n)
    return table


@dataclass
class CompositionStats:
    anchors: int = 0  # rows placed as anchors (drawn from the base order, not as someone's negative)
    anchors_with_negatives: int = 0  # anchors that had at least one mined negative
    wanted: int = 0  # sum over anchors of min(k, mined negatives)
    placed: int = 0  # of those, negatives in the anchor's global batch
    deferred: int = 0  # anchors moved to the next global batch because their group did not fit
    groups: list[tuple[int, int, list[int]]] = field(default_factory=list, repr=False)  # (global batch, anchor, negatives in it)

    def coverage(self) -> float:
        return self.placed / self.wanted if self.wanted else 1.0


def compose_batches(
    base_order: list[int], negatives: dict[int, list[int]], global_batch: int, per_anchor: int, lookahead: int = 16
) -> tuple[list[int], CompositionStats]:
    """Reorder one epoch so each anchor's mined negatives land in its global batch.

    The result is a permutation of `base_order` (the same rows, the same number of times): epoch
    length, class and replay fractions are exactly the base sampler's. Anchors are taken in base
    order; each brings up to `per_anchor` of its negatives that the epoch still has to visit (a
    negative already in this global batch counts as placed), which are then taken out of the rest of
    the epoch. A group that does not fit the batch's free room waits for the next batch while up to
    `lookahead` later anchors try to fill it; failing that, the waiting anchor goes in with as many
    negatives as fit. Chunks of `global_batch` rows are what Accelerate deals out as one step's
    per-process batches, so "same global batch" holds across processes.
    """
    remaining = Counter(base_order)
    stats = CompositionStats()
    waiting: deque[int] = deque()  # anchors already taken out of `remaining`, placed first in the next batch
    pos, out = 0, []

    def next_anchor() -> int | None:
        nonlocal pos
        while pos < len(base_order):
            row = base_order[pos]
            pos += 1
            if remaining[row] > 0:
                remaining[row] -= 1
                return row
        return None

    def group(anchor: int, members: set[int]) -> tuple[list[int], int, int]:
        """(negatives to add, wanted, already in the batch)"""
        mined = negatives.get(anchor, [])
        wanted = min(per_anchor, len(mined))
        there = [n for n in mined if n in members][:wanted]
        add = [n for n in mined if n not in members and remaining[n] > 0][: wanted - len(there)]
        return add, wanted, len(there)

    def place(anchor: int, add: list[int], wanted: int, there: int, chunk: list[int], members: set[int]) -> None:
        chunk.append(anchor)
        members.add(anchor)
        for n in add:
            remaining[n] -= 1
            chunk.append(n)
            members.add(n)
        stats.anchors += 1
        stats.anchors_with_negatives += wanted > 0
        stats.wanted += wanted
        stats.placed += there + len(add)
        if wanted:
            stats.groups.append((len(out) // global_batch, anchor, [n for n in negatives[anchor] if n in members][:wanted]))

    while True:
        chunk: list[int] = []
        members: set[int] = set()
        carried, waiting = waiting, deque()
        while len(chunk) < global_batch:
            room = global_batch - len(chunk)
            anchor = carried.popleft() if carried else next_anchor()
            if anchor is None or len(waiting) > lookahead:
                # Nothing left to try (end of the epoch, or `lookahead` anchors tried): the first waiting
                # anchor goes in with as many negatives as fit, so no batch but the epoch's last is short.
                if anchor is not None:
                    carried.appendleft(anchor)
                if not waiting:
                    break
                first = waiting.popleft()
                stats.deferred -= 1
                add, wanted, there = group(first, members)
                place(first, add[: room - 1], wanted, there, chunk, members)
                continue
            add, wanted, there = group(anchor, members)
            if 1 + len(add) <= room:
                place(anchor, add, wanted, there, chunk, members)
            else:  # does not fit: it waits for the next batch while later anchors try to fill the room
                waiting.append(anchor)
                stats.deferred += 1
        waiting.extendleft(reversed(carried))  # carried but not reached: still first in line
        out.extend(chunk)
        if not chunk:
            break
    return out, stats


class MinedNegativeSampler(EpochSampler):
    """Wraps an epoch sampler: the same rows per epoch (from (seed, epoch) as before), reordered by
    `compose_batches` so each anchor's mined negatives share its global batch.

    Deterministic from (seed, epoch, the negatives table): `set_negatives(table, name)` swaps the table
    (the loop does it at the start of an epoch) and the cached order is keyed by (epoch, name).
    Without a table it yields the base order unchanged.
    """

    def __init__(self, base: EpochSampler, global_batch: int, per_anchor: int, seed: int):
        super().__init__(seed)
        if per_anchor + 1 > global_batch:
            raise ValueError(
                f"an anchor and its {per_anchor} negatives need a global batch of at least {per_anchor + 1}, got {global_batch}"
            )
        self.base, self.global_batch, self.per_anchor = base, global_batch, per_anchor
        self.negatives: dict[int, list[int]] = {}
        self.negatives_name: str | None = None
        self.last_stats: CompositionStats | None = None

    def set_negatives(self, table: dict[int, list[int]], name: str | None) -> None:
        self.negatives, self.negatives_name = table, name

    def epoch_generator(self, epoch: int) -> torch.Generator:
        return self.base.epoch_generator(epoch)  # the base order is exactly the base sampler's

    def epoch_order(self, epoch: int, generator: torch.Generator) -> list[int]:
        base = torch.as_tensor(self.base.epoch_order(epoch, generator), dtype=torch.int64).tolist()
        if not self.negatives:
            return base
        order, self.last_stats = compose_batches(base, self.negatives, self.global_batch, self.per_anchor)
        return order

    def order(self, epoch: int) -> torch.Tensor:
        key = (epoch, self.negatives_name)
        if self._cached is None or self._cached[0] != key:
            order = torch.as_tensor(self.epoch_order(epoch, self.epoch_generator(epoch)), dtype=torch.int64)
            self._cached = (key, order)
        return self._cached[1]
