"""Top-k, top-p and min-p as one threshold per row, found without sorting the vocabulary.

Each filter keeps an *upper set* of the scores (every token scoring at least some value), so their
combination keeps ``{v : x_v ≥ τ}`` with ``τ`` the largest of the three thresholds, where top-p is
measured on the distribution top-k leaves (transformers applies top-k, then top-p, then min-p).

Finding ``τ`` by sorting is what transformers and vLLM do, but XLA's CPU sort of ``[16, 49152]`` takes
~150 ms, longer than a decode step. Instead:

1. **Candidates** (fast path): ``lax.top_k`` of the ``C`` best scores (~1 ms). When the kept set ends
   inside them (the last candidate falls below ``τ``), ``τ`` is exact. With top-p = 0.9 that is most steps
   of a trained model.
2. **Bisection** (the rows the candidates do not settle, gathered, under ``lax.switch``): over the
   order-preserving uint32 keys of the float32 scores (:func:`order_keys`), one counting or summing
   sweep of the vocabulary per halving (at most 32, ~6 ms for ``[16, 49152]``), also exact. The nucleus
   search starts from a proven lower bound rather than the smallest score, and sweeps only the rows that
   need it; with a trained model at top-p 0.9 a quarter of the rows do, but nearly every step of a
   16-row batch has one (nuclei of hundreds or thousands of tokens are common).

Both paths keep the same set: a threshold is always the key of a vocabulary entry (or 0, keep all).
Scores tied with the threshold are all kept, for top-p as well (a sort keeps an arbitrary subset of
them); the cumulative sums behind top-p are float32, so a token whose cumulative probability lies within
~1e-7 of ``top_p`` may fall on either side, as in any float32 implementation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, UInt32

from jaxalign.rollout.params import Filters

# How many top scores the fast path inspects. lax.top_k costs ~1.5 ms for 64 of [16, 49152] on 2 CPU cores
# but ~12 ms for 1024; nuclei of trained models at top-p 0.9 are usually far smaller than 64 tokens.
DEFAULT_CANDIDATES = 64
# A threshold of 0 (the smallest key) keeps every token: the value of a filter that is off.
KEEP_ALL = jnp.uint32(0)


def order_keys(x: Float[Array, "..."]) -> UInt32[Array, "..."]:
    """Order-preserving uint32 image of float32 values: ``a < b ⟺ key(a) < key(b)``.

    Non-negative floats keep their bits with the sign bit set; negative floats have all bits flipped
    (their magnitude order reversed). ``-0.0`` is read as ``+0.0`` so equal values get equal keys.
    """
    x = jnp.where(x == 0, jnp.zeros_like(x), x).astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _smallest_key_below(keys: UInt32[Array, "B V"], weights: Float[Array, "B V"], bound: Float[Array, " B"],
                        low: UInt32[Array, " B"], high: UInt32[Array, " B"]) -> UInt32[Array, " B"]:
    """Per row, the smallest key ``t`` with ``Σ_{v : key_v > t} weights_v < bound``, by bisection.

    The sum only changes at keys of vocabulary entries, so the answer is one of them. Each halving is one
    sweep over the vocabulary with a single reduction (~0.2 ms for ``[16, 49152]`` on 2 cores; snapping the
    ends to entries would need two more reductions per sweep, costing more than the halvings it saves).
    The loop stops when every row's bracket is one key wide: at most 32 sweeps, fewer for tight brackets.

    Args:
        keys: order keys of the scores; weights: non-negative (probabilities, or ones to count).
        bound: ``[B]``.
        low, high: ``[B]`` keys bracketing the answer: the sum above ``high`` is below ``bound``, and every
            ``t < low`` has a sum at or above it.
    """
    def halve(bracket):
        low, high = bracket
        middle = low + (high - low) // 2
        below_bound = jnp.sum(jnp.where(keys > middle[:, None], weights, 0.0), axis=-1) < bound
        active = low < high
        return (jnp.where(active & ~below_bound, middle + 1, low), jnp.where(active & below_bound, middle, high))

    return jax.lax.while_loop(lambda bracket: jnp.any(bracket[0] < bracket[1]), halve, (low, high))[1]


def _exact_thresholds(x, keys, top_k, top_p, min_p_key, max_key, nucleus_ceiling):
    """Thresholds searched over the whole vocabulary, for the rows the candidates do not settle.

    ``max_key`` is the largest key (the best candidate's); ``nucleus_ceiling`` a key the nucleus threshold
    cannot exceed (the last candidate's, where the candidates hold less than ``top_p``).

    The nucleus search starts from a lower bound instead of the smallest key (a reduction saved, and a
    narrower bracket): every token scoring below ``s = logsumexp(x) + log((1 − top_p) / V) − 1`` has
    probability below ``(1 − top_p) / (e·V)``, so all of them hold less than ``1 − top_p`` and the tokens
    scoring ``≥ s`` hold more than ``top_p``: the nucleus ends at or above ``s``. (Only for ``top_p``
    within ~1e-6 of 1, where float32 sums of the probabilities err by more than the mass below ``s``,
    can this differ from a search from the smallest score, which would then keep tokens the exact
    nucleus does not.)
    """
    vocab = x.shape[-1]
    top_k_on = top_k < vocab
    # The k-th largest score is the smallest t with fewer than k scores above it.
    top_k_key = jax.lax.cond(
        jnp.any(top_k_on),
        lambda: jnp.where(top_k_on, _smallest_key_below(keys, jnp.ones_like(x), top_k.astype(jnp.float32),
                                                         jnp.min(keys, axis=-1), max_key), KEEP_ALL),
        lambda: jnp.full_like(max_key, KEEP_ALL),
    )
    in_top_k = keys >= top_k_key[:, None]
    log_normaliser = jax.nn.logsumexp(jnp.where(in_top_k, x, -jnp.inf), axis=-1, keepdims=True)
    probs = jnp.where(in_top_k, jnp.exp(x - log_normaliser), 0.0)
    # Token v is in the nucleus iff the tokens scoring strictly more hold < top_p of the mass.
    lowest_end = log_normaliser[:, 0] + jnp.log((1 - top_p) / vocab) - 1
    floor = jnp.maximum(order_keys(lowest_end), top_k_key)
    ceiling = jnp.clip(nucleus_ceiling, floor, max_key)
    top_p_on = top_p < 1
    top_p_key = jax.lax.cond(
        jnp.any(top_p_on),
        lambda: jnp.where(top_p_on, _smallest_key_below(keys, probs, top_p, floor, ceiling), KEEP_ALL),
        lambda: jnp.full_like(max_key, KEEP_ALL),
    )
    return jnp.maximum(jnp.maximum(top_k_key, top_p_key), min_p_key)


def keep_thresholds(
    x: Float[Array, "B V"],
    *,
    top_k: Array,
    top_p: Array,
    min_p: Array,
    candidates: int = DEFAULT_CANDIDATES,
    settled: Bool[Array, " B"] | None = None,
    compact_rows: bool = True,
) -> tuple[UInt32[Array, "B V"], UInt32[Array, " B"], Float[Array, "B C"], Array]:
    """The combined top-k / top-p / min-p threshold of each row of temperature-scaled scores.

    Formula: keep ``{v : key(x_v) ≥ τ}`` with ``τ = max(τ_k, τ_p, τ_min)``: ``τ_k`` the k-th largest score,
    ``τ_p`` the score of the last token of the nucleus of ``softmax`` over the top-k set (tokens whose
    strictly higher-scoring mass is ``< top_p``), ``τ_min = max_v x_v + log(min_p)``.

    Args:
        x: ``[B, V]`` scores already divided by the temperature.
        top_k: ``[B]`` or scalar int, 0 = off. top_p: ``[B]`` or scalar in (0, 1], 1 = off.
        min_p: ``[B]`` or scalar in [0, 1], 0 = off.
        candidates: ``C``, how many top scores settle the common case (static).
        settled: optional ``[B]`` rows whose threshold does not matter (greedy rows): never a reason to
            take the bisection path.
        compact_rows: search only the rows the candidates do not settle, gathered (static; the result is
            the same). Gathering rows by traced indices moves them between devices when ``x`` is split by
            rows over a mesh: pass False there.

    Returns:
        ``(keys [B, V], τ [B], top_scores [B, C], top_indices [B, C])``: the order keys of ``x``, the
        thresholds as keys, and the ``C`` best scores (descending, ties in index order) with their ids.
    """
    batch, vocab = x.shape
    count = min(candidates, vocab)
    top_k = jnp.broadcast_to(jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab), (batch,))
    top_p = jnp.broadcast_to(top_p, (batch,)).astype(jnp.float32)
    min_p = jnp.broadcast_to(min_p, (batch,)).astype(jnp.float32)
    keys = order_keys(x)
    # The barrier keeps XLA's CPU backend on its TopK kernel: when a consumer slices the indices, the
    # algebraic simplifier otherwise rewrites top_k into a full sort of the vocabulary (~100x slower).
    top_scores, top_indices = jax.lax.optimization_barrier(jax.lax.top_k(x, count))
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
    log_normaliser = jnp.where(top_k_on, jax.nn.logsumexp(jnp.where(in_top_k, top_scores, -jnp.inf), axis=-1),
                               jax.nn.logsumexp(x, axis=-1))
    probs = jnp.where(in_top_k, jnp.exp(top_scores - log_normaliser[:, None]), 0.0)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    nucleus_size = jnp.sum(in_top_k & (mass_before < top_p[:, None]), axis=-1)
    nucleus_end = jnp.take_along_axis(top_keys, (nucleus_size - 1)[:, None], -1)[:, 0]
    top_p_key = jnp.where(top_p < 1, nucleus_end, KEEP_ALL)
    min_p_key = jnp.where(min_p > 0, order_keys(top_scores[:, 0] + jnp.log(min_p)), KEEP_ALL)
    threshold = jnp.maximum(jnp.maximum(top_k_key, top_p_key), min_p_key)
    if count == vocab:  # the candidates are the whole vocabulary: every threshold above is exact
        return keys, threshold, top_scores, top_indices

    # Settled when nothing beyond the candidates can be kept (or nothing is filtered at all).
    row_settled = top_k_settled & ((threshold == KEEP_ALL) | (last_key < threshold))
    if settled is not None:
        row_settled = row_settled | settled
    # With the top-k set settled the candidates' probabilities are exact, and the mass strictly above the
    # candidate nucleus's end is below top_p: the true nucleus ends there or lower.
    nucleus_ceiling = jnp.where(top_k_settled, nucleus_end, jnp.uint32(0xFFFFFFFF))
    row_inputs = (x, keys, top_k, top_p, min_p_key, top_keys[:, 0], nucleus_ceiling)
    if not compact_rows:
        threshold = jax.lax.cond(
            jnp.all(row_settled),
            lambda: threshold,
            lambda: jnp.where(row_settled, threshold, _exact_thresholds(*row_inputs)),
        )
        return keys, threshold, top_scores, top_indices
    # The search runs on the unsettled rows only (a quarter of them for SmolLM2 at top-p 0.9), gathered
    # into the smallest of B/4, B/2 or B rows: each halving sweeps fewer rows. (Each size compiles its
    # own search; a B/8 size saved no time on 16 rows.)
    order = jnp.argsort(row_settled)  # unsettled rows first
    sizes = sorted({max(1, batch // 4), max(1, batch // 2), batch})

    def search(size: int):
        def run():
            rows = order[:size]
            found = _exact_thresholds(*(a[rows] for a in row_inputs))
            return threshold.at[rows].set(jnp.where(row_settled[rows], threshold[rows], found))
        return run

    unsettled = jnp.sum(~row_settled)
    branch = jnp.where(unsettled == 0, 0, 1 + sum((unsettled > size).astype(jnp.int32) for size in sizes[:-1]))
    threshold = jax.lax.switch(branch, [lambda: threshold] + [search(size) for size in sizes])
    return keys, threshold, top_scores, top_indices


def filtered_logprobs(scores: Float[Array, "... V"], filters: Filters, *, candidates: int = DEFAULT_CANDIDATES,
                      compact_rows: bool = True) -> Float[Array, "... V"]:
    """Log-probabilities of the distribution the sampler draws from; ``-inf`` outside the kept set.

    ``log softmax(x)`` over ``{v : x_v ≥ τ}`` with ``x = scores / temperature`` and ``τ`` from
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
    x = scores.reshape(-1, vocab).astype(jnp.float32) / jnp.where(greedy, 1.0, temperature)[:, None]
    keys, threshold, _, top_indices = keep_thresholds(x, top_k=top_k, top_p=top_p, min_p=min_p,
                                                      candidates=candidates, settled=greedy,
                                                      compact_rows=compact_rows)
    kept = jnp.where(keys >= threshold[:, None], x, -jnp.inf)
    sampled = jax.nn.log_softmax(kept, axis=-1)
    point_mass = jnp.where(jnp.arange(vocab) == top_indices[:, :1], 0.0, -jnp.inf)
    return jnp.where(greedy[:, None], point_mass, sampled).reshape(scores.shape)
