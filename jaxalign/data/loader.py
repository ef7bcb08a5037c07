"""Batches of a tokenised dataset: shuffled by seed, sharded per process, static shapes, resumable.

Every process builds the same global plan: epoch ``e`` visits the examples in the order
``permutation(seed, e)`` (the same on every host), cuts it into global batches of
``batch_size * process_count`` rows, and each process takes its own contiguous ``batch_size`` rows
(process ``p``: rows ``p * batch_size`` to ``(p + 1) * batch_size``). The padded length ``T`` of a batch is
chosen from the whole global batch, so all processes agree on every array shape at every step.

Shapes, so that a jitted step compiles once per shape, not once per batch:

- default: every batch is padded to the dataset's longest sequence (one shape);
- ``buckets=(128, 256, 512)``: the smallest bucket that holds the global batch's longest sequence;
- ``pad_to_multiple_of=64``: that longest length rounded up to a multiple of 64;
- ``pack_length=L`` (SFT only): sequences are packed first-fit, in shuffled order, into rows of exactly
  ``L`` tokens with ``segment_ids`` (see :mod:`jaxalign.data.collate`); a sequence never spans two rows.

A dataset batched with shared prompts (:mod:`jaxalign.data.layouts`) pads its pair rows the same way, from
the rows' lengths (prompt once + both completions); past the largest bucket, to a multiple of it. One batched
with compact targets pads ``K`` (the target slots) by the same rule from its longest completion: by default
the dataset's longest (one shape), else the bucket or multiple that holds the batch's. Packed rows carry no
target slots.

A dataset of several sources (``dataset.mixture``, from ``data.sources``) is visited as a mixture: epoch ``e``'s
order interleaves the sources by weight, each drawn from its own seeded stream (:mod:`jaxalign.data.mixture`
has the algorithm); the batches are cut from that order in the same way.

Position: the iterator's state is ``(epoch, position)``, ``position`` being how many examples of the
epoch's order are consumed; :meth:`BatchIterator.state_dict` returns it (with the seed and the
dataset's fingerprint) as a small JSON-able dict that a checkpoint stores, and
:meth:`BatchIterator.load_state_dict` restores it, mid-epoch included, so the resumed run sees exactly
the batches the uninterrupted one would have. A mixture's order is a function of ``(seed, epoch)`` as well;
its state also records the sources, their sizes and weights (checked on resume) and how far each source's
stream has advanced (``drawn``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxalign.data.batches import Batch, batch_class
from jaxalign.data.collate import collate, collate_packed
from jaxalign.data.mixture import allocate, mixture_order
from jaxalign.data.tokenize import TokenizedDataset


def epoch_order(num_examples: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """``[N]`` the order in which epoch ``epoch`` visits the examples: the same for the same ``(seed, epoch)``."""
    if not shuffle:
        return np.arange(num_examples)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch]))).permutation(num_examples)


def check_batching(*, batch_size: int, num_epochs: int | None = None, buckets: Sequence[int] | None = None,
                   pad_to_multiple_of: int | None = None, pack_length: int | None = None, process_index: int = 0,
                   process_count: int = 1) -> None:
    """Raise ``ValueError`` on batching settings that no dataset could satisfy (see :class:`BatchIterator`)."""
    for name, value in (("batch_size", batch_size), ("process_count", process_count), ("num_epochs", num_epochs),
                        ("pad_to_multiple_of", pad_to_multiple_of), ("pack_length", pack_length)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if sum(x is not None for x in (buckets, pad_to_multiple_of, pack_length)) > 1:
        raise ValueError("choose at most one of buckets, pad_to_multiple_of and pack_length")
    if buckets is not None and (not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1):
        raise ValueError(f"buckets must be ascending positive lengths, got {tuple(buckets)}")


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Iterates over batches (dicts of NumPy arrays, see :mod:`jaxalign.data.collate`) of ``dataset``.

    Args:
        dataset: a :class:`~jaxalign.data.tokenize.TokenizedDataset`.
        batch_size: rows per process (the global batch is ``batch_size * process_count``).
        seed: shuffling seed; epoch ``e`` uses ``(seed, e)``.
        shuffle: False visits the examples in file order every epoch.
        drop_last: leave out an epoch's last, incomplete global batch. When False it is padded with
            all-padding rows (``example_mask`` 0), so shapes stay static.
        num_epochs: stop after this many epochs; None iterates forever.
        buckets: padded lengths to choose from (ascending).
        pad_to_multiple_of: pad to a multiple of this instead.
        pack_length: pack SFT sequences into rows of this many tokens.
        process_index, process_count: this process's index and the number of processes (multi-host).

    Raises:
        ValueError: inconsistent settings, a sequence longer than the largest bucket or ``pack_length``,
            or packing a dataset that is not SFT.
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_epochs: int | None = None,
        buckets: Sequence[int] | None = None,
        pad_to_multiple_of: int | None = None,
        pack_length: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if len(dataset) == 0:
            raise ValueError("BatchIterator: the dataset is empty")
        check_batching(batch_size=batch_size, num_epochs=num_epochs, buckets=buckets,
                       pad_to_multiple_of=pad_to_multiple_of, pack_length=pack_length, process_index=process_index,
                       process_count=process_count)
        longest = int(dataset.lengths.max())
        if buckets is not None:
            buckets = tuple(buckets)
            if buckets[-1] < longest:
                raise ValueError(f"BatchIterator: the longest sequence has {longest} tokens, more than the largest "
                                 f"bucket {buckets[-1]}; raise it or truncate to max_length={buckets[-1]}")
        if pack_length is not None:
            if dataset.kind != "sft":
                raise ValueError(f"BatchIterator: packing applies to SFT datasets, not {dataset.kind!r}")
            if pack_length < longest:
                raise ValueError(f"BatchIterator: the longest sequence has {longest} tokens, more than "
                                 f"pack_length={pack_length}")
        self.dataset, self.longest = dataset, longest
        self.longest_row = int(dataset.row_lengths.max())
        self.most_targets = max(int(dataset.target_counts.max()), 1)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.num_epochs = num_epochs
        self.buckets, self.pad_to_multiple_of, self.pack_length = buckets, pad_to_multiple_of, pack_length
        self.process_index, self.process_count = process_index, process_count
        self.epoch, self.position = 0, 0
        self.source_ids, self.source_counts = self._mixture_plan(dataset)
        self._order: tuple[int, np.ndarray] | None = None

    @staticmethod
    def _mixture_plan(dataset: TokenizedDataset) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(source of each example, examples each source gives an epoch)``, or ``(None, None)`` unmixed."""
        if len(dataset.mixture) < 2:
            return None, None
        names = [source.name for source in dataset.mixture]
        source_ids = np.asarray([example.source for example in dataset.examples], np.int64)
        sizes = np.bincount(source_ids, minlength=len(names)) if source_ids.min() >= 0 else None
        if sizes is None or len(sizes) != len(names):
            raise ValueError(f"BatchIterator: examples name sources outside the mixture's {names}")
        empty = [name for name, size in zip(names, sizes, strict=True) if not size]
        if empty:
            raise ValueError(f"BatchIterator: the mixture source {empty[0]} has no examples left to draw from")
        return source_ids, allocate(sizes, [source.weight for source in dataset.mixture])

    @property
    def epoch_length(self) -> int:
        """Examples one epoch visits: the dataset's, or a mixture epoch's (:mod:`jaxalign.data.mixture`)."""
        return len(self.dataset) if self.source_counts is None else int(self.source_counts.sum())

    @property
    def global_batch_size(self) -> int:
        """Examples per step over all processes: each process's ``batch_size`` times the process count."""
        return self.batch_size * self.process_count

    @property
    def shapes(self) -> tuple[int, ...]:
        """Every padded length ``T`` a batch can have (e.g. to compile each shape ahead of time)."""
        if self.pack_length is not None:
            return (self.pack_length,)
        largest = self.padded_length(self.longest_row)
        if self.buckets is not None:
            return tuple(b for b in self.buckets if b <= largest)
        if self.pad_to_multiple_of is not None:
            return tuple(range(self.pad_to_multiple_of, largest + 1, self.pad_to_multiple_of))
        return (largest,)

    @property
    def steps_per_epoch(self) -> int | None:
        """Batches per epoch (None when packing: it depends on the shuffled order)."""
        if self.pack_length is not None:
            return None
        rounding = math.floor if self.drop_last else math.ceil
        return int(rounding(self.epoch_length / self.global_batch_size))

    def padded_length(self, longest: int, *, default: int | None = None) -> int:
        """The ``T`` of a batch whose longest row has ``longest`` tokens (``default``: the padded size without
        buckets or a multiple, the dataset's longest row)."""
        if self.pack_length is not None:
            return self.pack_length
        if self.buckets is not None:
            fits = [b for b in self.buckets if b >= longest]
            top = self.buckets[-1]  # a shared-prompt row can pass it: whole multiples of it then
            return fits[0] if fits else -(-longest // top) * top
        if self.pad_to_multiple_of is not None:
            return -(-max(longest, 1) // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return self.longest_row if default is None else default

    def order(self, epoch: int) -> np.ndarray:
        """The example indices epoch ``epoch`` visits, in order."""
        if self._order is None or self._order[0] != epoch:
            if self.source_ids is None:
                order = epoch_order(len(self.dataset), seed=self.seed, epoch=epoch, shuffle=self.shuffle)
            else:
                order = mixture_order(self.source_ids, [s.weight for s in self.dataset.mixture], seed=self.seed,
                                      epoch=epoch, shuffle=self.shuffle)
            self._order = (epoch, order)
        return self._order[1]

    def _plan(self, order: np.ndarray, start: int) -> tuple[list, int] | None:
        """``(global rows, next position)`` of the batch starting at ``start``; None when the epoch is done."""
        if self.pack_length is not None:
            return self._packed_plan(order, start)
        end = start + self.global_batch_size
        if start >= len(order) or (end > len(order) and self.drop_last):
            return None
        rows = [int(i) for i in order[start:end]]
        return rows + [None] * (self.global_batch_size - len(rows)), min(end, len(order))

    def _packed_plan(self, order: np.ndarray, start: int) -> tuple[list, int] | None:
        lengths = self.dataset.lengths
        rows: list[list[int]] = []
        space: list[int] = []
        position = start
        while position < len(order):
            index = int(order[position])
            size = int(lengths[index])
            row = next((r for r, free in enumerate(space) if free >= size), None)
            if row is None:
                if len(rows) == self.global_batch_size:
                    break  # the batch is full: this example opens the next one
                rows.append([])
                space.append(self.pack_length)
                row = len(rows) - 1
            rows[row].append(index)
            space[row] -= size
            position += 1
        if position == start or (position == len(order) and self.drop_last):
            return None  # the last batch of an epoch is the incomplete one
        return rows + [[] for _ in range(self.global_batch_size - len(rows))], position

    def __next__(self) -> Batch:
        while True:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                raise StopIteration
            plan = self._plan(self.order(self.epoch), self.position)
            if plan is not None:
                break
            if self.position == 0:
                unit = f"packed rows of {self.pack_length} tokens" if self.pack_length else "rows"
                raise ValueError(f"BatchIterator: {self.epoch_length} examples make no complete global batch of "
                                 f"{self.global_batch_size} {unit}; lower batch_size or set drop_last=False")
            self.epoch, self.position = self.epoch + 1, 0
        rows, self.position = plan
        local = rows[self.process_index * self.batch_size:(self.process_index + 1) * self.batch_size]
        if self.pack_length is not None:
            arrays = collate_packed(self.dataset, local, self.pack_length)
        else:
            present = [i for i in rows if i is not None]
            longest = max((int(self.dataset.row_lengths[i]) for i in present), default=1)
            targets = None
            if self.dataset.share_prompts or self.dataset.compact_targets:
                most = max((int(self.dataset.target_counts[i]) for i in present), default=1)
                targets = self.padded_length(max(most, 1), default=self.most_targets)
            arrays = collate(self.dataset, local, self.padded_length(longest), targets)
        # The kind's typed struct, its shapes checked: a malformed batch is named here, not inside a loss.
        struct = batch_class(self.dataset.kind, shared_prompts=self.dataset.share_prompts)
        return struct.from_arrays(arrays).check()

    def state_dict(self) -> dict[str, Any]:
        """The position as plain values (JSON-able): store it with a checkpoint. A mixture adds ``mixture``:
        its sources, weights and sizes, and how far each source's stream has advanced (:meth:`drawn`)."""
        state = {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                 "fingerprint": self.dataset.fingerprint}
        if self.source_ids is not None:
            state["mixture"] = {**self._mixture_identity(), "drawn": self.drawn()}
        return state

    def _mixture_identity(self) -> dict[str, Any]:
        sizes = np.bincount(self.source_ids, minlength=len(self.dataset.mixture))
        return {"sources": [s.name for s in self.dataset.mixture], "weights": [s.weight for s in self.dataset.mixture],
                "sizes": sizes.tolist()}

    def drawn(self) -> list[int]:
        """How far each mixture source's stream has advanced: its examples in the epochs before this one (an
        epoch's last incomplete batch, dropped with ``drop_last``, included) and in this epoch's order up to the
        position, over every process's rows."""
        consumed = np.bincount(self.source_ids[self.order(self.epoch)[:self.position]],
                               minlength=len(self.source_counts))
        return (self.epoch * self.source_counts + consumed).tolist()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`), which must come from the same data and seed.

        Raises:
            ValueError: another dataset (fingerprint), seed or shuffling, or a position out of range.
        """
        expected = {"seed": self.seed, "shuffle": self.shuffle, "fingerprint": self.dataset.fingerprint}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(f"BatchIterator.load_state_dict: the state's {key} {state.get(key)!r} differs from "
                                 f"this iterator's {value!r}; resuming would visit different batches")
        mixture = None if self.source_ids is None else self._mixture_identity()
        saved = state.get("mixture")
        saved = None if saved is None else {key: saved.get(key) for key in ("sources", "weights", "sizes")}
        if saved != mixture:
            raise ValueError(f"BatchIterator.load_state_dict: the state's mixture {saved} differs from this "
                             f"iterator's {mixture}; resuming would draw different examples")
        if not 0 <= state["position"] <= self.epoch_length or state["epoch"] < 0:
            raise ValueError(f"BatchIterator.load_state_dict: position {state['position']} / epoch {state['epoch']} "
                             f"out of range for {self.epoch_length} examples an epoch")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
