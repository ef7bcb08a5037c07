"""Continuous batching: decode slots that requests join and leave between compiled steps (what a server runs).

:class:`Sampler` runs a whole batch from prefill to the last token in one compiled loop; a server cannot wait
for that. :class:`ContinuousEngine` keeps a batch of decode *slots* on the device and advances all of them by
one token per :meth:`~ContinuousEngine.step`. Between steps new prompts are prefilled and written
into free slots (:meth:`~ContinuousEngine.admit`), and a finished row leaves (:meth:`~ContinuousEngine.release`)
without waiting for the others.

The KV cache keeps the rollout engine's layout (``models.KVCache``, per-layer buffers: keys ``[B, K, Dh, S]``,
values ``[B, K, S, Dh]``) and its single write index ``I`` shared by all rows: every step writes every row's new key
at column ``I``. A joining prompt of ``P`` tokens is therefore written at columns ``[I − P, I)`` of its slot:
right-aligned to the shared index, each row's tokens are contiguous and end at ``I``, and attention (causal over
columns, masked by ``valid``; RoPE positions are per row and baked into the keys) sees exactly the row's own
tokens. Two rare relayouts keep that possible, each one copy of the cache:

- when ``I`` reaches the last column, every column before the earliest live row's first token is dropped
  (a left shift) and the cache is resized to what is left plus room to grow: half as much again, at least 32
  columns. Cache lengths are powers of two from 64 up to ``max_model_len + slack``; a row holds at most
  ``max_model_len`` tokens, so at the largest size the shift is at least ``slack``. A decode step reads every
  column of the cache, so a cache sized to the live rows (not to the longest possible request) is what keeps
  a step's attention cheap;
- when a prompt is longer than ``I`` (early on), the live rows shift right to make room (and the cache grows
  when it must).

The batch dimension is bucketed (2, 4, 8, ... up to ``max_batch``; never 1, whose matrix-vector products round
differently from the rest on XLA's CPU backend): the cache grows to the next bucket when a request needs more
slots, and shrinks, compacting the live rows, when they fit a quarter of it. A prompt's cache and first token
never depend on what else is running or is prefilled with it.
A short prompt after a cached head can instead join a decode step (:meth:`~ContinuousEngine.step` with ``join``):
its tokens run in the step's matrix products (``LlamaModel.decode_joining``), so the live rows do not stop for a
prefill call (see :data:`JOIN_COLUMNS`, :meth:`~ContinuousEngine.joinable`).
Compiled programs: one decode step per (batch, cache length) bucket (and top logprobs on/off; a joining step per
(batch ≥ :data:`JOIN_MIN_BATCH`, cache length, head)), one prefill per
(rows, prompt length) bucket, one insert per (batch, cache, prompt) bucket, one relayout per pair of layouts:
none per request. Inserts and relayouts are programs over one buffer (a layer's keys or values, or the rows'
masks), reused for every layer: about 50 ms to compile each where a program over the whole cache took 0.45 s
(SmolLM2-135M, 2 cores), so :meth:`ContinuousEngine.warm_up` compiles every one of them ahead, with the decode
steps: a warm engine compiles nothing while serving.
Prompts of one length bucket that arrive together are prefilled in one call (:meth:`ContinuousEngine.prefill_many`;
about twice the throughput of one at a time on 2 CPU cores), in shapes chosen so that this changes no number.

Prompt heads (:meth:`ContinuousEngine.add_head`; vLLM's prefix caching for a fixed set of prefixes): a server's
chat prompts all begin with the chat template's system prompt (24 of SmolLM2's ~40 prompt tokens). A registered
head is prefilled once; a prompt that begins with it runs only its remaining tokens, attending to the head's
cached keys and values, so it costs about half as much. Whether a prompt uses a head depends on the prompt alone,
never on what ran before, so a request still gives the same tokens alone or in company.

Sampling is :func:`~jaxalign.rollout.sampling.draw` with every setting per row (temperature, top-k,
top-p, min-p, guidance weights), so requests with different settings share a step. Row ``r``'s token ``t``
draws its uniform from ``fold_in(key_r, t)``, ``key_r`` made from the row's seed and sample index inside the
compiled step: a seeded request gives the same tokens whatever runs beside it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import time
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from jaxalign.models import KVCache
from jaxalign.models.cache import KEY_LAYOUT, VALUE_LAYOUT, Joining
from jaxalign.rollout.batching import MIN_LENGTH_BUCKET, bucket
from jaxalign.rollout.engine import _batch_spec, _constrain, _constrain_cache, _split
from jaxalign.rollout.filters import DEFAULT_CANDIDATES
from jaxalign.rollout.params import Filters
from jaxalign.rollout.sampling import draw, draw_one_model

# The smallest batch bucket: a batch of one row runs matrix-vector kernels whose rounding differs from the
# matrix-matrix kernels every larger batch uses, and a request must give the same tokens alone or in company.
MIN_BATCH_BUCKET = 2
# Prefills have at least this many columns (times MIN_BATCH_BUCKET rows: more than 32 rows in every product).
MIN_PREFILL_LENGTH = 24
# A prefill's matrix products need more than this many rows (rows × columns) to run the kernels of any larger
# call: a lone prompt longer than this is prefilled as one row, a shorter one beside a padding row.
MATVEC_ROWS = 32
# The smallest cache length, and the least room a resized cache leaves for new tokens.
MIN_COLUMNS = 64
COLUMN_HEADROOM = 32
# Most prompts per prefill call (the last position's logits then stay a product of at most 32 rows).
MAX_PREFILL_ROWS = 16
# A prompt that continues a cached head by at most this many tokens can join a decode step instead of being
# prefilled on its own (``step(join=...)``): its tokens, left-padded to this many columns, ride in the step's
# matrix products. One width, so each (batch, cache length, head) bucket compiles one joining step. 24 covers a chat
# question of up to 24 tokens after SmolLM2's 24-token head (the load benchmark's take 12 to 21) and keeps the
# products at 56 rows: with 31 rows decoding and 128 cache columns a joining step costs 13 ms more than a plain one
# (123 ms) at 24 columns, 21 ms at 32 (2 CPU cores).
JOIN_COLUMNS = 24
# Prompts join steps of at least this batch bucket: where a prefill would stall many rows (fewer joining programs to
# compile ahead, each about 5 s for SmolLM2-135M on 2 CPU cores).
JOIN_MIN_BATCH = 8
# How many of the most likely tokens a step reports when a row asks for top logprobs (OpenAI's limit).
MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class RowSettings:
    """How one row (one sample of one request) picks its tokens.

    Attributes:
        temperature, top_k, top_p, min_p: as :class:`~jaxalign.rollout.SamplingParams` (0 temperature: greedy).
        seed: the row's random stream, any 64-bit int (sample ``j`` of a request seeded ``s`` draws token ``t``
            from ``fold_in(fold_in(fold_in(key(s mod 2^32), s >> 32), j), t)``).
        sample: ``j`` above.
        weights: guidance weights ``[α, β_1, ..., β_G]`` (None: the base model alone, ``[1, 0, ...]``).
        top_logprobs: how many most likely tokens to report per step (0 to 20).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    sample: int = 0
    weights: tuple[float, ...] | None = None
    top_logprobs: int = 0


