"""Typed batches: one small struct per batch kind, its arrays annotated with their shapes.

A batch is a frozen dataclass whose fields are the arrays :func:`jaxalign.data.collate` builds (None: absent
for this dataset), readable as a mapping (``batch["input_ids"]``, ``batch.get("segment_ids")``,
``"ref_logps" in batch``, ``dict(batch)``), so objectives written against plain dicts run unchanged, and a
JAX pytree of its fields (registered when its first instance is made: importing this module loads no jax),
so ``jax.jit``, sharding and micro-batching see its arrays. Arrays a trainer attached to its dataset
(:meth:`~jaxalign.data.TokenizedDataset.with_values`, e.g. a probe's ``features``) ride in ``extra``.

Dims: ``B`` rows, ``T`` tokens (``P`` for a prompt, ``S`` for a shared-prompt pair row), ``D`` preference
dimensions, ``N`` candidates, ``K`` loss targets of a sequence; the pair axis is explicit (``[B, 2, T]``, index 0
chosen). :meth:`Batch.check` holds every field to its annotation,
dtype and shape, with the dims consistent across fields (jaxtyping); the data loader checks every batch it
yields, and the online trainers every iteration's rows, so a wrong shape is an error naming the field
instead of a broadcast deep inside a loss. (Importing this module loads no jax; jaxtyping's check does.)
"""

import dataclasses
import typing
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
from jaxtyping import Float, Int, jaxtyped

# Host (NumPy) or device (jax.Array): the annotations hold either to its dtype and shape.
A = Any

__all__ = ["Batch", "CandidateBatch", "GroupBatch", "PairBatch", "PromptBatch", "SequenceBatch", "SharedPairBatch",
           "batch_class"]


def _batch_struct(cls):
    """A frozen dataclass (compared by identity: its fields are arrays)."""
    return dataclasses.dataclass(frozen=True, eq=False)(cls)


_PYTREES: set[type] = set()


def _register_pytree(cls: type) -> None:
    if cls not in _PYTREES:
        import jax  # here, not at import: `import jaxalign.data` loads no jax

        names = [field.name for field in dataclasses.fields(cls)]
        jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])
        _PYTREES.add(cls)


class Batch(Mapping):
    """What every batch kind shares: the mapping view, construction from arrays, and the shape check."""

    kind: ClassVar[str] = ""  # the TokenizedDataset kind (or "rollout") this struct carries

    def __post_init__(self):
        _register_pytree(type(self))  # a subclass is a dataclass of arrays: a pytree of its fields

    def __getitem__(self, key: str) -> Any:
        if key != "extra" and key in self._field_names():
            value = getattr(self, key)
            if value is not None:
                return value
        elif key in self.extra:
            return self.extra[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        yield from (name for name in self._field_names() if name != "extra" and getattr(self, name) is not None)
        yield from self.extra

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]):
        """The struct of ``arrays``: its named fields, anything else in ``extra``; a required array that is
        missing is an error naming it."""
        names = set(cls._field_names()) - {"extra"}
        required = [field.name for field in dataclasses.fields(cls)
                    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in arrays]
        if missing:
            raise ValueError(f"{cls.__name__}: missing array(s) {missing}; got {sorted(arrays)}")
        return cls(**{name: arrays[name] for name in arrays if name in names},
                   extra={name: value for name, value in arrays.items() if name not in names})

    def select(self, rows: Any):
        """The same struct with rows ``rows`` (an index array) of every array: a minibatch."""
        return type(self).from_arrays({name: value[rows] for name, value in self.items()})

    def check(self):
        """Hold every array to its annotation (dtype and shape, dims consistent across fields, ``extra`` to the
        leading ``B``); return the batch. Raises ``ValueError`` naming the field, the expected and the actual
        shape."""
        hints = typing.get_type_hints(type(self))
        _check_fields(type(self).__name__, [(name, getattr(self, name), hints[name])
                                            for name in self._field_names() if name != "extra"])
        rows = np.shape(self["input_ids"] if "input_ids" in self else next(iter(self.values())))[0]
        for name, value in self.extra.items():
            if np.shape(value)[:1] != (rows,):
                raise ValueError(f"{type(self).__name__}.extra[{name!r}]: expected {rows} rows (the batch's B), "
                                 f"got shape {tuple(np.shape(value))}")
        return self


def _check_fields(struct: str, fields: list[tuple[str, Any, Any]]) -> None:
    # One jaxtyping dimension context (B, T, ... bind once across all fields); built on first use because
    # jaxtyped() imports jax, which importing jaxalign.data must not.
    global _checker
    if _checker is None:
        _checker = jaxtyped(typechecker=None)(_check_in_context)
    _checker(struct, fields)


_checker = None


def _check_in_context(struct: str, fields: list[tuple[str, Any, Any]]) -> None:
    seen = []
    for name, value, hint in fields:
        if not isinstance(value, hint):
            got = "absent" if value is None else f"{np.dtype(value.dtype).name} {tuple(np.shape(value))}"
            raise ValueError(f"{struct}.{name}: expected {_describe(hint)}, got {got} (consistent with "
                             f"{', '.join(seen) or 'no other field'})")
        if value is not None:
            seen.append(f"{name} {tuple(np.shape(value))}")


