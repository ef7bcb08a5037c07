"""Dataset mixtures: several sources in one training stream, interleaved by weight, reproducibly.

A mixture epoch, for sources ``s`` with ``N_s`` examples and weights ``w_s``:

1. **Counts.** The epoch has ``N = Σ_s N_s`` examples (as many as the sources hold together). Source ``s``
   contributes ``n_s`` of them, ``N·w_s / Σ w`` rounded by the largest remainder (the remainders' ties go to
   the earlier source), at least 1. A source whose share is above its size is repeated within the epoch; one
   below it is subsampled.
2. **Draws.** Each source has an endless stream of its examples: pass ``p`` over it is a permutation seeded by
   ``(seed, s, p)`` (file order when shuffling is off), and the passes follow each other. Epoch ``e`` takes the
   stream's positions ``[e·n_s, (e + 1)·n_s)``: every example of a source is drawn once before any is drawn
   twice, and a subsampled source continues where the previous epoch stopped.
3. **Interleaving.** The ``k``-th draw of source ``s`` (``k = 0 .. n_s − 1``) is placed at time ``(k + ½) / n_s``;
   the epoch is all draws ordered by time, ties by source order. Every stretch of the epoch therefore holds each
   source within one example of its share (a batch of 8 from weights 3:1 holds 6 and 2), not only the epoch
   as a whole.

Everything is a function of ``(seed, epoch)`` and the sources' sizes and weights, so the loader's
``(epoch, position)`` state resumes a mixture exactly (:class:`~jaxalign.data.loader.BatchIterator`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# What each source's counts hold (build_dataset fills them; the composition table prints them in this order).
COUNT_KEYS = ("read", "duplicates", "too_short", "too_long", "skipped", "examples")


@dataclass(frozen=True)
class SourceSpec:
    """One source of a mixture (``data.sources`` entries).

    Attributes:
        source: a ``.jsonl`` / ``.json`` file (optionally ``.gz``) or a hub dataset name.
        weight: its share of the mixture, relative to the others' (positive; 1 each by default).
        split: the hub split; None: ``data.split``.
        format: its format; None: ``data.format`` (None there too: detected).
    """

    source: str
    weight: float | None = None
    split: str | None = None
    format: str | None = None

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"source must be a file or dataset name, got {self.source!r}")
        if self.weight is not None and (isinstance(self.weight, bool) or not isinstance(self.weight, (int, float))
                                        or not math.isfinite(self.weight) or self.weight <= 0):
            raise ValueError(f"weight must be a positive number, got {self.weight!r}")
        for name in ("split", "format"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")

    @classmethod
    def parse(cls, value: Any, index: int) -> SourceSpec:
        """A ``data.sources`` entry: a file name, or a mapping of :class:`SourceSpec`'s keys."""
        where = f"data.sources[{index}]"
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            value = {"source": value}
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a file name or a mapping {{source, weight, split, format}}, "
                             f"got {value!r}")
        known = ("source", "weight", "split", "format")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} (known: {', '.join(known)})")
        if "source" not in value:
            raise ValueError(f"{where}: missing the key 'source' (the file it reads), got {dict(value)!r}")
        try:
            return cls(**value)
        except ValueError as error:
            raise ValueError(f"{where}.{error}") from None


@dataclass(frozen=True)
class MixtureSource:
    """A source as a dataset remembers it: its name, weight and what loading did (:data:`COUNT_KEYS`)."""

    name: str
    weight: float
    counts: Mapping[str, int] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """The source's name, weight and counts, as the run's metadata records them."""
        return {"source": self.name, "weight": self.weight, **dict(self.counts)}


