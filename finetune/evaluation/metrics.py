"""Retrieval metrics for zero-shot vs adapted CLIP: numbers only (tables and plots are in report.py).

Everything here is a pure function of tensors or plain lists (no model code), so the numbers a run
reports can be unit-tested by hand and recomputed offline from saved embeddings.

Retrieval follows the multi-caption definition used by CLIP_benchmark: an image may have several
captions; text->image asks whether a caption's own image ranks high, image->text asks whether *any*
of the image's captions ranks high.

Ties. Eval sets hold exact duplicates (the same caption text written for two images, two images
that embed identically), and identical embeddings score bit-identically. Counting a tie for the
query lets it win every tie (R@1 inflated), counting it against the query loses them all, and a
top-k index picks whatever order the sort happens to leave. Here a tie is scored as its expected
value when the tied candidates are put in a uniformly random order: a query tied with t other
candidates for the top slot scores 1 / (t + 1) at R@1, not 1 and not 0. Without ties every number
equals the plain "1 + strictly better candidates" rank.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data_tools.sampling import frequency_groups  # noqa: F401  (head / medium / tail; re-exported)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "QueryRanks",
    "duplicate_caption_texts",
    "retrieval_metrics",
    "retrieval_ranks",
    # Re-exported from finetune.evaluation.report (their home) so existing imports keep working.
    "format_results_table",
    "write_results",
]

# Bytes of float32 scores held at once. Query rows per chunk = this / (bytes per row of scores),
# so a 500k-caption set scores ~130 image rows at a time instead of a fixed row count whose size
# grows with the number of candidates (1024 x 500k float32 is 2 GB).
DEFAULT_CHUNK_BYTES = 256 * 2**20
_SCORE_BYTES = 4  # float32


@dataclass(frozen=True)
class QueryRanks:
    """Where each query's correct match lands, for one direction, with ties kept apart.

    For text->image a query is a caption and its "own" candidate is its image; for image->text a
    query is an image and its own candidates are all its captions, of which the best-scoring one
    counts. All tensors are on the CPU, one entry per query (Q = N_txt or N_img).

    Attributes:
        better: (Q,) int64, candidates that are not the query's own scoring strictly above its
            best own score. The optimistic rank is ``1 + better``.
        tied: (Q,) int64, candidates that are not the query's own scoring exactly that score. The
            pessimistic rank is ``1 + better + tied``.
        tied_own: (Q,) int64, own candidates scoring exactly that score (>= 1; always 1 for
            text->image). Own candidates scoring below it do not affect the rank.
        own_score: (Q,) float32, the best own cosine similarity (its last bit may depend on how
            many queries were scored together).
    """

    better: torch.Tensor
    tied: torch.Tensor
    tied_own: torch.Tensor
    own_score: torch.Tensor

    def expected_rank(self) -> torch.Tensor:
        """(Q,) float64 rank of the first own candidate, averaged over random tie orders.

        The m tied own candidates split the t tied others into m + 1 gaps of t / (m + 1) expected
        size, and the first own candidate comes after the first gap.
        """
        return 1.0 + self.better.double() + self.tied.double() / (self.tied_own.double() + 1.0)

    def hit_probability(self, k: int) -> torch.Tensor:
        """(Q,) float64 probability that an own candidate is in the top k under a random tie order.

        After the ``better`` candidates, j = k - better slots remain for the m + t tied ones; the
        query misses when all j go to others: P(miss) = C(t, j) / C(m + t, j), which is
        prod_{i=1..m} (t - j + i) / (t + i): a product over m (a handful of own captions) rather
        than over j (up to k). For text->image, m = 1 and P(hit) = j / (t + 1).
        """
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        slots = int(k) - self.better  # (Q,)
        j = torch.minimum(slots.clamp(min=0), self.tied).double()  # (Q,) in [0, t]
        t, m = self.tied.double(), self.tied_own  # (Q,), (Q,)
        miss = torch.ones_like(t)  # (Q,)
        most_own = int(m.max()) if m.numel() else 0
        for i in range(1, most_own + 1):
            factor = (t - j + i) / (t + i)  # (Q,)
            miss = torch.where(m >= i, miss * factor, miss)
        hit = 1.0 - miss
        hit = torch.where(slots > self.tied, torch.ones_like(hit), hit)  # room for every tie
        return torch.where(slots <= 0, torch.zeros_like(hit), hit)  # no room at all


def retrieval_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, QueryRanks]:
    """Per-query rank information for text->image (per caption) and image->text (per image).

    Embeddings are L2-normalised here (in float32) so callers can pass raw encoder outputs and the
    score is always cosine similarity. Each distinct candidate embedding is scored once per query
    and the score copied to every candidate holding it, so identical embeddings always tie exactly
    (a matrix product may round two identical columns differently).

    Args:
        image_emb: (N_img, D) image embeddings, any scale.
        text_emb: (N_txt, D) caption embeddings, any scale; scored on image_emb's device.
        text_to_image: (N_txt,) integer index of each caption's image. Every image needs at least
            one caption, otherwise its image->text rank is undefined.
        chunk_bytes: bytes of similarity scores held at once; sets how many query rows are scored
            together (at least one). The counts do not depend on it: every comparison is made
            within one row of one matrix product.

    Returns:
        ``{"t2i": QueryRanks over captions, "i2t": QueryRanks over images}``.

    Raises:
        ValueError: on malformed shapes, non-finite values, out-of-range indices, images without
            captions or a bad chunk_bytes.
    """
    if not isinstance(chunk_bytes, (int, np.integer)) or isinstance(chunk_bytes, bool) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    text_to_image = torch.as_tensor(text_to_image)
    _validate_inputs(image_emb, text_emb, text_to_image)

    device = image_emb.device
    with torch.no_grad():
        img_unique, img_of = _unique_unit_rows(image_emb.to(device))  # (U_img, D), (N_img,) or None
        txt_unique, txt_of = _unique_unit_rows(text_emb.to(device))  # (U_txt, D), (N_txt,) or None
        t2i_idx = text_to_image.detach().to(device=device, dtype=torch.long)  # (N_txt,)
        return {
            "t2i": _text_to_image_ranks(_spread(txt_unique, txt_of), img_unique, img_of, t2i_idx, int(chunk_bytes)),
            "i2t": _image_to_text_ranks(_spread(img_unique, img_of), txt_unique, txt_of, t2i_idx, int(chunk_bytes)),
        }


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, dict[str, float]]:
    """Recall@K and mean/median rank for text->image and image->text retrieval.

    R@K is 100 x the mean over queries of `QueryRanks.hit_probability`, mean_rank and median_rank
    are the mean and (numpy) median of `QueryRanks.expected_rank`: exact ties are counted at their
    expected value under a random order of the tied candidates (see the module docstring).

    Args:
        image_emb, text_emb, text_to_image, chunk_bytes: as for `retrieval_ranks`.
        ks: the K values for Recall@K; each gives a key ``f"R@{k}"``.

    Returns:
        ``{"t2i": {...}, "i2t": {...}}``, each with ``R@K`` in percent (0-100), ``mean_rank`` and
        ``median_rank`` (1 is best), as plain Python floats.

    Raises:
        ValueError: as for `retrieval_ranks`, or on a K that is not a positive int.
    """
    ks = _validate_ks(ks)
    ranks = retrieval_ranks(image_emb, text_emb, text_to_image, chunk_bytes=chunk_bytes)
    return {direction: _summarise_ranks(r, ks) for direction, r in ranks.items()}


def duplicate_caption_texts(captions: Sequence[str]) -> dict[str, Any]:
    """How many captions of an eval set repeat another caption's exact text.

    Duplicate texts embed identically, so for image->text they tie exactly and cap R@1 below 100
    however good the model is; a report shows this count next to the numbers it explains.
    Texts are compared as exact strings: two that differ only in case or spacing may still embed
    identically under a lowercasing tokenizer and are not counted.

    Returns:
        ``captions``: N, the number of captions.
        ``unique_texts``: U, the number of distinct texts.
        ``duplicate_captions``: captions whose text occurs more than once, every copy counted
            (``["a", "a", "b"]`` gives 2).
        ``duplicated_texts``: distinct texts that occur more than once (1 in that example), so
            ``captions - unique_texts == duplicate_captions - duplicated_texts``.
        ``example``: the most frequent duplicated text (the first seen among equally frequent
            ones), or None when every text is unique.
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, got a single str")
    captions = list(captions)
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"captions[{i}] must be a str, got {type(caption).__name__}")
    counts = Counter(captions)  # insertion-ordered: first-seen text first
    repeated = {text: n for text, n in counts.items() if n > 1}
    return {
        "captions": len(captions),
        "unique_texts": len(counts),
        "duplicate_captions": sum(repeated.values()),
        "duplicated_texts": len(repeated),
        # max() keeps the first of equal counts, so the example is stable run to run.
        "example": max(repeated, key=repeated.__getitem__) if repeated else None,
    }