class TokenOut(NamedTuple):
    """One generated token of one row.

    ``logprob`` is the base model's log-softmax at the token (what a teacher-forced forward pass gives; for
    guided rows too), ``top`` the ``top_logprobs`` most likely tokens under it as ``(ids, logprobs)``.
    """

    token: int
    logprob: float
    top: tuple[tuple[int, ...], tuple[float, ...]] | None


class Prefilled(NamedTuple):
    """A prompt's KV cache (one cache per model, ``[1, K, Dh, P]`` per layer) and its next-token logits."""

    caches: tuple[KVCache, ...]
    logits: jax.Array  # [M, 1, V]
    length: int  # real prompt tokens
    span: int = 0  # columns from its first real token to the last (``length``, unless a head leaves padding inside)
    reused: int = 0  # tokens read from a cached head instead of computed


class _Head(NamedTuple):
    """A cached prompt head: its tokens and, per model, their keys and values (one row, stacked form, the
    tokens right-aligned in ``width`` columns)."""

    tokens: tuple[int, ...]
    caches: tuple[KVCache, ...]
    width: int


def _uniforms(keys: jax.Array, steps: jax.Array) -> jax.Array:
    """One uniform per row from its seed words ``[low, high, sample]`` and its token index (see RowSettings.seed).

    The keys are made here, inside the compiled step: made eagerly on the host, each costs several JAX dispatches.
    """
    def uniform(words, step):
        key = jax.random.key(words[0])
        for word in (words[1], words[2], step):
            key = jax.random.fold_in(key, word)
        return jax.random.uniform(key)

    return jax.vmap(uniform)(keys, steps)


def _choose(logits: Sequence[jax.Array], weights, filters: Filters, keys, steps, *, candidates: int,
            top_logprobs: int, mesh: Mesh | None = None):
    """Per row: the guided score ``Σ_m w[r, m]·logits_m``, one draw, and the base model's log-probabilities.

    With one model (its weight checked positive on the host) :func:`~jaxalign.rollout.sampling.draw_one_model`
    folds the weight into the temperature and reuses the draw's normaliser for the log-probabilities.

    On a mesh the logits are gathered whole per row first (the LM head leaves them split over ``tensor`` by
    vocabulary, and XLA's CPU compiler aborts on a top-k partitioned along its sorted axis), and the filters search
    their rows in place (``compact_rows``: gathering rows by traced indices would move them between devices)."""
    logits = [_constrain(m, mesh, _batch_spec(mesh, 2)) for m in logits]
    base = logits[0].astype(jnp.float32)
    uniforms = _uniforms(keys, steps)
    if len(logits) == 1:
        drawn, log_normaliser = draw_one_model(base, weights[:, 0], uniforms, filters, candidates=candidates,
                                               compact_rows=mesh is None)
    else:
        scores = sum(weights[:, m, None] * logits[m].astype(jnp.float32) for m in range(len(logits)))
        drawn = draw(scores, uniforms, filters, candidates=candidates, compact_rows=mesh is None)
        log_normaliser = jax.nn.logsumexp(base, axis=-1)
    token = drawn.tokens
    logprob = jnp.take_along_axis(base, token[:, None], axis=-1)[:, 0] - log_normaliser
    if top_logprobs:
        top_values, top_ids = jax.lax.top_k(base, top_logprobs)
        return token, logprob, top_ids, top_values - log_normaliser[:, None]
    return token, logprob, None, None


