"""Log-probabilities of given tokens under a causal LM, the LM head run over chunks of positions.

The one scorer every method uses: PPO/GRPO score their samples under the policy and the reference, the
offline trainers score dataset completions, and evaluation scores both for KL and perplexity, all through
these two functions, so a log-prob means the same thing in training, in evaluation and in the sampler
(whose ``model_logps`` a test checks against :func:`target_logps`). It lives with the models, which import
nothing of jaxalign: the float32 log-softmax at the targets is therefore spelled here too, the same formula
as :func:`jaxalign.losses.token_logps` (which the losses that take logits use), and a test holds the two
equal.

Only the positions a loss reads need the LM head: :func:`slot_logps` gathers their hidden states into a
compact ``[N, K, D]`` (``K`` static: the batch's longest completion, padded by the data loader) before the head,
so a prompt's positions cost the trunk but not the ``D × V`` projection and its log-softmax.

The full-vocabulary float32 logits are the largest activation of a small model (``T × 49152`` floats a row
for SmolLM2), so the LM head and its log-softmax run on ``chunk_size`` positions at a time under
``jax.checkpoint``: one chunk's ``[N, chunk, V]`` logits are alive at once, in the forward and the backward
pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Float, Int

F32 = jnp.float32

#: Positions per LM-head chunk: [rows, 128, 49152] float32 logits for SmolLM2 (25 MB a row).
DEFAULT_CHUNK = 128


def token_logps(logits: Float[Array, "... V"], targets: Int[Array, "..."]) -> Float[Array, "..."]:
    """``log softmax(logits)[targets]`` in float32: ``z[y] − m − log Σ_v exp(z_v − m)``, ``m`` the row max
    (held constant: its gradient cancels). Out-of-range targets are clipped into the vocabulary: mask them."""
    targets = jnp.clip(jnp.asarray(targets), 0, logits.shape[-1] - 1)
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True).astype(F32))
    log_normaliser = jnp.log(jnp.sum(jnp.exp(logits.astype(F32) - row_max), axis=-1))
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(F32)
    return target_logits - row_max[..., 0] - log_normaliser


def entropy(logits: Float[Array, "... V"]) -> Float[Array, "..."]:
    """Entropy of ``softmax(logits)`` in float32 nats: ``logsumexp(z) − Σ_v p_v z_v`` (a −inf entry adds 0)."""
    logits = logits.astype(F32)
    probs = jax.nn.softmax(logits, axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(probs * jnp.where(probs > 0, logits, 0.0), axis=-1)


def head_logps(model, hidden: Float[Array, "N T D"], targets: Int[Array, "N T"], *,
               chunk_size: int | None = DEFAULT_CHUNK, temperature: float = 1.0, with_entropy: bool = False,
               ) -> Float[Array, "N T"] | tuple[Float[Array, "N T"], Float[Array, "N T"]]:
    """``log softmax(model.logits(hidden) / temperature)`` at ``targets``, chunked over positions.

    The LM head and its log-softmax run on ``chunk_size`` positions at a time (split into equal chunks of
    at most that length), each chunk rematerialised in the backward pass, so peak memory holds one chunk's
    ``[N, chunk, V]`` logits instead of the whole ``[N, T, V]``. ``chunk_size=None`` projects every position
    at once. ``temperature`` divides the logits as the sampler does (PPO/GRPO score the distribution they
    sampled from, as TRL does). ``with_entropy`` also returns the entropy of each position's distribution
    (same temperature), for logging.
    """
    def from_logits(logits, chunk_targets):
        logits = logits / temperature if temperature != 1.0 else logits
        logps = token_logps(logits, chunk_targets)
        return (logps, entropy(logits)) if with_entropy else logps

    if chunk_size is None or chunk_size >= targets.shape[1]:
        return from_logits(model.logits(hidden), targets)
    graphdef, state = nnx.split(model)

    def chunk_logps(state, hidden_chunk, target_chunk):
        return from_logits(nnx.merge(graphdef, state).logits(hidden_chunk), target_chunk)

    return map_position_chunks(chunk_logps, state, (hidden, targets), chunk_size=chunk_size)


def map_position_chunks(fn, params, arrays, *, chunk_size: int | None = DEFAULT_CHUNK):
    """``fn(params, *arrays)`` computed ``chunk_size`` positions at a time, each chunk rematerialised.

    ``arrays`` are ``[N, L, ...]`` (positions on axis 1) and ``fn`` maps their chunks ``[N, c, ...]`` to a pytree
    of ``[N, c, ...]`` arrays, position by position; the result is that pytree over all ``L`` positions. The
    positions split into as few equal chunks of at most ``chunk_size`` as cover them (padding under one
    position per chunk: a 129-position input runs two chunks of 65, not two of 128); :func:`jax.lax.map` walks
    them under :func:`jax.checkpoint`, so only one chunk's intermediates (an LM head's ``[N, c, V]`` logits)
    are alive at once, in the forward and the backward pass. ``params`` (the weights ``fn`` needs, e.g. an
    ``nnx.split`` state) are passed to every chunk, not closed over. ``chunk_size=None`` (or ``>= L``) calls
    ``fn`` once on everything.
    """
    length = arrays[0].shape[1]
    if chunk_size is None or chunk_size >= length:
        return fn(params, *arrays)
    chunks = -(-length // chunk_size)
    chunk_size = -(-length // chunks)
    pad = chunks * chunk_size - length
    # [C, N, chunk, ...]: lax.map walks the chunks.
    split = tuple(rearrange(jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)), "n (c t) ... -> c n t ...",
                            c=chunks) for x in arrays)
    step = jax.checkpoint(fn)
    out = jax.lax.map(lambda xs: step(params, *xs), split)
    return jax.tree.map(lambda x: rearrange(x, "c n t ... -> n (c t) ...")[:, :length], out)


def target_logps(model, input_ids: Int[Array, "N T"], attention_mask: Array, positions: Array | None = None,
                 segment_ids: Array | None = None, *, chunk_size: int | None = DEFAULT_CHUNK,
                 ) -> Float[Array, "N T-1"]:
    """``log p(input_ids[:, t+1] | input_ids[:, :t+1])`` for every ``t``, float32.

    The trunk runs once over ``[N, T]`` (packed rows with their ``segment_ids``); the LM head then runs in
    chunks (:func:`head_logps`).
    """
    hidden, _ = model.hidden_states(input_ids, positions=positions, attention_mask=attention_mask,
                                    segment_ids=segment_ids)
    return head_logps(model, hidden[:, :-1], input_ids[:, 1:], chunk_size=chunk_size)


def slot_logps(model, hidden: Float[Array, "N S D"], source_slots: Int[Array, "N K"], targets: Int[Array, "N K"],
               *, chunk_size: int | None = DEFAULT_CHUNK, temperature: float = 1.0, with_entropy: bool = False,
               ) -> Float[Array, "N K"] | tuple[Float[Array, "N K"], Float[Array, "N K"]]:
    """``log softmax(model.logits(hidden[n, source_slots[n, k]]))[targets[n, k]]``: the LM head only where asked.

    ``source_slots`` name, per row, the positions whose next-token distribution a loss reads (the token before
    each target in its own sequence); the rest of ``hidden`` never meets the ``D × V`` head. Equal to
    :func:`head_logps` of the whole row read at those slots (the same float32 log-softmax of the same hidden
    states); padding entries (any slot, any target) give finite values to mask. ``temperature`` and
    ``with_entropy`` as :func:`head_logps`.
    """
    gathered = jnp.take_along_axis(hidden, source_slots[..., None].astype(jnp.int32), axis=1)
    return head_logps(model, gathered, targets, chunk_size=chunk_size, temperature=temperature,
                      with_entropy=with_entropy)


def slot_targets(input_ids: Int[Array, "N S"], target_slots: Int[Array, "N K"]) -> Int[Array, "N K"]:
    """The token ids at ``target_slots`` (slot 0, never a target, reads as padding)."""
    return jnp.take_along_axis(input_ids, target_slots.astype(jnp.int32), axis=1)