# --------------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------------


def _validate_ks(ks: Iterable[int]) -> tuple[int, ...]:
    """Reject K values that would silently produce meaningless keys such as ``R@0``."""
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must contain at least one K")
    for k in ks:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"every K in ks must be a positive int, got {k!r}")
    return tuple(int(k) for k in ks)


def _validate_inputs(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor) -> None:
    """Fail early with a message naming the offending shape, instead of a cryptic matmul error."""
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not isinstance(emb, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(emb).__name__}")
        if emb.ndim != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(emb.shape)}")
        if emb.shape[0] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(emb.shape)})")
        bad_rows = (~torch.isfinite(emb.detach())).any(dim=1)  # (N,)
        if bad_rows.any():
            raise ValueError(
                f"{name} holds NaN or inf in {int(bad_rows.sum())} row(s) "
                f"(first: row {int(torch.nonzero(bad_rows)[0])}); their ranks would be meaningless"
            )
    n_img, d_img = image_emb.shape
    n_txt, d_txt = text_emb.shape
    if d_img != d_txt:
        raise ValueError(f"embedding dims differ: image_emb has D={d_img}, text_emb has D={d_txt}")
    if text_to_image.ndim != 1 or text_to_image.shape[0] != n_txt:
        raise ValueError(f"text_to_image must have shape (N_txt,) = ({n_txt},), got {tuple(text_to_image.shape)}")
    if text_to_image.dtype == torch.bool or text_to_image.is_floating_point() or (text_to_image.is_complex()):
        raise ValueError(f"text_to_image must hold integer indices, got dtype {text_to_image.dtype}")
    lo, hi = int(text_to_image.min()), int(text_to_image.max())
    if lo < 0 or hi >= n_img:
        raise ValueError(f"text_to_image indices must be in [0, {n_img - 1}] (N_img={n_img}), got values in [{lo}, {hi}]")
    counts = torch.bincount(text_to_image.to(torch.long).cpu(), minlength=n_img)  # (N_img,)
    n_orphans = int((counts == 0).sum())
    if n_orphans:
        raise ValueError(
            f"{n_orphans} image(s) have no caption in text_to_image; image->text rank is "
            f"undefined for them (first: index {int(torch.nonzero(counts == 0)[0])})"
        )