def _describe(hint: Any) -> str:
    """``int [B 2 T]`` (or ``... or absent``) from an annotation."""
    args = typing.get_args(hint)
    options = [arg for arg in args if arg is not type(None)] or [hint]
    text = " or ".join(f"{arg.dtype.__name__.lower()} [{arg.dim_str}]" for arg in options)
    return text + (" or absent" if type(None) in args else "")


@_batch_struct
class SequenceBatch(Batch):
    """SFT and unpaired (KTO) batches ``[B, T]``, right-padded; packed rows carry ``segment_ids``."""

    kind = "sft"

    input_ids: Int[A, "B T"]
    attention_mask: Int[A, "B T"]
    positions: Int[A, "B T"]
    loss_mask: Int[A, "B T"]
    example_mask: Int[A, " B"]
    segment_ids: Int[A, "B T"] | None = None
    score: Float[A, "B ..."] | None = None  # [B], or [B, T] in packed rows (each token its sequence's score)
    label: Int[A, " B"] | None = None  # unpaired records: 1 desirable
    source_slots: Int[A, "B K"] | None = None  # compact targets (jaxalign.data.layouts)
    target_slots: Int[A, "B K"] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@_batch_struct
class PromptBatch(Batch):
    """Prompt-only batches ``[B, P]``, left-padded (generation appends on the right)."""

    kind = "prompt"

    input_ids: Int[A, "B P"]
    attention_mask: Int[A, "B P"]
    positions: Int[A, "B P"]
    example_mask: Int[A, " B"]
    difficulty: Float[A, " B"] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@_batch_struct
class PairBatch(Batch):
    """Preference pairs with an explicit pair axis ``[B, 2, T]`` (index 0 chosen, 1 rejected)."""

    kind = "preference"

    input_ids: Int[A, "B 2 T"]
    attention_mask: Int[A, "B 2 T"]
    positions: Int[A, "B 2 T"]
    loss_mask: Int[A, "B 2 T"]
    example_mask: Int[A, " B"]
    margin: Float[A, " B"] | None = None
    ref_logps: Float[A, "B 2"] | None = None  # a DPO reference's summed log-probs (precomputed)
    token_rewards: Float[A, "B 2 T"] | None = None  # LLMDoctor's reward of each token, aligned with input_ids
    source_slots: Int[A, "B 2 K"] | None = None  # compact targets (jaxalign.data.layouts)
    target_slots: Int[A, "B 2 K"] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@_batch_struct
class SharedPairBatch(Batch):
    """Preference pairs with the prompt once: row ``b`` is ``[prompt, chosen, rejected]`` ``[B, S]``.

    ``branch_ids`` 0 / 1 / 2 mark the prompt and the two completions (each sees the prompt and itself, not
    the other), ``positions`` continue from the prompt's end in each completion, and the loss targets of side
    ``p`` are ``target_slots[:, p]`` (0: none), predicted from ``source_slots[:, p]`` (see
    :mod:`jaxalign.data.layouts`). The same pairs as a :class:`PairBatch`, with the prompt's work done once.
    """

    kind = "preference"

    input_ids: Int[A, "B S"]
    attention_mask: Int[A, "B S"]
    positions: Int[A, "B S"]
    branch_ids: Int[A, "B S"]
    source_slots: Int[A, "B 2 K"]
    target_slots: Int[A, "B 2 K"]
    example_mask: Int[A, " B"]
    margin: Float[A, " B"] | None = None
    ref_logps: Float[A, "B 2"] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@_batch_struct
class GroupBatch(Batch):
    """A pair per preference dimension ``[B, D, 2, T]``; ``pair_mask`` 0 where a record has none."""

    kind = "preference_group"

    input_ids: Int[A, "B D 2 T"]
    attention_mask: Int[A, "B D 2 T"]
    positions: Int[A, "B D 2 T"]
    loss_mask: Int[A, "B D 2 T"]
    example_mask: Int[A, " B"]
    pair_mask: Int[A, "B D"]
    margin: Float[A, "B D"] | None = None
    ref_logps: Float[A, "B D 2"] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@_batch_struct
class CandidateBatch(Batch):
    """Best-of-N records ``[B, N, T]``: ``best`` the preferred candidate, ``candidate_mask`` the present ones."""

    kind = "best_of_n"

    input_ids: Int[A, "B N T"]
    attention_mask: Int[A, "B N T"]
    positions: Int[A, "B N T"]
    loss_mask: Int[A, "B N T"]
    example_mask: Int[A, " B"]
    best: Int[A, " B"]
    candidate_mask: Int[A, "B N"]
    ref_logps: Float[A, "B N"] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


_BY_KIND = {"sft": SequenceBatch, "unpaired": SequenceBatch, "prompt": PromptBatch, "preference": PairBatch,
            "preference_group": GroupBatch, "best_of_n": CandidateBatch}


def batch_class(kind: str, *, shared_prompts: bool = False) -> type[Batch]:
    """The struct of a dataset kind's batches (pairs batched with shared prompts: :class:`SharedPairBatch`)."""
    if kind not in _BY_KIND:
        raise ValueError(f"no batch struct for dataset kind {kind!r} (known: {', '.join(_BY_KIND)})")
    if shared_prompts:
        if kind != "preference":
            raise ValueError(f"shared prompts apply to preference pairs, not {kind!r}")
        return SharedPairBatch
    return _BY_KIND[kind]
