"""Top-k, top-p and min-p as one threshold per row, found without sorting the vocabulary.

Each filter keeps an *upper set* of the scores (every token scoring at least some value), so their
combination keeps ``{v : s_v ≥ τ}`` with ``τ`` the largest of the three thresholds, where top-p is
measured on the distribution top-k leaves (transformers applies top-k, then top-p, then min-p).

The temperature never touches the vocabulary: dividing by a positive ``T`` keeps the order of the scores, so
the thresholds are found on the scores ``s`` themselves and ``1 / T`` enters only where probabilities are
formed, ``exp((s − max s) / T)``. Dividing first would write one more ``[B, V]`` array per step (~2 ms for
``[32, 49152]`` on 2 CPU cores) and can round two distinct scores to one value. Likewise the thresholds are
float scores compared with ``s`` directly, not ``[B, V]`` order keys.

Finding ``τ`` by sorting is what transformers and vLLM do, but XLA's CPU sort of ``[16, 49152]`` takes
~150 ms, longer than a decode step. Instead:

1. **Candidates** (fast path): ``lax.top_k`` of the ``C`` best scores (~1 ms). When the kept set ends
   inside them (the last candidate falls below ``τ``), ``τ`` is exact. With top-p = 0.9 that is most steps
   of a trained model.
2. **Bisection** (the rows the candidates do not settle, gathered, under ``lax.switch``): over the
   order-preserving uint32 keys of the float32 scores (:func:`order_keys`; each middle key is compared as
   the score it stands for, :func:`key_scores`), one counting or summing sweep of the vocabulary per
   halving (at most 32, ~6 ms for ``[16, 49152]``), also exact. The nucleus
   search starts from a proven lower bound rather than the smallest score, and sweeps only the rows that
   need it; with a trained model at top-p 0.9 a quarter of the rows do, but nearly every step of a
   16-row batch has one (nuclei of hundreds or thousands of tokens are common).

Both paths keep the same set: a threshold is always the score of a vocabulary entry (or ``-inf``, keep all).
Scores tied with the threshold are all kept, for top-p as well (a sort keeps an arbitrary subset of
them); the cumulative sums behind top-p are float32, so a token whose cumulative probability lies within
~1e-7 of ``top_p`` may fall on either side, as in any float32 implementation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, UInt32

from jaxalign.rollout.params import Filters

#: How many top scores the filters' fast path inspects; rows whose nucleus is larger take the exact bisection.
#: ``lax.top_k`` costs ~1.5 ms for 64 of ``[16, 49152]`` on 2 CPU cores but ~12 ms for 1024; nuclei of trained
#: models at top-p 0.9 are usually far smaller than 64 tokens.
DEFAULT_CANDIDATES = 64
# Scores per block when the candidates are picked from the best blocks (top_candidates): 16, 32 and 64 cost
# about the same for [32, 49152]; 128 half as much again.
CANDIDATE_BLOCK = 32
# A threshold key of 0 (the smallest key) keeps every token: the value of a filter that is off.
KEEP_ALL = np.uint32(0)  # NumPy: a jnp value at import would start the JAX backend (multi-host runs must not)


class Thresholds(NamedTuple):
    """What :func:`keep_thresholds` found for each row of scores ``s [B, V]`` (scale ``c = 1 / T``).

    Attributes:
        threshold: ``[B]`` float32: keep ``{v : s_v ≥ threshold}`` (``-inf``: keep every token).
        top_scores, top_indices: ``[B, C]``: the ``C`` best scores (descending, ties in index order), their ids.
        exps: ``[B, V]`` ``exp(c·(s − max s))``: the unnormalised probabilities (the sampler's weights).
        log_normaliser: ``[B]`` ``log Σ_v exps``, over the whole vocabulary: ``logsumexp(c·s) − c·max s``.
    """

    threshold: Float[Array, " B"]
    top_scores: Float[Array, "B C"]
    top_indices: Int[Array, "B C"]
    exps: Float[Array, "B V"]
    log_normaliser: Float[Array, " B"]


def order_keys(x: Float[Array, "..."]) -> UInt32[Array, "..."]:
    """Order-preserving uint32 image of float32 values: ``a < b ⟺ key(a) < key(b)``.

    Non-negative floats keep their bits with the sign bit set; negative floats have all bits flipped
    (their magnitude order reversed). ``-0.0`` is read as ``+0.0`` so equal values get equal keys.
    """
    x = jnp.where(x == 0, jnp.zeros_like(x), x).astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def key_scores(keys: UInt32[Array, "..."]) -> Float[Array, "..."]:
    """The float32 ``f`` of each key with ``s ≥ f ⟺ order_keys(s) ≥ key`` for every non-NaN ``s``.

    The inverse of :func:`order_keys` on the keys it produces; key ``0x7FFFFFFF`` (which no float maps to: it
    lies between the negative floats and zero) gives ``-0.0``, which ``±0.0`` pass and every negative float
    fails; keys at or below ``-inf``'s (:data:`KEEP_ALL` among them) give ``-inf``.
    """
    bits = jnp.where(keys >= jnp.uint32(0x80000000), keys & jnp.uint32(0x7FFFFFFF), ~keys)
    floats = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.where(keys <= order_keys(jnp.float32(-jnp.inf)), -jnp.inf, floats)


def top_candidates(scores: Float[Array, "B V"], count: int) -> tuple[Float[Array, "B C"], Int[Array, "B C"]]:
    """``lax.top_k(scores, count)`` (ties in index order), from the blocks of :data:`CANDIDATE_BLOCK` scores that
    hold the ``count`` best block maxima.

    Exact: a score among the ``count`` best has fewer than ``count`` scores before it, so fewer than ``count``
    blocks have a better maximum (or an equal one earlier), and its block is among those taken. One sweep for the
    block maxima and a top-k over ``count`` blocks cost about 40 % of a top-k over the vocabulary (``[32, 49152]``:
    1.1 ms against 2.7 ms on 2 CPU cores); a vocabulary under :data:`CANDIDATE_BLOCK` × 2 × ``count`` takes the
    plain top-k.
    """
    batch, vocab = scores.shape
    blocks = -(-vocab // CANDIDATE_BLOCK)
    # The barriers keep XLA's CPU backend on its TopK kernel: when a consumer slices the indices, the
    # algebraic simplifier otherwise rewrites top_k into a full sort of the vocabulary (~100x slower).
    if blocks < 2 * count:
        return jax.lax.optimization_barrier(jax.lax.top_k(scores, count))
    padded = jnp.pad(scores, ((0, 0), (0, blocks * CANDIDATE_BLOCK - vocab)), constant_values=-jnp.inf)
    padded = padded.reshape(batch, blocks, CANDIDATE_BLOCK)
    _, best_blocks = jax.lax.optimization_barrier(jax.lax.top_k(jnp.max(padded, axis=-1), count))
    best_blocks = jnp.sort(best_blocks, axis=-1)  # in vocabulary order, so ties below stay in index order
    taken = jnp.take_along_axis(padded, best_blocks[:, :, None], axis=1).reshape(batch, count * CANDIDATE_BLOCK)
    top_scores, at = jax.lax.optimization_barrier(jax.lax.top_k(taken, count))
    top_indices = jnp.take_along_axis(best_blocks, at // CANDIDATE_BLOCK, axis=-1) * CANDIDATE_BLOCK
    return top_scores, top_indices + at % CANDIDATE_BLOCK


def _smallest_key_below(scores: Float[Array, "B V"], weights: Float[Array, "B V"], bound: Float[Array, " B"],
                        low: UInt32[Array, " B"], high: UInt32[Array, " B"]) -> UInt32[Array, " B"]:
    """Per row, the smallest key ``t`` with ``Σ_{v : key(s_v) > t} weights_v < bound``, by bisection.

    The sum only changes at keys of vocabulary entries, so the answer is one of them. Each halving is one
    sweep over the vocabulary with a single reduction (~0.2 ms for ``[16, 49152]`` on 2 cores; snapping the
    ends to entries would need two more reductions per sweep, costing more than the halvings it saves).
    The loop stops when every row's bracket is one key wide: at most 32 sweeps, fewer for tight brackets.

    Args:
        scores: the rows' scores; weights: non-negative (unnormalised probabilities, or ones to count).
        bound: ``[B]``.
        low, high: ``[B]`` keys bracketing the answer: the sum above ``high`` is below ``bound``, and every
            ``t < low`` has a sum at or above it.
    """
    def halve(bracket):
        low, high = bracket
        middle = low + (high - low) // 2
        # key(s) > middle ⟺ s ≥ the score of key middle + 1 (middle < high, so no overflow).
        above = scores >= key_scores(middle + 1)[:, None]
        below_bound = jnp.sum(jnp.where(above, weights, 0.0), axis=-1) < bound
        active = low < high
        return (jnp.where(active & ~below_bound, middle + 1, low), jnp.where(active & below_bound, middle, high))

    return jax.lax.while_loop(lambda bracket: jnp.any(bracket[0] < bracket[1]), halve, (low, high))[1]


def _exact_thresholds(scores, exps, scale, top_k, top_p, min_p_key, best, nucleus_ceiling):
    """Threshold keys searched over the whole vocabulary, for the rows the candidates do not settle.

    ``exps`` are ``exp(c·(s − best))``, ``best`` the largest score (the best candidate);
    ``nucleus_ceiling`` a key the nucleus threshold cannot exceed (the last candidate's, where the candidates
    hold less than ``top_p``).

    The nucleus search starts from a lower bound instead of the smallest key (a reduction saved, and a
    narrower bracket): with ``Z`` the top-k set's mass in ``exps``, every token with
    ``c·(s − max s) < log Z + log((1 − top_p) / V) − 1`` has probability below ``(1 − top_p) / (e·V)``, so all
    of them hold less than ``1 − top_p`` and the tokens scoring more hold more than ``top_p``: the nucleus
    ends at or above that score. (Only for ``top_p`` within ~1e-6 of 1, where float32 sums of the
    probabilities err by more than the mass below it, can this differ from a search from the smallest
    score, which would then keep tokens the exact nucleus does not.)
    """
    vocab = scores.shape[-1]
    max_key = order_keys(best)
    top_k_on = top_k < vocab
    # The k-th largest score is the smallest t with fewer than k scores above it.
    top_k_key = jax.lax.cond(
        jnp.any(top_k_on),
        lambda: jnp.where(top_k_on, _smallest_key_below(scores, jnp.ones_like(scores), top_k.astype(jnp.float32),
                                                         order_keys(jnp.min(scores, axis=-1)), max_key), KEEP_ALL),
        lambda: jnp.full_like(max_key, KEEP_ALL),
    )
    in_top_k = jnp.where(scores >= key_scores(top_k_key)[:, None], exps, 0.0)
    mass = jnp.sum(in_top_k, axis=-1)
    # Token v is in the nucleus iff the tokens scoring strictly more hold < top_p of the top-k set's mass.
    lowest_end = best + (jnp.log(mass) + jnp.log((1 - top_p) / vocab) - 1) / scale
    floor = jnp.maximum(order_keys(lowest_end), top_k_key)
    ceiling = jnp.clip(nucleus_ceiling, floor, max_key)
    top_p_on = top_p < 1
    top_p_key = jax.lax.cond(
        jnp.any(top_p_on),
        lambda: jnp.where(top_p_on, _smallest_key_below(scores, in_top_k, top_p * mass, floor, ceiling), KEEP_ALL),
        lambda: jnp.full_like(max_key, KEEP_ALL),
    )
    return jnp.maximum(jnp.maximum(top_k_key, top_p_key), min_p_key)


def keep_thresholds(
    scores: Float[Array, "B V"],
    *,
    scale: Array,
    top_k: Array,
    top_p: Array,
    min_p: Array,
    candidates: int = DEFAULT_CANDIDATES,
    settled: Bool[Array, " B"] | None = None,
    compact_rows: bool = True,
) -> Thresholds:
    """The combined top-k / top-p / min-p threshold of each row of scores at inverse temperature ``scale``.

    Formula (``x = scale · s``, the temperature-scaled scores): keep ``{v : s_v ≥ τ}`` with
    ``τ = max(τ_k, τ_p, τ_min)``: ``τ_k`` the k-th largest score, ``τ_p`` the score of the last token of the
    nucleus of ``softmax(x)`` over the top-k set (tokens whose strictly higher-scoring mass is ``< top_p``),
    ``τ_min`` the least score with ``x_v ≥ max x + log(min_p)``.

    Args:
        scores: ``[B, V]`` float32 logits or guided scores.
        scale: ``[B]`` or scalar ``1 / temperature``, positive (1 for greedy rows).
        top_k: ``[B]`` or scalar int, 0 = off. top_p: ``[B]`` or scalar in (0, 1], 1 = off.
        min_p: ``[B]`` or scalar in [0, 1], 0 = off.
        candidates: ``C``, how many top scores settle the common case (static).
        settled: optional ``[B]`` rows whose threshold does not matter (greedy rows): never a reason to
            take the bisection path.
        compact_rows: search only the rows the candidates do not settle, gathered (static; the result is
            the same). Gathering rows by traced indices moves them between devices when ``scores`` is split
            by rows over a mesh: pass False there.
    """
    batch, vocab = scores.shape
    count = min(candidates, vocab)
    scale = jnp.broadcast_to(scale, (batch,)).astype(jnp.float32)
    top_k = jnp.broadcast_to(jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab), (batch,))
    top_p = jnp.broadcast_to(top_p, (batch,)).astype(jnp.float32)
    min_p = jnp.broadcast_to(min_p, (batch,)).astype(jnp.float32)
    top_scores, top_indices = top_candidates(scores, count)
    best = top_scores[:, 0]
    exps = jnp.exp(scale[:, None] * (scores - best[:, None]))
    total_mass = jnp.sum(exps, axis=-1)
    top_keys = order_keys(top_scores)
    last_key = top_keys[:, -1]

    top_k_on = top_k < vocab
    top_k_key = jnp.where(top_k_on, jnp.take_along_axis(top_keys, jnp.clip(top_k - 1, 0, count - 1)[:, None], -1)[:, 0],
                          KEEP_ALL)
    # Top-k is settled by the candidates when k fits in them and nothing beyond them ties with the k-th.
    top_k_settled = ~top_k_on | ((top_k <= count) & (last_key < top_k_key))
    in_top_k = top_keys >= top_k_key[:, None]
    # Top-p renormalises over the top-k set: the candidates' own when top-k is on (exact when settled),
    # the whole vocabulary otherwise.
    top_exps = jnp.where(in_top_k, jnp.exp(scale[:, None] * (top_scores - best[:, None])), 0.0)
    probs = top_exps / jnp.where(top_k_on, jnp.sum(top_exps, axis=-1), total_mass)[:, None]
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    nucleus_size = jnp.sum(in_top_k & (mass_before < top_p[:, None]), axis=-1)
    nucleus_end = jnp.take_along_axis(top_keys, (nucleus_size - 1)[:, None], -1)[:, 0]
    top_p_key = jnp.where(top_p < 1, nucleus_end, KEEP_ALL)
    min_p_key = jnp.where(min_p > 0, order_keys(best + jnp.log(min_p) / scale), KEEP_ALL)
    threshold = jnp.maximum(jnp.maximum(top_k_key, top_p_key), min_p_key)

    def found(threshold_keys):
        return Thresholds(key_scores(threshold_keys), top_scores, top_indices, exps, jnp.log(total_mass))

    if count == vocab:  # the candidates are the whole vocabulary: every threshold above is exact
        return found(threshold)

    # Settled when nothing beyond the candidates can be kept (or nothing is filtered at all).
    row_settled = top_k_settled & ((threshold == KEEP_ALL) | (last_key < threshold))
    if settled is not None:
        row_settled = row_settled | settled
    # With the top-k set settled the candidates' probabilities are exact, and the mass strictly above the
    # candidate nucleus's end is below top_p: the true nucleus ends there or lower.
    nucleus_ceiling = jnp.where(top_k_settled, nucleus_end, jnp.uint32(0xFFFFFFFF))
    row_inputs = (scores, exps, scale, top_k, top_p, min_p_key, best, nucleus_ceiling)
    if not compact_rows:
        threshold = jax.lax.cond(
            jnp.all(row_settled),
            lambda: threshold,
            lambda: jnp.where(row_settled, threshold, _exact_thresholds(*row_inputs)),
        )
        return found(threshold)
    # The search runs on the unsettled rows only (a quarter of them for SmolLM2 at top-p 0.9), gathered
    # into the smallest of B/4, B/2 or B rows: each halving sweeps fewer rows. (Each size compiles its
    # own search; a B/8 size saved no time on 16 rows.)
    order = jnp.argsort(row_settled)  # unsettled rows first
    sizes = sorted({max(1, batch // 4), max(1, batch // 2), batch})

    def search(size: int):
        def run():
            rows = order[:size]
            keys = _exact_thresholds(*(a[rows] for a in row_inputs))
            return threshold.at[rows].set(jnp.where(row_settled[rows], threshold[rows], keys))
        return run

    unsettled = jnp.sum(~row_settled)
    branch = jnp.where(unsettled == 0, 0, 1 + sum((unsettled > size).astype(jnp.int32) for size in sizes[:-1]))
    return found(jax.lax.switch(branch, [lambda: threshold] + [search(size) for size in sizes]))


def filtered_logprobs(scores: Float[Array, "... V"], filters: Filters, *, candidates: int = DEFAULT_CANDIDATES,
                      compact_rows: bool = True) -> Float[Array, "... V"]:
    """Log-probabilities of the distribution the sampler draws from; ``-inf`` outside the kept set.

    ``log softmax(x)`` over ``{v : s_v ≥ τ}`` with ``x = scores / temperature`` and ``τ`` from
    :func:`keep_thresholds`; at temperature 0 a point mass on the first maximum (0 there, ``-inf``
    elsewhere). The sampler's ``sampling_logps`` are entries of this.

    Args:
        scores: ``[..., V]`` logits (or guided scores).
        filters: scalars, or arrays of the leading shape (one setting per position).
        candidates, compact_rows: as in :func:`keep_thresholds`.

    Returns:
        ``[..., V]`` float32.
    """
    lead, vocab = scores.shape[:-1], scores.shape[-1]
    flat = [jnp.broadcast_to(jnp.asarray(f), lead).reshape(-1) for f in filters]
    temperature, top_k, top_p, min_p = flat
    greedy = temperature == 0
    scale = 1.0 / jnp.where(greedy, 1.0, temperature)
    s = scores.reshape(-1, vocab).astype(jnp.float32)
    kept = keep_thresholds(s, scale=scale, top_k=top_k, top_p=top_p, min_p=min_p, candidates=candidates,
                           settled=greedy, compact_rows=compact_rows)
    x = scale[:, None] * (s - kept.top_scores[:, :1])
    sampled = jax.nn.log_softmax(jnp.where(s >= kept.threshold[:, None], x, -jnp.inf), axis=-1)
    point_mass = jnp.where(jnp.arange(vocab) == kept.top_indices[:, :1], 0.0, -jnp.inf)
    return jnp.where(greedy[:, None], point_mass, sampled).reshape(scores.shape)