def allocate(sizes: Sequence[int], weights: Sequence[float]) -> np.ndarray:
    """``[S]`` int: the examples each source contributes to one mixture epoch (module docstring, step 1)."""
    sizes = np.asarray(sizes, np.int64)
    shares = np.asarray(weights, np.float64)
    if sizes.shape != shares.shape or not len(sizes):
        raise ValueError(f"allocate: {len(sizes)} sizes for {len(shares)} weights")
    if (sizes < 1).any() or not (shares > 0).all():
        raise ValueError(f"allocate: sizes and weights must be positive, got {sizes.tolist()} and {shares.tolist()}")
    total = int(sizes.sum())
    exact = shares / shares.sum() * total
    counts = np.floor(exact).astype(np.int64)
    left = total - int(counts.sum())
    by_remainder = np.argsort(-(exact - counts), kind="stable")
    counts[by_remainder[:left]] += 1
    return np.maximum(counts, 1)


def interleave(counts: Sequence[int]) -> np.ndarray:
    """``[Σ counts]`` int: the source of each slot of an epoch (module docstring, step 3)."""
    counts = np.asarray(counts, np.int64)
    sources = np.repeat(np.arange(len(counts)), counts)
    draws = np.concatenate([np.arange(n) for n in counts]) if len(counts) else np.zeros(0, np.int64)
    times = (2 * draws + 1) / (2 * counts[sources])  # correctly rounded: equal fractions give equal floats
    return sources[np.lexsort((sources, times))]


def _pass(size: int, *, seed: int, source: int, number: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(size)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, source, number]))).permutation(size)


def draws(size: int, start: int, count: int, *, seed: int, source: int, shuffle: bool) -> np.ndarray:
    """Positions ``[start, start + count)`` of a source's stream of passes (module docstring, step 2)."""
    first, last = start // size, (start + count - 1) // size
    stream = np.concatenate([_pass(size, seed=seed, source=source, number=p, shuffle=shuffle)
                             for p in range(first, last + 1)])
    offset = start - first * size
    return stream[offset:offset + count]


def mixture_order(source_ids: np.ndarray, weights: Sequence[float], *, seed: int, epoch: int,
                  shuffle: bool = True) -> np.ndarray:
    """The example indices of mixture epoch ``epoch`` (module docstring).

    Args:
        source_ids: ``[N]`` the source of each example of the dataset (``0 .. S − 1``).
        weights: ``[S]`` the sources' weights.
        seed, epoch: what the order is a function of.
        shuffle: False draws each source in its file order.

    Returns:
        ``[Σ n_s]`` int64 indices into the dataset.

    Raises:
        ValueError: a source without examples.
    """
    source_ids = np.asarray(source_ids)
    members = [np.flatnonzero(source_ids == s) for s in range(len(weights))]
    empty = [s for s, m in enumerate(members) if not len(m)]
    if empty:
        raise ValueError(f"mixture: source {empty[0]} has no examples left to draw from")
    counts = allocate([len(m) for m in members], weights)
    slots = interleave(counts)
    order = np.empty(len(slots), np.int64)
    for s, (indices, n) in enumerate(zip(members, counts, strict=True)):
        order[slots == s] = indices[draws(len(indices), epoch * int(n), int(n), seed=seed, source=s, shuffle=shuffle)]
    return order


def composition_table(sources: Sequence[MixtureSource], per_epoch: Sequence[int] | None = None) -> str:
    """The per-source counts as text, one line per source (what ``build_dataset`` logs)."""
    total = sum(s.weight for s in sources)
    lines = []
    for index, source in enumerate(sources):
        counts = dict(source.counts)
        parts = [f"read {counts.get('read', 0)}"]
        parts += [f"{key.replace('_', ' ')} {counts[key]}" for key in ("duplicates", "too_short", "too_long", "skipped")
                  if counts.get(key)]
        line = f"  {source.name}: {', '.join(parts)} -> {counts.get('examples', 0)} examples"
        if len(sources) > 1:
            line += f"; weight {source.weight:g} ({source.weight / total:.1%})"
            if per_epoch is not None and counts.get("examples"):
                line += (f", {per_epoch[index]} per mixture epoch "
                         f"({per_epoch[index] / counts['examples']:.2f} passes)")
        lines.append(line)
    return "\n".join(lines)