def _pin(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    """One part of a cache in its place on ``mesh`` (None: as it is), by rank: the write index replicated, the rows'
    masks and positions split over the data axes, a per-layer buffer ``[B, K, ., .]`` also its kv heads over
    ``tensor`` (as :func:`~jaxalign.rollout.engine._constrain_cache` places whole caches).

    Every program that writes a cache pins what it returns, so a cache's sharding never depends on the programs it
    went through: the next program then meets the argument shardings it was compiled for and compiles nothing."""
    if mesh is None:
        return x
    if x.ndim == 4:
        return _constrain(x, mesh, PartitionSpec(_batch_spec(mesh, 1)[0], "tensor", None, None))
    return _constrain(x, mesh, PartitionSpec() if x.ndim == 0 else _batch_spec(mesh, x.ndim))


def _pin_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    if mesh is None:
        return cache
    return dataclasses.replace(_constrain_cache(cache, mesh), index=_pin(cache.index, mesh))


@functools.partial(jax.jit, static_argnames=("graphdefs", "mesh"))
def _prefill(states, heads, tokens, mask, *, graphdefs, mesh):
    """Prefill left-padded prompts ``[n, P]`` in every model, after each model's cached head (``heads``: None,
    or per model a one-row stacked cache every prompt continues): per-layer cache rows and last logits
    ``[M, n, V]``."""
    caches, logits = [], []
    for m, (graphdef, state) in enumerate(zip(graphdefs, states, strict=True)):
        model = nnx.merge(graphdef, *state)
        rows, length = tokens.shape
        if heads is None:
            cache = KVCache.init(model.config, batch_size=rows, max_length=length)
        else:  # the head's columns first (every row the same), then room for the prompt's own tokens
            head = heads[m]

            def widen(buffer, axis, rows=rows, length=length):
                shape = list(buffer.shape)
                shape[axis - 1] = rows
                pad = [(0, 0)] * buffer.ndim
                pad[axis] = (0, length)
                return jnp.pad(jnp.broadcast_to(buffer, shape), pad)

            cache = dataclasses.replace(head, keys=widen(head.keys, 2), values=widen(head.values, 2),
                                        valid=widen(head.valid, 1),
                                        next_position=jnp.broadcast_to(head.next_position, (rows,)))
        hidden, cache = model.hidden_states(tokens, attention_mask=mask, cache=cache)
        caches.append(_pin_cache(cache.per_layer(), mesh))
        last = hidden[:, -1]
        if rows < MIN_BATCH_BUCKET:  # the LM head as a matrix product even for one prompt (see MATVEC_ROWS)
            last = jnp.pad(last, ((0, MIN_BATCH_BUCKET - rows), (0, 0)))
        logits.append(model.logits(last)[:rows])
    return tuple(caches), jnp.stack(logits)


@functools.partial(jax.jit, static_argnames=("candidates", "top_logprobs", "mesh"))
def _first_tokens(logits, weights, filters, keys, steps, *, candidates, top_logprobs, mesh):
    """The first token of ``R`` rows that share one prompt's prefill logits ``[M, 1, V]``."""
    rows = weights.shape[0]
    return _choose([jnp.repeat(m, rows, axis=0) for m in logits], weights, filters, keys, steps,
                   candidates=candidates, top_logprobs=top_logprobs, mesh=mesh)


@functools.partial(jax.jit, donate_argnums=(1,), static_argnames=("graphdefs", "candidates", "top_logprobs", "mesh"))
def _decode(states, caches, fed, real, weights, filters, keys, steps, *, graphdefs, candidates, top_logprobs, mesh):
    """One token for every slot: feed ``fed [B]`` (``real`` false on empty slots) to every model, then choose."""
    new_caches, logits = [], []
    for graphdef, state, cache in zip(graphdefs, states, caches, strict=True):
        model = nnx.merge(graphdef, *state)
        hidden, cache = model.hidden_states(fed[:, None], attention_mask=real[:, None], cache=cache)
        new_caches.append(_pin_cache(cache, mesh))
        logits.append(model.logits(hidden[:, -1]))
    return tuple(new_caches), _choose(logits, weights, filters, keys, steps, candidates=candidates,
                                      top_logprobs=top_logprobs, mesh=mesh)


@functools.partial(jax.jit, donate_argnums=(1,), static_argnames=("graphdefs", "candidates", "top_logprobs", "mesh"))
def _decode_joining(states, caches, fed, real, weights, filters, keys, steps, tokens, mask, slot, heads, *,
                    graphdefs, candidates, top_logprobs, mesh):
    """:func:`_decode` with a prompt ``tokens [1, JOIN_COLUMNS]`` (after each model's cached head ``heads``) run in
    the same step into the free ``slot``, whose first token is drawn from the prompt's logits."""
    new_caches, logits = [], []
    for graphdef, state, cache, head in zip(graphdefs, states, caches, heads, strict=True):
        model = nnx.merge(graphdef, *state)
        hidden, last, cache = model.decode_joining(fed, real, cache, Joining(tokens, mask, slot, head))
        new_caches.append(_pin_cache(cache, mesh))
        both = model.logits(jnp.concatenate([hidden[:, -1], last]))  # the step's rows, then the prompt's
        logits.append(jax.lax.dynamic_update_slice(both[:-1], both[-1:], (slot, 0)))
    return tuple(new_caches), _choose(logits, weights, filters, keys, steps, candidates=candidates,
                                      top_logprobs=top_logprobs, mesh=mesh)


# The cache copies below run one small program per buffer (one layer's keys or values, then the rows' masks and
# positions), not one per whole cache: every layer's keys have one shape and every layer's values another, so two
# compiled programs serve all of them, each compiled in a tenth of the time of a program over all layers. That makes
# it affordable to compile every layout change ahead (warm_up), where a program compiled while serving stalls every
# live row.


@functools.partial(jax.jit, donate_argnums=(0,), static_argnames=("axis", "mesh"))
def _put(buffer, row, slot, start, *, axis, mesh):
    """Write one prompt's buffer ``row`` (one row, ``P`` columns on ``axis``) into ``buffer`` (``B`` rows first, its
    columns on ``axis``) at ``slot``, columns from ``start``."""
    at = [slot] + [0] * (buffer.ndim - 1)
    at[axis] = start
    return _pin(jax.lax.dynamic_update_slice(buffer, row.astype(buffer.dtype), at), mesh)


@functools.partial(jax.jit, donate_argnums=(0, 1), static_argnames=("mesh",))
def _put_row_state(valid, next_position, row_valid, row_next_position, slot, start, *, mesh):
    """The mask and next RoPE position of a prompt written into ``slot`` (its other columns become invalid)."""
    valid_row = jax.lax.dynamic_update_slice(jnp.zeros((1, valid.shape[1]), bool), row_valid, (0, start))
    return (_pin(jax.lax.dynamic_update_slice(valid, valid_row, (slot, 0)), mesh),
            _pin(next_position.at[slot].set(row_next_position[0]), mesh))


def _insert(caches, rows, slot, index, mesh):
    """Write each model's one-row prefill ``rows`` into ``slot``, its ``P`` columns ending at column ``index``."""
    out = []
    for cache, row in zip(caches, rows, strict=True):
        start = np.int32(index - row.max_length)
        keys = tuple(_put(b, n, slot, start, axis=KEY_LAYOUT.slots, mesh=mesh)
                     for b, n in zip(cache.keys, row.keys, strict=True))
        values = tuple(_put(b, n, slot, start, axis=VALUE_LAYOUT.slots, mesh=mesh)
                       for b, n in zip(cache.values, row.values, strict=True))
        valid, next_position = _put_row_state(cache.valid, cache.next_position, row.valid, row.next_position, slot,
                                              start, mesh=mesh)
        out.append(dataclasses.replace(cache, keys=keys, values=values, valid=valid, next_position=next_position))
    return tuple(out)


@functools.partial(jax.jit, static_argnames=("columns", "axis", "mesh"))
def _moved(buffer, taken, shift, *, columns, axis, mesh):
    """Rows ``taken`` of ``buffer`` (``B`` rows first, its columns on ``axis``), its columns moved ``shift`` to the
    left (negative: right), in ``columns`` columns."""
    buffer = jnp.take(buffer, taken, axis=0)
    wide = max(buffer.shape[axis], columns)
    widths = [(0, 0)] * buffer.ndim
    widths[axis] = (0, wide - buffer.shape[axis])
    return _pin(jax.lax.slice_in_dim(jnp.roll(jnp.pad(buffer, widths), -shift, axis=axis), 0, columns, axis=axis), mesh)


@functools.partial(jax.jit, static_argnames=("columns", "mesh"))
def _moved_row_state(valid, next_position, index, sources, shift, *, columns, mesh):
    """The masks, next positions and write index after :func:`_moved`: columns that wrapped around, and empty
    slots (``sources`` −1), are invalid."""
    taken = jnp.clip(sources, 0)
    index = index - shift
    positions = jnp.arange(columns)
    window = (positions < index) & (positions >= jnp.maximum(0, -shift))
    valid = _moved(valid, taken, shift, columns=columns, axis=1, mesh=mesh) & (sources >= 0)[:, None] & window[None]
    next_position = jnp.where(sources >= 0, jnp.take(next_position, taken), 0)
    return _pin(valid, mesh), _pin(next_position, mesh), _pin(index.astype(jnp.int32), mesh)


def _relayout(caches, sources, shift, *, columns, mesh):
    """Slot ``i`` of the result is old slot ``sources[i]`` (−1: empty); columns move ``shift`` to the left
    (negative: right) and the cache gets ``columns`` columns (the caller keeps every live token inside). The
    write index moves with the tokens."""
    taken = np.clip(sources, 0, None)
    out = []
    for cache in caches:
        valid, next_position, index = _moved_row_state(cache.valid, cache.next_position, cache.index, sources,
                                                       shift, columns=columns, mesh=mesh)

        def moved(buffers, layout):
            return tuple(_moved(b, taken, shift, columns=columns, axis=layout.slots, mesh=mesh) for b in buffers)

        out.append(dataclasses.replace(
            cache, keys=moved(cache.keys, KEY_LAYOUT), values=moved(cache.values, VALUE_LAYOUT),
            valid=valid, next_position=next_position, index=index))
    return tuple(out)


@jax.jit
def _split_rows(caches, logits):
    """Each row of a prefill call as a one-row cache per model and its logits ``[M, 1, V]`` (so that writing a
    prompt into the decode cache does not depend on how many prompts were prefilled with it)."""
    rows = logits.shape[1]
    return tuple((tuple(jax.tree.map(lambda x, r=r: x[r:r + 1] if x.ndim else x, cache) for cache in caches),
                  logits[:, r:r + 1]) for r in range(rows))


@functools.partial(jax.jit, static_argnames=("configs", "rows", "length", "dtypes", "mesh"))
def _empty(*, configs, rows, length, dtypes, mesh):
    return tuple(_pin_cache(KVCache.init(config, batch_size=rows, max_length=1, dtype=dtype).per_layer(length), mesh)
                 for config, dtype in zip(configs, dtypes, strict=True))


class _Joining(NamedTuple):
    """A request joining the next step: its row, its prompt's rest after ``head`` as the step runs it, its slot."""

    row_id: Hashable
    settings: RowSettings
    key: np.ndarray
    length: int  # prompt tokens
    head: _Head
    tokens: np.ndarray  # [1, JOIN_COLUMNS], left-padded
    mask: np.ndarray
    slot: int


@dataclasses.dataclass
class _Slot:
    """A live row: who it belongs to, where its tokens start in the cache, and its sampling state."""

    row_id: Hashable
    start: int  # first cache column of its tokens
    length: int  # tokens in the cache, prompt included
    fed: int  # the token the next step feeds
    step: int  # index of the next generated token
    settings: RowSettings
    key: np.ndarray  # uint32 seed words [low, high, sample]


class ContinuousEngine:
    """Decode slots shared by requests that come and go (see the module docstring).

    Example::

        engine = ContinuousEngine(model, max_batch=32, max_model_len=1024)
        first = engine.admit(engine.prefill(prompt_ids), {"req-1": RowSettings(temperature=0)})
        while ...:
            tokens = engine.step()            # {row_id: TokenOut} for every live row
            engine.release("req-1")           # when the caller decides the row is done

    Args:
        model: the base model (a causal LM, as :class:`Sampler` takes).
        guides: guide models sharing its vocabulary (guided decoding; weights per row).
        max_batch: most live rows.
        max_model_len: most tokens of a row, prompt included (the caller stops rows before).
        slack: extra cache columns at the largest cache size; a left shift happens at most once per ``slack``
            steps there (default ``max_model_len // 4``, at least 32).
        length_buckets: prompt-length buckets (default 16, 24, 32, 48, ... as :class:`Sampler`).
        pad_token_id: the id fed to empty slots and written in prompt padding.
        candidates: see :class:`Sampler`.
        mesh: a ``(data, fsdp, tensor)`` mesh, as :class:`Sampler` takes: parameters placed with the training
            rules (``tensor``: Megatron-style model parallelism for a model larger than one device), the caches'
            rows split over ``data`` × ``fsdp`` where the batch bucket divides them and their kv heads over
            ``tensor``. None: the models' own device.
    """

    def __init__(self, model: nnx.Module, *, guides: Sequence[nnx.Module] = (), max_batch: int = 32,
                 max_model_len: int = 1024, slack: int | None = None, length_buckets: Sequence[int] | None = None,
                 pad_token_id: int = 0, candidates: int = DEFAULT_CANDIDATES, mesh: Mesh | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        self.mesh = mesh
        self._members = [_split(m, mesh) for m in (model, *guides)]
        self._joins = all(getattr(m, "supports_joining", False) for m in (model, *guides))
        vocab = self.config.vocab_size
        for index, member in enumerate(self._members[1:]):
            if member.config.vocab_size != vocab:
                raise ValueError(f"guide {index} has {member.config.vocab_size} tokens in its vocabulary, the base "
                                 f"model {vocab}: guided decoding needs one vocabulary")
        longest = min(m.config.max_position_embeddings for m in self._members)
        if max_model_len > longest:
            raise ValueError(f"max_model_len {max_model_len} exceeds the {longest} positions of the model")
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.slack = max(32, max_model_len // 4) if slack is None else slack
        if self.slack < 1:
            raise ValueError(f"slack must be >= 1, got {slack}")
        self.max_columns = max_model_len + self.slack
        self.length_buckets = tuple(length_buckets) if length_buckets else None
        self.pad_token_id = int(pad_token_id)
        self.candidates = candidates
        self._caches: tuple[KVCache, ...] | None = None
        self._rows = 0  # the current batch bucket
        self._columns = 0  # the current cache length
        self._index = 0  # the shared write column (host mirror of every cache's index)
        self._slots: list[_Slot | None] = []
        self._where: dict[Hashable, int] = {}
        self._heads: list[_Head] = []
        self.relayouts = 0  # copies of the cache made so far (growth, shrinking, shifts)
        self.joined = 0  # prompts run inside a decode step so far

    @property
    def config(self):
        """The base model's config."""
        return self._members[0].config

    @property
    def num_guides(self) -> int:
        """Guide models beside the base (0 without guided decoding)."""
        return len(self._members) - 1

    @property
    def live(self) -> int:
        """Rows now decoding."""
        return len(self._where)

    @property
    def free(self) -> int:
        """Decode slots not held by a request: how many more rows can join now."""
        return self.max_batch - self.live

    @property
    def batch_bucket(self) -> int:
        """The batch size the decode step runs at now (one of :meth:`batch_buckets`)."""
        return self._rows

    def length_of(self, row_id: Hashable) -> int:
        """Tokens of the row in the cache (prompt + generated − 1: the last token is not fed yet)."""
        return self._slots[self._where[row_id]].length

    def _batch_bucket(self, rows: int) -> int:
        size = bucket(max(rows, MIN_BATCH_BUCKET), None)
        return min(size, max(self.max_batch, MIN_BATCH_BUCKET))

    # -- prompts in -------------------------------------------------------------------------------------

    def prefill(self, prompt: Sequence[int]) -> Prefilled:
        """Run one prompt through every model (see :meth:`prefill_many`)."""
        return self.prefill_many([prompt])[0]

    def add_head(self, tokens: Sequence[int]) -> None:
        """Cache the keys and values of a prompt head that many prompts begin with (a chat template's system
        prompt): a prompt that starts with it and goes on is then prefilled from where it ends.

        Exact up to float rounding (the head's keys are computed without the rest of the prompt, which causal
        attention never lets them see). A prompt uses the longest head it begins with, whatever else is running.

        Raises:
            ValueError: the head is no valid prompt (see :meth:`check_prompt`), or leaves no room to go on.
        """
        tokens = tuple(self.check_prompt(tokens))
        if any(head.tokens == tokens for head in self._heads):
            return
        width = self.prompt_bucket(len(tokens))
        if width + MIN_PREFILL_LENGTH > self.max_columns:
            raise ValueError(f"a head of {len(tokens)} tokens leaves no room for the prompts that continue it "
                             f"(max_model_len {self.max_model_len})")
        prefilled = self._prefill_group(None, [list(tokens)], width)[0]
        self._heads.append(_Head(tokens, tuple(cache.stacked() for cache in prefilled.caches), width))
        self._heads.sort(key=lambda head: -len(head.tokens))  # the longest match first

    def _head_of(self, prompt: list[int], *, width: int | None = None) -> _Head | None:
        """The longest cached head the prompt continues, if its rest fits ``width`` columns (default: the rest's
        prompt bucket) leaving at most ``slack // 2`` padding columns inside the row (so a row's columns stay within
        its tokens plus half the slack: see ``step``)."""
        for head in self._heads:
            rest = len(prompt) - len(head.tokens)
            if rest > 0 and tuple(prompt[:len(head.tokens)]) == head.tokens:
                columns = self.prompt_bucket(rest) if width is None else width
                if rest <= columns and columns - rest <= self.slack // 2 and head.width + columns <= self.max_columns:
                    return head
        return None

    def prefill_many(self, prompts: Sequence[Sequence[int]]) -> list[Prefilled]:
        """Run prompts through every model, those of one length bucket (and cached head) in one call.

        A call's prompts have at least :data:`MIN_PREFILL_LENGTH` columns and it has at least
        :data:`MIN_BATCH_BUCKET` rows, or one row for a lone prompt of more than :data:`MATVEC_ROWS` columns (half
        the work; its last position still meets the LM head beside a padding row), so its matrix products always
        have more than 32 rows: XLA's CPU backend then picks the same kind of kernels whatever the number of
        prompts, and a prompt's cache and first token depend on which prompts were prefilled with it only by
        rounding (SmolLM2-135M: bit for bit on some CPUs, within 1e-4 on others; the tests' tiny models within
        about 1e-6).

        Raises:
            ValueError: an empty prompt, one of ``max_model_len`` tokens or more, or a token outside the vocabulary.
        """
        checked = [self.check_prompt(prompt) for prompt in prompts]
        groups: dict[tuple[int, int], list[int]] = {}
        heads = [self._head_of(prompt) for prompt in checked]
        for index, (prompt, head) in enumerate(zip(checked, heads, strict=True)):
            rest = len(prompt) - (0 if head is None else len(head.tokens))
            groups.setdefault((-1 if head is None else self._heads.index(head), self.prompt_bucket(rest)),
                              []).append(index)
        out: list[Prefilled | None] = [None] * len(checked)
        for (head_index, length), members in groups.items():
            head = None if head_index < 0 else self._heads[head_index]
            for i in range(0, len(members), MAX_PREFILL_ROWS):
                chunk = members[i:i + MAX_PREFILL_ROWS]
                for index, prefilled in zip(chunk, self._prefill_group(head, [checked[j] for j in chunk], length),
                                            strict=True):
                    out[index] = prefilled
        return out

    def _prefill_group(self, head: _Head | None, prompts: list[list[int]], length: int) -> list[Prefilled]:
        """One prefill call: ``prompts`` (each beginning with ``head``'s tokens, if any) left-padded to ``length``
        columns after the head's."""
        skip = 0 if head is None else len(head.tokens)
        rows = bucket(max(len(prompts), 1 if length > MATVEC_ROWS else MIN_BATCH_BUCKET), None)
        tokens = np.full((rows, length), self.pad_token_id, np.int32)
        mask = np.zeros((rows, length), np.int32)
        for row, prompt in enumerate(prompts):
            rest = prompt[skip:]
            tokens[row, length - len(rest):] = rest
            mask[row, length - len(rest):] = 1
        caches, logits = _prefill(tuple(m.states[0] for m in self._members), None if head is None else head.caches,
                                  tokens, mask, graphdefs=tuple(m.graphdefs[0] for m in self._members), mesh=self.mesh)
        # With a head, a row's columns run from the head's first token to the end, padding inside included.
        return [Prefilled(row_caches, row_logits, len(prompt), len(prompt) if head is None else skip + length, skip)
                for (row_caches, row_logits), prompt in zip(_split_rows(caches, logits), prompts, strict=False)]

    def prompt_bucket(self, length: int) -> int:
        """Columns a prompt of ``length`` tokens is prefilled in."""
        size = bucket(max(length, MIN_PREFILL_LENGTH), self.length_buckets, minimum=MIN_LENGTH_BUCKET,
                      half_octaves=True, what="prompt length")
        return min(size, self.max_columns)

    def check_prompt(self, prompt: Sequence[int]) -> list[int]:
        """The prompt as a list of ints, or a ValueError saying why it cannot be prefilled."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; at most {self.max_model_len - 1} fit "
                             f"max_model_len {self.max_model_len} with one generated token")
        vocab = self.config.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise ValueError(f"the prompt has a token id outside the vocabulary of {vocab}")
        return prompt

    def admit(self, prefilled: Prefilled, rows: dict[Hashable, RowSettings]) -> dict[Hashable, TokenOut]:
        """Give every row of ``rows`` (``{row_id: settings}``, e.g. a request's ``n`` samples) a slot holding the
        prefilled prompt, and draw each row's first token.

        Raises:
            ValueError: too few free slots, a row id already live, or guidance weights of the wrong length.
        """
        if len(rows) > self.free:
            raise ValueError(f"{len(rows)} rows need slots but only {self.free} of {self.max_batch} are free")
        for row_id in rows:
            if row_id in self._where:
                raise ValueError(f"row {row_id!r} is already decoding")
        settings_list = list(rows.values())
        keys = np.stack([_row_key(s) for s in settings_list])
        count = len(settings_list)
        padded = self._batch_bucket(count)
        row_arrays = self._row_arrays(settings_list, padded, keys)  # raises on bad settings before any slot changes
        self._ensure_rows(self.live + len(rows))
        width = prefilled.caches[0].max_length
        if not self.live:
            # Nothing to keep: the prompt starts the cache, which shrinks back if a long request left it large.
            self._set_index(width)
            fitting = self._column_bucket(width + COLUMN_HEADROOM)
            if fitting < self._columns:
                self._move(list(range(self._rows)), shift=0, rows=self._rows, columns=fitting)
        elif self._index >= self._columns:
            # A full cache makes room as a step would, by dropping the columns no live row uses: growing it
            # instead would double every later step's attention for nothing.
            self._shift_left()
        index = max(self._index, width)
        needs_room = index + 1 > self._columns and self._columns < self.max_columns
        if index != self._index or needs_room:
            # Room on the left for the prompt (the live rows shift right), and a column for the next step.
            columns = max(self._columns, self._column_bucket(index + COLUMN_HEADROOM))
            self._move(list(range(self._rows)), shift=self._index - index, rows=self._rows, columns=columns)
        free = iter(i for i, slot in enumerate(self._slots) if slot is None)
        for (row_id, settings), key in zip(rows.items(), keys, strict=True):
            slot = next(free)
            self._caches = _insert(self._caches, prefilled.caches, np.int32(slot), self._index, self.mesh)
            self._slots[slot] = _Slot(row_id, self._index - (prefilled.span or prefilled.length), prefilled.length,
                                      self.pad_token_id, 0, settings, key)
            self._where[row_id] = slot
        top = _top_size(settings_list)
        chosen = _first_tokens(prefilled.logits, *row_arrays, np.zeros((padded,), np.int32),
                               candidates=self.candidates, top_logprobs=top, mesh=self.mesh)
        return self._deliver(list(rows), chosen, range(count))

    # -- decoding ---------------------------------------------------------------------------------------

    def joinable(self, prompt: Sequence[int], rows: int = 1) -> int:
        """Whether a request for ``rows`` samples of ``prompt`` can join the next step (``step(join=...)``): the
        tokens of its cached head, or 0.

        A prompt joins when rows are decoding (a batch bucket of :data:`JOIN_MIN_BATCH` or more with it), it is one
        sample, every model can run it inside a step (``supports_joining``: the Llama family), a free slot is left,
        and it continues a cached head by at most
        :data:`JOIN_COLUMNS` tokens (a chat prompt's question; the padding that leaves inside the row within
        ``slack // 2``). Whether a prompt joins depends on the prompt and the load, never changes its tokens beyond
        float rounding.
        """
        if (rows != 1 or not self._where or not self.free or not self._joins
                or self._batch_bucket(self.live + 1) < JOIN_MIN_BATCH):
            return 0
        prompt = [int(t) for t in prompt]
        head = None if len(prompt) >= self.max_model_len else self._head_of(prompt, width=JOIN_COLUMNS)
        return 0 if head is None else len(head.tokens)

    def step(self, join: tuple[Sequence[int], dict[Hashable, RowSettings]] | None = None) -> dict[Hashable, TokenOut]:
        """One token for every live row (``{}`` when none is live and none joins).

        Args:
            join: ``(prompt, {row_id: settings})``, one row: a prompt that :meth:`joinable` accepts, run inside this
                step into a free slot (its tokens share the step's matrix products, so the live rows do not stop
                for its prefill); the result then also holds the row's first token.

        Raises:
            ValueError: a live row already holds ``max_model_len`` tokens (the caller must release it); a ``join``
                that cannot join (nothing changes then).
        """
        if not self._where:
            if join is not None:
                raise ValueError("a prompt joins a step of live rows; with none live, prefill and admit it")
            return {}
        full = [s.row_id for s in self._slots if s is not None and s.length + 2 > self.max_model_len]
        if full:
            raise ValueError(f"row {full[0]!r} has reached max_model_len {self.max_model_len}: release it")
        joining = None if join is None else self.check_join(*join)
        if joining is not None:
            self._ensure_rows(self.live + 1)
        if self._index >= self._columns:
            self._shift_left()
        live = [i for i, s in enumerate(self._slots) if s is not None]
        if joining is not None:
            joining = self._place(joining)
        slots = self._slots
        settings = [s.settings if s is not None else _IDLE for s in slots]
        keys = np.stack([s.key if s is not None else np.zeros((3,), np.uint32) for s in slots])
        fed = np.asarray([s.fed if s is not None else self.pad_token_id for s in slots], np.int32)
        real = np.asarray([s is not None for s in slots])
        steps = np.asarray([s.step if s is not None else 0 for s in slots], np.int32)
        top = _top_size([s.settings for s in slots if s is not None])
        states = tuple(m.states[1] for m in self._members)
        graphdefs = tuple(m.graphdefs[1] for m in self._members)
        row_arrays = self._row_arrays(settings, self._rows, keys)
        if joining is None:
            self._caches, chosen = _decode(states, self._caches, fed, real, *row_arrays, steps, graphdefs=graphdefs,
                                           candidates=self.candidates, top_logprobs=top, mesh=self.mesh)
        else:
            real[joining.slot] = False  # its step token is padding: the slot holds the prompt after the step
            try:
                self._caches, chosen = _decode_joining(
                    states, self._caches, fed, real, *row_arrays, steps, joining.tokens, joining.mask,
                    np.int32(joining.slot), joining.head.caches, graphdefs=graphdefs, candidates=self.candidates,
                    top_logprobs=top, mesh=self.mesh)
            except Exception:  # the row never started: free its slot, so no dead row stays live
                self.release(joining.row_id)
                raise
            self.joined += 1
        self._index += 1
        for i in live:
            slots[i].length += 1
        delivered = live if joining is None else sorted([*live, joining.slot])
        return self._deliver([slots[i].row_id for i in delivered], chosen, delivered)

    def release(self, row_id: Hashable) -> None:
        """Free the row's slot (unknown ids are ignored: a row may finish and be cancelled at once)."""
        slot = self._where.pop(row_id, None)
        if slot is not None:
            self._slots[slot] = None
        if self._rows > MIN_BATCH_BUCKET and self._batch_bucket(self.live) * 4 <= self._rows:
            live = [i for i, s in enumerate(self._slots) if s is not None]
            self._move(live, shift=0, rows=self._batch_bucket(len(live)))

    def replace_model(self, model: nnx.Module) -> None:
        """Decode with ``model``'s weights from now on (a retrained version of the base model; guides stay).

        Only while no row is live: their caches hold the old weights' keys and values (cached heads are prefilled
        again with the new weights). ``model`` must have the
        base model's structure (same config, no adapters: export LoRA runs merged), so every compiled program
        stays valid and nothing recompiles.

        Raises:
            RuntimeError: rows are live.
            ValueError: ``model`` differs in structure or config.
        """
        if self._where:
            raise RuntimeError(f"replace_model needs an idle engine; {len(self._where)} row(s) are live")
        member = _split(model, self.mesh)
        current = self._members[0]
        if member.config != current.config or member.graphdefs != current.graphdefs:
            raise ValueError("replace_model needs a model of the served structure (same config, no LoRA adapters); "
                             f"got {type(model).__name__} with {member.config}")
        self._members[0] = member
        heads, self._heads = self._heads, []
        for head in heads:  # their keys and values came from the old weights
            self.add_head(head.tokens)

    # -- compiling ahead ---------------------------------------------------------------------------------

    def batch_buckets(self) -> list[int]:
        """Every batch size the decode step runs at: 2, 4, 8, ... and ``max_batch``."""
        sizes, size = [], MIN_BATCH_BUCKET
        while size < self.max_batch:
            sizes.append(size)
            size *= 2
        return [*sizes, self._batch_bucket(self.max_batch)]

    def column_buckets(self) -> list[int]:
        """Every cache length: powers of two from :data:`MIN_COLUMNS`, then ``max_columns``."""
        sizes, size = [], MIN_COLUMNS
        while size < self.max_columns:
            sizes.append(size)
            size *= 2
        return [*sizes, self.max_columns]

    def warm_up(self, *, progress=None, prompt_lengths: Sequence[int] = (24, 32, 48, 64),
                head_lengths: Sequence[int] = (24, 32)) -> float:
        """Compile what serving runs, so no request waits for XLA (a program compiled while serving stalls every
        live row): the decode step of every (batch, cache length) bucket, and the joining step after every cached
        head where prompts may join (``step(join=...)``); every relayout between them (the batch
        growing or shrinking at any cache length, the cache resized or shifted at any batch); and for prompts of
        the length buckets of ``prompt_lengths`` (and, after each cached head, of ``head_lengths``) the prefill of
        every group size and the insert into every cache layout that fits them. Returns the seconds it took. Left
        to first use: longer prompts, the decode step with top logprobs, the first tokens of ``n > 1`` requests.

        Runs each program once on empty caches (no live row is touched; call it before admitting any).
        ``progress``: a text stream (e.g. ``sys.stderr``) for a progress bar, one step per shape compiled.
        """
        if self.live:
            raise ValueError("warm_up() runs before any row is admitted")
        started = time.perf_counter()
        shapes = {(-1, self.prompt_bucket(n)) for n in prompt_lengths if n < self.max_model_len}
        shapes |= {(h, self.prompt_bucket(n)) for h, head in enumerate(self._heads) for n in head_lengths
                   if head.width + self.prompt_bucket(n) <= self.max_columns}
        groups = [g for g in (1, *self.batch_buckets()) if g <= MAX_PREFILL_ROWS]
        batches, lengths = self.batch_buckets(), self.column_buckets()
        combos = [(rows, columns) for rows in batches for columns in lengths]
        with tqdm(total=len(shapes) * len(groups) + len(combos), desc="compiling serving shapes", unit="shape",
                  file=progress, disable=progress is None, dynamic_ncols=True) as bar:
            self._warm_up(bar, shapes, groups, batches, lengths, combos)
        return time.perf_counter() - started

    def _warm_up(self, bar, shapes, groups, batches, lengths, combos) -> None:
        prefilled = {}
        for h, length in sorted(shapes):
            head = None if h < 0 else self._heads[h]
            prompt = [*(head.tokens if head else ()), *[self.pad_token_id] * length]
            for group in groups:
                bar.set_postfix_str(f"prefill {group} x {length}", refresh=False)
                first = self._prefill_group(head, [prompt] * group, length)[0]
                prefilled[first.caches[0].max_length] = first
                bar.update()
        widths = sorted(prefilled)
        if prefilled:  # the first token of a one-sample request (rows padded to MIN_BATCH_BUCKET)
            first = next(iter(prefilled.values()))
            arrays = self._row_arrays([_IDLE], MIN_BATCH_BUCKET, np.zeros((1, 3), np.uint32))
            jax.block_until_ready(_first_tokens(first.logits, *arrays, np.zeros((MIN_BATCH_BUCKET,), np.int32),
                                                candidates=self.candidates, top_logprobs=0, mesh=self.mesh))
        for rows, columns in combos:
            bar.set_postfix_str(f"decode {rows} rows x {columns} columns", refresh=False)
            caches = self._empty_caches(rows, columns)
            weights, filters, keys = self._row_arrays([_IDLE] * rows, rows, np.zeros((0, 3), np.uint32))
            caches, out = _decode(tuple(m.states[1] for m in self._members), caches, np.zeros((rows,), np.int32),
                                  np.zeros((rows,), bool), weights, filters, keys, np.zeros((rows,), np.int32),
                                  graphdefs=tuple(m.graphdefs[1] for m in self._members),
                                  candidates=self.candidates, top_logprobs=0, mesh=self.mesh)
            jax.block_until_ready(out)
            if self._joins and rows >= JOIN_MIN_BATCH:  # a prompt joining this step, after each head that fits
                for head in (h for h in self._heads if h.width + JOIN_COLUMNS <= columns):
                    tokens = np.full((1, JOIN_COLUMNS), self.pad_token_id, np.int32)
                    caches, out = _decode_joining(
                        tuple(m.states[1] for m in self._members), caches, np.zeros((rows,), np.int32),
                        np.zeros((rows,), bool), weights, filters, keys, np.zeros((rows,), np.int32), tokens,
                        np.zeros_like(tokens), np.int32(0), head.caches,
                        graphdefs=tuple(m.graphdefs[1] for m in self._members), candidates=self.candidates,
                        top_logprobs=0, mesh=self.mesh)
                    jax.block_until_ready(out)
            for width in (w for w in widths if w < columns):
                caches = _insert(caches, prefilled[width].caches, np.int32(0), width, self.mesh)
            moves = [(other, columns) for other in batches if other != rows] + [(rows, other) for other in lengths]
            for new_rows, new_columns in moves:
                jax.block_until_ready(_relayout(caches, np.full((new_rows,), -1, np.int32), np.int32(0),
                                                columns=new_columns, mesh=self.mesh))
            del caches
            return_freed_memory()
            bar.update()

    # -- internals --------------------------------------------------------------------------------------

    def _weights(self, settings: RowSettings) -> np.ndarray:
        members = len(self._members)
        if settings.weights is None:
            return np.asarray([1.0] + [0.0] * (members - 1), np.float32)
        if len(settings.weights) != members:
            raise ValueError(f"guidance weights {settings.weights} need {members} values (the base model's and "
                             f"one per guide)")
        weights = np.asarray(settings.weights, np.float32)
        # Checked as the float32 the step divides by (1e-50 would pass as a Python float and divide by 0).
        if members == 1 and not (weights[0] > 0 and np.isfinite(weights[0])):
            raise ValueError(f"the weight {settings.weights[0]} of a model without guides must be a positive finite "
                             f"float32: it divides the temperature")
        return weights

    def _row_arrays(self, settings: Sequence[RowSettings], rows: int, keys: np.ndarray):
        """``(weights [R, M], Filters of [R] arrays, seed words [R, 3])`` padded to ``rows`` with greedy dummies."""
        settings = list(settings) + [_IDLE] * (rows - len(settings))
        keys = np.concatenate([keys, np.zeros((rows - len(keys), 3), np.uint32)])
        vocab = self.config.vocab_size  # a top-k beyond the vocabulary keeps everything, as top_k = 0 does
        filters = Filters(temperature=np.asarray([s.temperature for s in settings], np.float32),
                          top_k=np.asarray([min(s.top_k, vocab) for s in settings], np.int32),
                          top_p=np.asarray([s.top_p for s in settings], np.float32),
                          min_p=np.asarray([s.min_p for s in settings], np.float32))
        return np.stack([self._weights(s) for s in settings]), filters, keys

    def _deliver(self, row_ids, chosen, slots) -> dict[Hashable, TokenOut]:
        tokens, logprobs, top_ids, top_values = jax.device_get(chosen)
        out = {}
        for row_id, i in zip(row_ids, slots, strict=True):
            slot = self._slots[self._where[row_id]]
            k = slot.settings.top_logprobs
            top = None if not k else (tuple(int(t) for t in top_ids[i, :k]),
                                      tuple(float(v) for v in top_values[i, :k]))
            out[row_id] = TokenOut(int(tokens[i]), float(logprobs[i]), top)
            slot.fed = int(tokens[i])
            slot.step += 1
        return out

    def _column_bucket(self, needed: int) -> int:
        """Cache lengths are powers of two from :data:`MIN_COLUMNS` up, then ``max_columns``."""
        return min(bucket(needed, None, minimum=MIN_COLUMNS), self.max_columns)

    def _ensure_rows(self, needed: int) -> None:
        if self._caches is None:
            self._rows = self._batch_bucket(needed)
            self._columns = self._column_bucket(MIN_COLUMNS)
            self._caches = self._empty_caches(self._rows, self._columns)
            self._slots = [None] * self._rows
            self._index = 0
        elif needed > self._rows:
            self._move(list(range(self._rows)), shift=0, rows=self._batch_bucket(needed))

    def _empty_caches(self, rows: int, columns: int) -> tuple[KVCache, ...]:
        """Empty caches committed to the models' device, as every program's outputs are (an uncommitted array is
        another argument signature to jit: the next decode step would compile again)."""
        caches = _empty(configs=tuple(m.config for m in self._members), rows=rows, length=columns,
                        dtypes=tuple(str(m.config.compute_jnp_dtype) for m in self._members), mesh=self.mesh)
        return caches if self.mesh is not None else jax.device_put(caches, self._device)  # on a mesh: pinned

    @property
    def _device(self):
        """Where host values go: the models' device, or replicated over the mesh."""
        if self.mesh is not None:
            return NamedSharding(self.mesh, PartitionSpec())
        return next(iter(jax.tree.leaves(self._members[0].states[1])[0].devices()))

    def check_join(self, prompt: Sequence[int], rows: dict[Hashable, RowSettings]) -> _Joining:
        """The request as a step runs it, or a ValueError saying why it cannot join (nothing changes either way)."""
        prompt = self.check_prompt(prompt)
        if len(rows) != 1:
            raise ValueError(f"a joining request has one row, got {len(rows)}")
        (row_id, settings), = rows.items()
        if row_id in self._where:
            raise ValueError(f"row {row_id!r} is already decoding")
        if not self.joinable(prompt, 1):
            raise ValueError("this prompt cannot join a step (see ContinuousEngine.joinable): prefill and admit it")
        key = _row_key(settings)
        self._row_arrays([settings], MIN_BATCH_BUCKET, key[None])  # raises on bad settings
        head = self._head_of(prompt, width=JOIN_COLUMNS)
        rest = prompt[len(head.tokens):]
        tokens = np.full((1, JOIN_COLUMNS), self.pad_token_id, np.int32)
        mask = np.zeros((1, JOIN_COLUMNS), np.int32)
        tokens[0, JOIN_COLUMNS - len(rest):] = rest
        mask[0, JOIN_COLUMNS - len(rest):] = 1
        return _Joining(row_id, settings, key, len(prompt), head, tokens, mask, -1)

    def _place(self, joining: _Joining) -> _Joining:
        """Make room left of the write column for the joining row's head and prompt (the live rows shift right
        when it is short), and give the row the first free slot."""
        # The head's buffer (its tokens right-aligned in head.width columns) is written whole, so the write column
        # needs head.width + JOIN_COLUMNS - 1 columns on its left; the row starts at the head's first token (the
        # columns before it are padding, invalid, which a left shift may drop).
        index = max(self._index, joining.head.width + JOIN_COLUMNS - 1)
        if index != self._index or index >= self._columns:
            columns = max(self._columns, self._column_bucket(index + COLUMN_HEADROOM))
            self._move(list(range(self._rows)), shift=self._index - index, rows=self._rows, columns=columns)
        slot = next(i for i, s in enumerate(self._slots) if s is None)
        start = self._index + 1 - (len(joining.head.tokens) + JOIN_COLUMNS)
        self._slots[slot] = _Slot(joining.row_id, start, joining.length, self.pad_token_id, 0, joining.settings,
                                  joining.key)
        self._where[joining.row_id] = slot
        return joining._replace(slot=slot)

    def _shift_left(self) -> None:
        """Drop the columns before the earliest live token, and size the cache for what is left plus room to grow
        (at most max_columns, where the shift is at least ``slack``)."""
        earliest = min(s.start for s in self._slots if s is not None)
        span = self._index - earliest
        columns = self._column_bucket(span + max(COLUMN_HEADROOM, span // 2))
        self._move(list(range(self._rows)), shift=earliest, rows=self._rows, columns=columns)

    def _set_index(self, index: int) -> None:
        # One array per model: the decode step donates every cache, and a buffer cannot be donated twice.
        self._caches = tuple(dataclasses.replace(c, index=jax.device_put(np.int32(index), self._device))
                             for c in self._caches)
        self._index = index

    def _move(self, sources: list[int], *, shift: int, rows: int, columns: int | None = None) -> None:
        """Relayout: slot ``i`` becomes old slot ``sources[i]``; columns shift left by ``shift``; the cache gets
        ``columns`` columns (default: as now)."""
        columns = self._columns if columns is None else columns
        padded = np.full((rows,), -1, np.int32)  # one program per (old, new) bucket, whatever the count
        padded[:len(sources)] = sources
        self._caches = _relayout(self._caches, padded, np.int32(shift), columns=columns, mesh=self.mesh)
        self._columns = columns
        self.relayouts += 1
        self._index -= shift
        old = self._slots
        self._slots = [old[s] if s >= 0 else None for s in sources] + [None] * (rows - len(sources))
        self._rows = rows
        self._where = {}
        for i, slot in enumerate(self._slots):
            if slot is not None:
                slot.start -= shift
                self._where[slot.row_id] = i


def return_freed_memory() -> None:
    """Give the memory XLA has freed back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    XLA's CPU buffers come from malloc, and glibc keeps freed blocks of up to 32 MiB in its heaps for reuse. The
    warm-up runs every (batch, cache length) layout once, each with caches of its own size, and without this
    SmolLM2-135M's ``jaxalign serve --max-batch 32 --max-model-len 512`` ended its warm-up holding 18 GB, all of
    it free (4 GB after one trim; measured on 2 CPU cores)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


# What an empty slot (and a padding row) samples with: greedy, the cheapest draw.
_IDLE = RowSettings(temperature=0.0)


def _row_key(settings: RowSettings) -> np.ndarray:
    """The row's seed words ``[seed mod 2^32, (seed mod 2^64) >> 32, sample]`` (the key is made on the device)."""
    seed = int(settings.seed) % 2**64
    return np.asarray([seed % 2**32, seed >> 32, settings.sample % 2**32], np.uint32)


def _top_size(settings: Sequence[RowSettings]) -> int:
    """0, or :data:`MAX_TOP_LOGPROBS` when some row asks for top logprobs (two programs, not twenty)."""
    return MAX_TOP_LOGPROBS if any(s.top_logprobs for s in settings) else 0