def _unique_unit_rows(emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Distinct rows (in float32, L2-normalised) and, for every input row, the index of its row.

    Normalising the distinct rows, not every copy, is what makes copies score bit-identically.
    Without copies the rows are returned in their own order with None for the index, which spares
    the scoring loop a column gather per chunk.
    """
    emb = emb.detach().float()
    unique, inverse = torch.unique(emb, dim=0, return_inverse=True)  # (U, D), (N,)
    if unique.shape[0] == emb.shape[0]:
        return F.normalize(emb, dim=-1), None
    return F.normalize(unique, dim=-1), inverse


def _spread(unique: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Rows of `unique` for every original row (see `_unique_unit_rows`)."""
    return unique if index is None else unique[index]


def _score(queries: torch.Tensor, unique: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """(B, N) cosine scores of queries vs every candidate, each distinct candidate scored once."""
    sim = queries @ unique.T  # (B, U)
    return sim if index is None else sim[:, index]


def _rows_per_chunk(n_unique: int, n_candidates: int, chunk_bytes: int) -> int:
    """Query rows whose scores fit in chunk_bytes: a score per distinct candidate, then per candidate
    once spread over copies (the first block alone when there are none)."""
    scores_per_row = n_candidates + (n_unique if n_unique < n_candidates else 0)
    return max(1, chunk_bytes // (_SCORE_BYTES * scores_per_row))


def _text_to_image_ranks(
    txt: torch.Tensor,
    img_unique: torch.Tensor,
    img_of: torch.Tensor | None,
    t2i_idx: torch.Tensor,
    chunk_bytes: int,
) -> QueryRanks:
    """Own image vs all images for every caption, caption chunks at a time."""
    n_txt, n_img = txt.shape[0], len(img_unique if img_of is None else img_of)
    rows = _rows_per_chunk(img_unique.shape[0], n_img, chunk_bytes)
    better = torch.empty(n_txt, dtype=torch.long, device=txt.device)  # (N_txt,)
    tied = torch.empty_like(better)  # (N_txt,)
    own_score = torch.empty(n_txt, dtype=torch.float32, device=txt.device)  # (N_txt,)
    for start in range(0, n_txt, rows):
        end = min(start + rows, n_txt)
        sim = _score(txt[start:end], img_unique, img_of)  # (B, N_img)
        # Own score read from the same matrix, so the comparisons below are exact.
        own = sim.gather(1, t2i_idx[start:end, None])  # (B, 1)
        better[start:end] = (sim > own).sum(dim=1)
        tied[start:end] = (sim == own).sum(dim=1) - 1  # the own image always equals itself
        own_score[start:end] = own[:, 0]
    return QueryRanks(better=better.cpu(), tied=tied.cpu(), tied_own=torch.ones_like(better).cpu(), own_score=own_score.cpu())


def _image_to_text_ranks(
    img: torch.Tensor,
    txt_unique: torch.Tensor,
    txt_of: torch.Tensor | None,
    t2i_idx: torch.Tensor,
    chunk_bytes: int,
) -> QueryRanks:
    """Best own caption vs all captions for every image, image chunks at a time."""
    n_img, n_txt = img.shape[0], len(txt_unique if txt_of is None else txt_of)
    rows = _rows_per_chunk(txt_unique.shape[0], n_txt, chunk_bytes)
    # Captions grouped by image, so a chunk of images owns one contiguous slice of `by_image`.
    by_image = torch.argsort(t2i_idx, stable=True)  # (N_txt,)
    offsets = torch.zeros(n_img + 1, dtype=torch.long, device=img.device)  # (N_img + 1,)
    offsets[1:] = torch.bincount(t2i_idx, minlength=n_img).cumsum(0)
    offsets = offsets.tolist()

    better = torch.empty(n_img, dtype=torch.long, device=img.device)  # (N_img,)
    tied = torch.empty_like(better)  # (N_img,)
    tied_own = torch.empty_like(better)  # (N_img,)
    own_score = torch.empty(n_img, dtype=torch.float32, device=img.device)  # (N_img,)
    for start in range(0, n_img, rows):
        end = min(start + rows, n_img)
        sim = _score(img[start:end], txt_unique, txt_of)  # (B, N_txt)
        cap = by_image[offsets[start] : offsets[end]]  # (C,) captions of this chunk's images
        row = t2i_idx[cap] - start  # (C,) their row in `sim`
        scores = sim[row, cap]  # (C,)
        best = torch.full((end - start,), -torch.inf, dtype=sim.dtype, device=sim.device)  # (B,)
        best = best.scatter_reduce(0, row, scores, reduce="amax", include_self=True)
        at_best = (scores == best[row]).long()  # (C,) own captions tied for the best own score
        n_at_best = torch.zeros_like(better[start:end]).scatter_add(0, row, at_best)  # (B,)
        better[start:end] = (sim > best[:, None]).sum(dim=1)  # no own caption is above its best
        tied[start:end] = (sim == best[:, None]).sum(dim=1) - n_at_best
        tied_own[start:end] = n_at_best
        own_score[start:end] = best
    return QueryRanks(better=better.cpu(), tied=tied.cpu(), tied_own=tied_own.cpu(), own_score=own_score.cpu())


def _summarise_ranks(ranks: QueryRanks, ks: tuple[int, ...]) -> dict[str, float]:
    """R@K (percent) plus mean and median expected rank as plain floats.

    numpy's median is used on purpose: torch.median returns the lower middle value for an even
    count, which biases the reported median rank downwards.
    """
    expected = ranks.expected_rank().numpy()  # (Q,)
    out: dict[str, float] = {f"R@{k}": float(100.0 * np.mean(ranks.hit_probability(k).numpy())) for k in ks}
    out["mean_rank"] = float(np.mean(expected))
    out["median_rank"] = float(np.median(expected))
    return out


# --------------------------------------------------------------------------------------------------
# Label-aware metrics: classes instead of instances
# --------------------------------------------------------------------------------------------------
#
# When many images share a caption (a label-only set: every "circle" image is captioned from the same
# few templates) instance recall says little: the right image ties with every image of its class.
# These functions score classes instead. Scores are cosine similarities; rankings here break exact
# ties by candidate order (stable sort), which is harmless at class level, where a tie between two
# images of the same class changes nothing.


def class_prompt_embedding(
    prompt_emb: torch.Tensor, prompt_class: torch.Tensor | None = None, n_classes: int | None = None
) -> torch.Tensor:
    """Prompt embeddings -> one embedding per class (C, D): the mean of the class's normalised prompt
    embeddings, normalised again (the CLIP paper's prompt ensemble).

    Either (C, T, D), T prompts per class, or (P, D) with `prompt_class` (P,) naming each prompt's class
    in 0..n_classes-1 (classes may have different numbers of prompts)."""
    if prompt_class is None:
        return F.normalize(F.normalize(prompt_emb.float(), dim=-1).mean(dim=1), dim=-1)
    unit = F.normalize(prompt_emb.float(), dim=-1)  # (P, D)
    sums = torch.zeros(n_classes, unit.shape[1], dtype=unit.dtype).index_add_(0, prompt_class, unit)  # (C, D)
    counts = torch.bincount(prompt_class, minlength=n_classes).clamp(min=1).to(unit.dtype)[:, None]  # (C, 1)
    return F.normalize(sums / counts, dim=-1)


def classification_metrics(
    image_emb: torch.Tensor, class_emb: torch.Tensor, image_class: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> tuple[dict[str, float], list[float | None]]:
    """Zero-shot classification: each image is assigned the class whose embedding scores highest.

    Returns ``({"top1": %, "top5": % (only for K <= number of classes), "macro_top1": %}, per-class
    top-1 accuracy in % (None for a class with no image))``. Macro accuracy is the mean over classes
    that have images, so a rare class counts as much as a frequent one.
    """
    image_class = torch.as_tensor(image_class, dtype=torch.long)
    scores = F.normalize(image_emb.float(), dim=-1) @ F.normalize(class_emb.float(), dim=-1).T  # (N, C)
    n_classes = class_emb.shape[0]
    own = scores.gather(1, image_class[:, None])  # (N, 1)
    rank = (scores > own).sum(dim=1)  # (N,) classes strictly above the true one
    out: dict[str, float] = {}
    for k in ks:
        if k <= n_classes:
            out[f"top{k}"] = float(100.0 * (rank < k).double().mean())
    correct = (rank == 0).double()  # (N,)
    per_class: list[float | None] = []
    for c in range(n_classes):
        mine = image_class == c
        per_class.append(float(100.0 * correct[mine].mean()) if mine.any() else None)
    present = [a for a in per_class if a is not None]
    out["macro_top1"] = float(np.mean(present)) if present else 0.0
    return out, per_class


def precision_and_ap_at_k(relevant: torch.Tensor, k: int, total_relevant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q,) precision@K and AP@K from (Q, >=K) 0/1 relevance of each query's ranked list.

    AP@K = 1 / min(K, R) * sum_{i <= K} P@i * rel_i, with R the query's number of relevant
    candidates (queries with R = 0 get AP 0).
    """
    rel = relevant[:, :k].double()  # (Q, K)
    hits = rel.cumsum(dim=1)  # (Q, K)
    positions = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)  # (K,)
    precision = hits[:, -1] / k
    denom = torch.clamp(torch.minimum(total_relevant.double(), torch.tensor(float(k))), min=1.0)
    ap = (hits / positions * rel).sum(dim=1) / denom
    return precision, torch.where(total_relevant > 0, ap, torch.zeros_like(ap))


def class_retrieval_metrics(
    query_emb: torch.Tensor,
    query_class: torch.Tensor,
    image_emb: torch.Tensor,
    image_class: torch.Tensor,
    ks: Sequence[int] = (1, 10),
) -> dict[str, float]:
    """Class-level retrieval in percent: a retrieved image is relevant when it has the query's class.

    ``t2i_P@K`` / ``t2i_mAP@K``: text queries (one per class prompt) against all images.
    ``i2i_P@K``: every image as a query against the other images (itself excluded).
    K larger than the candidate count is cut to it.
    """
    query_class = torch.as_tensor(query_class, dtype=torch.long)
    image_class = torch.as_tensor(image_class, dtype=torch.long)
    img = F.normalize(image_emb.float(), dim=-1)  # (N, D)
    txt = F.normalize(query_emb.float(), dim=-1)  # (Q, D)
    n = img.shape[0]
    order = torch.argsort(txt @ img.T, dim=1, descending=True, stable=True)  # (Q, N)
    relevant = image_class[order] == query_class[:, None]  # (Q, N)
    per_class = torch.bincount(image_class, minlength=int(max(image_class.max(), query_class.max())) + 1)
    out: dict[str, float] = {}
    for k in ks:
        kk = min(k, n)
        precision, ap = precision_and_ap_at_k(relevant, kk, per_class[query_class])
        out[f"t2i_P@{k}"] = float(100.0 * precision.mean())
        out[f"t2i_mAP@{k}"] = float(100.0 * ap.mean())
    if n > 1:
        sim = img @ img.T  # (N, N)
        sim.fill_diagonal_(-torch.inf)  # never retrieve the query itself
        order = torch.argsort(sim, dim=1, descending=True, stable=True)[:, : n - 1]  # (N, N-1)
        same = image_class[order] == image_class[:, None]  # (N, N-1)
        for k in ks:
            kk = min(k, n - 1)
            out[f"i2i_P@{k}"] = float(100.0 * same[:, :kk].double().mean())
    return out


def per_class_t2i_recall(t2i: QueryRanks, caption_class: torch.Tensor, n_classes: int, k: int = 1) -> list[float | None]:
    """Text->image R@K in percent over the captions of each class's images (None for an absent class)."""
    hit = t2i.hit_probability(k)  # (N_txt,)
    caption_class = torch.as_tensor(caption_class, dtype=torch.long)
    out: list[float | None] = []
    for c in range(n_classes):
        mine = caption_class == c
        out.append(float(100.0 * hit[mine].mean()) if mine.any() else None)
    return out


def group_means(values: dict[str, float | None], groups: dict[str, str]) -> dict[str, float]:
    """Mean of per-class values within head / medium / tail (classes without a value left out)."""
    out = {}
    for group in ("head", "medium", "tail"):
        present = [v for c, v in values.items() if groups.get(c) == group and v is not None]
        if present:
            out[group] = float(np.mean(present))
    return out


# report.py is the home of these two; re-exported so `from finetune.evaluation.metrics import ...` keeps working.
from finetune.evaluation.report import format_results_table, write_results  # noqa: E402
