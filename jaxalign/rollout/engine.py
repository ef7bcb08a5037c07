"""The rollout engine: prefill and decode of one base model (and any guides) in one compiled loop.

``Sampler.generate`` pads a prompt batch to its bucket on the host and calls one jitted function that
prefills every model's KV cache, then runs a ``lax.while_loop`` of decode steps until every row has
stopped or ``max_new_tokens`` are out. The prefill runs the usual layer scan; the decode loop runs the
layers unrolled on per-layer copies of the layer weights (made when the sampler gets its weights,
``models.stack.unstack_layers``) and on per-layer cache buffers (made after the prefill,
``KVCache.per_layer``): under a scan, XLA's CPU backend copies each layer's weights and cache out of the
stacked arrays at every step (on 2 cores and SmolLM2-135M, a third of a decode step's time). The models
enter as ``(graphdef, state)`` split once: the graphdefs are static arguments (equal structures share a
compiled program, even across ``Sampler`` objects), the states are ordinary array arguments, so new weights
(``update_weights``) do not retrace.

Guided decoding (LLMDoctor, arXiv 2601.10416; GenARM, arXiv 2410.08193) scores token ``v`` as
``α·log π_base(v) + Σᵢ βᵢ·log π_guideᵢ(v)``; the weights are a traced ``[1 + G]`` array, so changing them
does not recompile. Each model keeps its own cache and may be of another size or sharding.

On AVX2 CPUs without AVX-512, a loop of 8 to 16 rows compiles with YNNPACK's dot products off, where XLA's own
kernels ran the decode step 1.3-1.4x faster (:mod:`jaxalign.rollout.compile_options`; on an AVX-512 Xeon they
were slower at every row count, so it keeps the defaults).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from jaxalign.losses.core import token_logps
from jaxalign.models import KVCache, fit_spec, named_shardings
from jaxalign.models.activation_sharding import BATCH_AXES  # a prompt batch's rows split as a train batch's
from jaxalign.models.stack import unstack_layers
from jaxalign.rollout.batching import MIN_LENGTH_BUCKET, bucket, check_left_padded, left_pad, pad_batch
from jaxalign.rollout.compile_options import decode_jit
from jaxalign.rollout.filters import DEFAULT_CANDIDATES
from jaxalign.rollout.params import Filters, SamplingParams
from jaxalign.rollout.sampling import draw, draw_one_model

# stream(step, tokens [R], emitted [R]) runs on the host after each token (NumPy arguments).
StreamFn = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollout:
    """What ``generate`` returns for ``R = B·n`` rows (prompt ``b``'s samples are rows ``b·n .. b·n+n−1``).

    Attributes:
        tokens: ``[R, N]`` response tokens; the pad id after a row ends.
        response_mask: ``[R, N]`` true on generated tokens (the stop token included).
        lengths: ``[R]`` generated tokens per row.
        stopped: ``[R]`` the row ended on a stop token (else it ran out of ``max_new_tokens``).
        sampling_logps: ``[R, N]`` log-probability of each token under the distribution it was drawn
            from (temperature, top-k/top-p/min-p and guidance applied); 0 at temperature 0 and on padding.
        model_logps: ``[R, N]`` log-probability under the unmodified base model (softmax of its logits, as
            ``losses.token_logps`` of a training forward pass gives); 0 on padding.
        guide_logps: ``[G, R, N]`` the same under each guide model (``G = 0`` without guides).
        prompt_tokens, prompt_mask: ``[R, P]`` the prompts as decoded: repeated ``n`` times and left-padded
            to the length bucket ``P``.
        hidden_states: ``[R, N, D]`` with ``generate(..., return_hidden=True)``: the base model's final
            hidden state whose logits chose each token (the training forward's ``hidden[:, P − 1 + t]``;
            zeros on padding), e.g. for a value head on the policy's trunk; else None.
    """

    tokens: Int[Array, "R N"]
    response_mask: Bool[Array, "R N"]
    lengths: Int[Array, " R"]
    stopped: Bool[Array, " R"]
    sampling_logps: Float[Array, "R N"]
    model_logps: Float[Array, "R N"]
    guide_logps: Float[Array, "G R N"]
    prompt_tokens: Int[Array, "R P"]
    prompt_mask: Bool[Array, "R P"]
    hidden_states: Float[Array, "R N D"] | None = None

    def sequences(self) -> tuple[Int[Array, "R P+N"], Bool[Array, "R P+N"]]:
        """``(tokens, attention_mask)`` of prompt + response, ready for a training forward pass.

        The logits that predict response token ``t`` sit at column ``P − 1 + t``:
        ``token_logps(logits[:, P - 1:-1], rollout.tokens)`` equals ``model_logps`` on the response mask.
        """
        return (jnp.concatenate([self.prompt_tokens, self.tokens], axis=1),
                jnp.concatenate([self.prompt_mask, self.response_mask], axis=1))

    def take_rows(self, count: int) -> Rollout:
        """The first ``count`` rows (drops the rows that only padded the batch bucket)."""
        fields = {f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[:count]
                  for f in dataclasses.fields(self)}
        fields["guide_logps"] = self.guide_logps[:, :count]
        return Rollout(**fields)


class _Carry(NamedTuple):
    """The decode loop's state; ``step`` is the index of the next response token."""

    step: Int[Array, ""]
    fed: Int[Array, " R"]  # the last token chosen, fed to the models next
    fed_real: Bool[Array, " R"]  # whether it is part of the response (else padding, masked from the caches)
    done: Bool[Array, " R"]
    caches: tuple[KVCache, ...]
    tokens: Int[Array, "R N"]
    response_mask: Bool[Array, "R N"]
    sampling_logps: Float[Array, "R N"]
    member_logps: Float[Array, "M R N"]
    hidden: Float[Array, "R N D"] | None  # the base model's, with return_hidden


def _batch_spec(mesh: Mesh | None, rank: int, batch_dim: int = 0) -> PartitionSpec | None:
    if mesh is None:
        return None
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    spec = [None] * rank
    spec[batch_dim] = axes
    return PartitionSpec(*spec)


def _constrain(x: Array, mesh: Mesh | None, spec: PartitionSpec | None) -> Array:
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, fit_spec(spec, x.shape, mesh)))


def _constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    """Rows over the data axes, kv heads over ``tensor`` (as the column-parallel k/v projections)."""
    if mesh is None:
        return cache
    rows = tuple(a for a in BATCH_AXES if a in mesh.shape)
    if cache.is_per_layer:  # per layer: keys [B, K, Dh, S], values [B, K, S, Dh]
        kv_spec = PartitionSpec(rows, "tensor", None, None)
        keys = tuple(_constrain(layer, mesh, kv_spec) for layer in cache.keys)
        values = tuple(_constrain(layer, mesh, kv_spec) for layer in cache.values)
    else:  # [L, B, S, K, Dh]
        kv_spec = PartitionSpec(None, rows, None, "tensor", None)
        keys, values = _constrain(cache.keys, mesh, kv_spec), _constrain(cache.values, mesh, kv_spec)
    return dataclasses.replace(
        cache, keys=keys, values=values,
        valid=_constrain(cache.valid, mesh, _batch_spec(mesh, 2)),
        next_position=_constrain(cache.next_position, mesh, _batch_spec(mesh, 1)),
    )


def _samples(x: Array, n: int, mesh: Mesh | None) -> Array:
    """``[B, ...]`` per prompt -> ``[B·n, ...]`` per row (each prompt's ``n`` samples, as ``jnp.repeat``)."""
    return x if n == 1 else _constrain(jnp.repeat(x, n, axis=0), mesh, _batch_spec(mesh, x.ndim))


def _row_keys(key: Array, rows: int, n: int) -> Array:
    """One key per row from (prompt index, sample index): sample j of prompt b does not depend on n."""
    def row_key(row):
        return jax.random.fold_in(jax.random.fold_in(key, row // n), row % n)

    return jax.vmap(row_key)(jnp.arange(rows))


@decode_jit(static_argnames=("graphdefs", "max_new_tokens", "n", "candidates", "mesh", "stream", "return_hidden"))
def _generate(states, prompt_tokens, prompt_mask, key, weights, filters: Filters, stop_mask, pad_token_id, *,
              graphdefs, max_new_tokens: int, n: int, candidates: int, mesh: Mesh | None,
              stream: StreamFn | None, return_hidden: bool) -> Rollout:
    """The compiled prefill + decode loop over ``[B, P]`` prompts (see :meth:`Sampler.generate`).

    Every model enters twice (``states[m]``, ``graphdefs[m]`` are pairs, see :class:`_Member`): with its
    stacked layers for the prefill's layer scan, and with them unstacked for the unrolled decode loop.
    """
    models = [nnx.merge(graphdef, *state) for (graphdef, _), (state, _) in zip(graphdefs, states, strict=True)]
    decoders = [nnx.merge(graphdef, *state) for (_, graphdef), (_, state) in zip(graphdefs, states, strict=True)]
    row_spec = _batch_spec(mesh, 2)
    tokens = _constrain(jnp.repeat(prompt_tokens, n, axis=0), mesh, row_spec)
    mask = _constrain(jnp.repeat(prompt_mask.astype(bool), n, axis=0), mesh, row_spec)
    rows, prompt_length = tokens.shape
    # The last response token is never fed back, so the cache needs P + N - 1 slots.
    cache_length = prompt_length + max_new_tokens - 1
    row_keys = _row_keys(key, rows, n)

    def last_logits(model, hidden):
        # Only the last position is needed: the vocabulary projection of the whole prompt would dominate.
        return _constrain(model.logits(hidden[:, -1]), mesh, row_spec)

    def choose(carry: _Carry, logits: list[Array], base_hidden: Array) -> _Carry:
        """Pick token ``carry.step`` from every model's next-token logits and record it (with the base
        model's hidden state ``[R, D]`` that gave its logits, when kept)."""
        step = carry.step
        uniforms = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step)))(row_keys)
        emit = ~carry.done
        # Rows split over devices stay where they are (no gathering of the unsettled rows).
        if len(logits) == 1:
            # One model (alpha checked positive on the host): its log-probabilities reuse the draw's normaliser.
            drawn, log_normaliser = draw_one_model(logits[0], weights[0], uniforms, filters, candidates=candidates,
                                                   compact_rows=mesh is None)
            token = jnp.where(emit, drawn.tokens, pad_token_id)
            chosen_logits = jnp.take_along_axis(logits[0], token[:, None], axis=-1)[:, 0]
            member_logps = jnp.where(emit, chosen_logits - log_normaliser, 0.0)[None]
        else:
            scores = sum(weights[m] * logits[m] for m in range(len(logits)))
            drawn = draw(scores, uniforms, filters, candidates=candidates, compact_rows=mesh is None)
            token = jnp.where(emit, drawn.tokens, pad_token_id)
            member_logps = jnp.stack([token_logps(model_logits, token, emit) for model_logits in logits])
        sampling_logp = drawn.logps
        if stream is not None:
            jax.debug.callback(stream, step, token, emit, ordered=True)
        return carry._replace(
            step=step + 1,
            fed=token,
            fed_real=emit,
            done=carry.done | (emit & stop_mask[token]),
            tokens=carry.tokens.at[:, step].set(token),
            response_mask=carry.response_mask.at[:, step].set(emit),
            sampling_logps=carry.sampling_logps.at[:, step].set(jnp.where(emit, sampling_logp, 0.0)),
            member_logps=carry.member_logps.at[:, :, step].set(member_logps),
            hidden=None if carry.hidden is None else carry.hidden.at[:, step].set(
                jnp.where(emit[:, None], base_hidden, 0).astype(carry.hidden.dtype)),
        )

    # Each prompt is prefilled once for its n samples: their caches, first logits and hidden state are copies.
    # The prompt's cache has only its slots (prefill attention need not sweep the response's); per_layer()
    # makes room for the response. Decoding runs the layers unrolled on per-layer weights and writes
    # per-layer cache buffers: under the layer scan XLA's CPU backend would copy every layer's weights and
    # cache at every step.
    prompts = _constrain(prompt_tokens, mesh, row_spec)
    prompts_mask = _constrain(prompt_mask.astype(bool), mesh, row_spec)
    caches, logits = [], []
    for index, model in enumerate(models):
        cache = _constrain_cache(KVCache.init(model.config, batch_size=prompts.shape[0], max_length=prompt_length),
                                 mesh)
        hidden, cache = model.hidden_states(prompts, attention_mask=prompts_mask, cache=cache)
        caches.append(_constrain_cache(cache.per_layer(cache_length).repeat_rows(n), mesh))
        logits.append(_samples(last_logits(model, hidden), n, mesh))
        if index == 0:
            base_hidden = _samples(hidden[:, -1], n, mesh)
    start = _Carry(
        step=jnp.zeros((), jnp.int32),
        fed=jnp.zeros((rows,), jnp.int32),
        fed_real=jnp.zeros((rows,), bool),
        done=~jnp.any(mask, axis=1),  # rows without a prompt token (batch padding) generate nothing
        caches=tuple(caches),
        tokens=jnp.full((rows, max_new_tokens), pad_token_id, jnp.int32),
        response_mask=jnp.zeros((rows, max_new_tokens), bool),
        sampling_logps=jnp.zeros((rows, max_new_tokens), jnp.float32),
        member_logps=jnp.zeros((len(models), rows, max_new_tokens), jnp.float32),
        hidden=(_constrain(jnp.zeros((rows, max_new_tokens, base_hidden.shape[-1]), base_hidden.dtype),
                           mesh, _batch_spec(mesh, 3)) if return_hidden else None),
    )
    carry = choose(start, logits, base_hidden)

    def decode_step(carry: _Carry) -> _Carry:
        caches, logits = [], []
        for index, (model, cache) in enumerate(zip(decoders, carry.caches, strict=True)):
            hidden, cache = model.hidden_states(carry.fed[:, None], attention_mask=carry.fed_real[:, None],
                                                cache=cache)
            caches.append(cache)
            logits.append(last_logits(model, hidden))
            if index == 0:
                base_hidden = hidden[:, -1]
        return choose(carry._replace(caches=tuple(caches)), logits, base_hidden)

    carry = jax.lax.while_loop(lambda c: (c.step < max_new_tokens) & ~jnp.all(c.done), decode_step, carry)
    def rows_sharded(x, batch_dim=0):
        return _constrain(x, mesh, _batch_spec(mesh, x.ndim, batch_dim))

    return Rollout(
        tokens=rows_sharded(carry.tokens),
        response_mask=rows_sharded(carry.response_mask),
        lengths=rows_sharded(jnp.sum(carry.response_mask, axis=1, dtype=jnp.int32)),
        stopped=rows_sharded(jnp.any(carry.response_mask & stop_mask[carry.tokens], axis=1)),
        sampling_logps=rows_sharded(carry.sampling_logps),
        model_logps=rows_sharded(carry.member_logps[0]),
        guide_logps=rows_sharded(carry.member_logps[1:], batch_dim=1),
        prompt_tokens=tokens,
        prompt_mask=mask,
        hidden_states=None if carry.hidden is None else rows_sharded(carry.hidden),
    )


def checked_prompts(prompts: np.ndarray | Sequence[Sequence[int]], prompt_mask: np.ndarray | None,
                    pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, mask)`` ``[B, P]`` int32 from a padded array (+ mask) or a list of token-id lists (padded here).

    Raises:
        ValueError: not ``[batch, length]``, a mask of another shape, or rows that are not left-padded.
    """
    if prompt_mask is None and not isinstance(prompts, np.ndarray | jax.Array):
        prompts, prompt_mask = left_pad(prompts, pad_token_id)
    tokens = np.asarray(prompts, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"prompts must be [batch, length] token ids, got shape {tokens.shape}")
    mask = np.ones_like(tokens) if prompt_mask is None else np.asarray(prompt_mask, np.int32)
    if mask.shape != tokens.shape:
        raise ValueError(f"prompt_mask {mask.shape} does not match prompts {tokens.shape}")
    check_left_padded(mask)
    return tokens, mask


def bucketed_prompts(tokens: np.ndarray, mask: np.ndarray, *, mesh: Mesh | None, batch_buckets, length_buckets,
                     pad_token_id: int) -> tuple[Array, Array]:
    """The prompts padded to their batch and length buckets (one compiled program per bucket pair; the batch a
    multiple of the mesh's data-parallel size) and placed with their rows split over ``data × fsdp``."""
    data_parallel = 1 if mesh is None else int(np.prod([mesh.shape.get(a, 1) for a in BATCH_AXES]))
    rows = bucket(tokens.shape[0], batch_buckets, multiple=data_parallel, what="batch size")
    length = bucket(tokens.shape[1], length_buckets, minimum=MIN_LENGTH_BUCKET, half_octaves=True,
                    what="prompt length")
    tokens, mask = pad_batch(tokens, mask, rows=rows, length=length, pad_token_id=pad_token_id)
    if mesh is not None:
        sharding = NamedSharding(mesh, fit_spec(_batch_spec(mesh, 2), tokens.shape, mesh))
        tokens, mask = jax.device_put(tokens, sharding), jax.device_put(mask, sharding)
    return tokens, mask


class _Member(NamedTuple):
    """A model as ``_generate`` takes it: ``(stacked, unstacked)`` pairs of graphdefs and states.

    A state is ``(parameters, every other variable)``. The stacked one shares the caller's arrays; the
    unstacked one (:func:`~jaxalign.models.stack.unstack_layers`) holds per-layer copies of the layer
    weights, made once here: sliced inside ``_generate`` they would be new buffers at every call, and on
    the CPU the first touch of ~400 MB of fresh pages (SmolLM2-135M) costs about three decode steps.
    """

    graphdefs: tuple[Any, Any]
    states: tuple[tuple[nnx.State, nnx.State], tuple[nnx.State, nnx.State]]
    config: Any


@functools.partial(jax.jit, static_argnums=0)
def _unstacked_state(graphdef, state: tuple[nnx.State, nnx.State]) -> tuple[nnx.State, nnx.State]:
    """The state of ``unstack_layers(model)``: per-layer copies of the layer weights, the rest as it is."""
    _, params, rest = nnx.split(unstack_layers(nnx.merge(graphdef, *state)), nnx.Param, ...)
    return params, rest


def _stacked_and_unstacked(graphdef, params: nnx.State, rest: nnx.State):
    """``(graphdefs, states)``: the model as it is (for the prefill's layer scan) and with its layers unstacked
    (for the decode loop); arrays outside the layers are the caller's, not copies."""
    unstacked_graphdef = nnx.graphdef(nnx.eval_shape(lambda: unstack_layers(nnx.merge(graphdef, params, rest))))
    # Arrays outside the layers (the embedding...) come out of the jit as copies: share the originals.
    original = dict(jax.tree_util.tree_flatten_with_path((params, rest))[0])
    unstacked = jax.tree_util.tree_map_with_path(lambda path, x: original.get(path, x),
                                                 _unstacked_state(graphdef, (params, rest)))
    return (graphdef, unstacked_graphdef), ((params, rest), unstacked)


def _split(model: nnx.Module, mesh: Mesh | None) -> _Member:
    """The model in inference mode, placed on ``mesh`` as in training, stacked and unstacked."""
    for method in ("hidden_states", "logits"):
        if not callable(getattr(model, method, None)):
            raise TypeError(f"{type(model).__name__} has no {method}() method: the sampler needs a causal LM "
                            "such as jaxalign.models.LlamaForCausalLM or GPT2LMHeadModel")
    # A view with dropout off (LoRA adapters may carry dropout); the caller's model is left as it is.
    model = nnx.view(model, deterministic=True, raise_if_not_found=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if mesh is not None:
        params = jax.device_put(params, named_shardings(params, mesh))
        rest = jax.device_put(rest, NamedSharding(mesh, PartitionSpec()))
    return _Member(*_stacked_and_unstacked(graphdef, params, rest), model.config)


class Sampler:
    """Batched sampling from a causal LM, optionally guided by other models, in one compiled loop.

    Example::

        sampler = Sampler(model)                                    # model: LlamaForCausalLM / GPT2LMHeadModel
        out = sampler.generate(prompt_ids, prompt_mask, key=jax.random.key(0),
                               params=SamplingParams(max_new_tokens=64, top_p=0.9, n=4))
        out.tokens, out.response_mask, out.sampling_logps, out.model_logps   # [B·4, 64]

        guided = Sampler(patient, guides=[doctor])
        out = guided.generate(prompt_ids, prompt_mask, key=key, alpha=1.0, betas=[0.5])

    Args:
        model: the base model (the policy; LLMDoctor's "patient").
        guides: guide models sharing the base model's vocabulary (LLMDoctor's "doctor", GenARM's reward LM).
        mesh: a ``(data, fsdp, tensor)`` mesh: parameters are placed with the training sharding rules
            (:func:`jaxalign.models.named_shardings`), prompt rows split over ``data`` × ``fsdp``. None:
            the models run where their arrays are.
        pad_token_id: id written after a row ends and in padding; default the config's pad id, else its
            first EOS id, else 0.
        length_buckets: prompt-length buckets; None: 16, 24, 32, 48, 64, 96, ... (at most 1.5x padding).
        batch_buckets: batch-size buckets; None: powers of two. Both are rounded up to a multiple of the
            data-parallel device count.
        candidates: how many top scores the filters inspect before falling back to an exact bisection.

    Raises:
        ValueError: the guides' vocabulary sizes differ from the base model's.

    Notes:
        Besides sharing the models' arrays, the sampler keeps a per-layer copy of every model's layer
        weights for its decode loop (made at construction and by :meth:`update_weights`): one more copy of
        the layer parameters, which the loop would otherwise make in every call.
    """

    def __init__(self, model: nnx.Module, *, guides: Sequence[nnx.Module] = (), mesh: Mesh | None = None,
                 pad_token_id: int | None = None, length_buckets: Sequence[int] | None = None,
                 batch_buckets: Sequence[int] | None = None, candidates: int = DEFAULT_CANDIDATES):
        self.mesh = mesh
        self.length_buckets = tuple(length_buckets) if length_buckets else None
        self.batch_buckets = tuple(batch_buckets) if batch_buckets else None
        self.candidates = candidates
        self._members = [_split(m, mesh) for m in (model, *guides)]
        self._check_vocabularies()
        config = self.config
        if pad_token_id is None:
            pad_token_id = config.pad_token_id if config.pad_token_id is not None else (
                config.eos_token_ids[0] if config.eos_token_ids else 0)
        self.pad_token_id = int(pad_token_id)

    @property
    def config(self):
        """The base model's config."""
        return self._members[0].config

    @property
    def num_guides(self) -> int:
        """Guide models beside the base (0 without guided decoding)."""
        return len(self._members) - 1

    def _check_vocabularies(self) -> None:
        vocab = self.config.vocab_size
        for index, member in enumerate(self._members[1:]):
            if member.config.vocab_size != vocab:
                raise ValueError(
                    f"guide {index} has a vocabulary of {member.config.vocab_size} tokens but the base model has "
                    f"{vocab}: guided decoding adds log-probabilities token by token, so every model must share "
                    "one vocabulary (the same tokenizer)")

    def update_weights(self, model: nnx.Module | None = None, *, guides: Sequence[nnx.Module] | None = None) -> None:
        """Use new weights (e.g. the policy after a PPO/GRPO update); same structures reuse the compiled loop.

        Copies the new layer weights once into the decode loop's per-layer form (see the class notes).
        """
        if model is not None:
            self._members[0] = _split(model, self.mesh)
        if guides is not None:
            if len(guides) != self.num_guides:
                raise ValueError(f"expected {self.num_guides} guide model(s), got {len(guides)}")
            self._members[1:] = [_split(m, self.mesh) for m in guides]
        self._check_vocabularies()

    def _guidance_weights(self, alpha: float, betas: Sequence[float] | None) -> np.ndarray:
        betas = () if betas is None and not self.num_guides else betas
        if betas is None or len(betas) != self.num_guides:
            raise ValueError(f"this sampler has {self.num_guides} guide model(s): pass betas= with one weight each "
                             f"(got {betas!r})")
        weights = np.asarray([alpha, *betas], np.float32)
        # Checked as the float32 the loop divides by (1e-50 would pass as a Python float and divide by 0).
        if not self.num_guides and not (weights[0] > 0 and np.isfinite(weights[0])):
            raise ValueError(f"alpha={alpha} without guide models must be a positive finite float32: it divides the "
                             f"temperature")
        return weights

    def _check_positions(self, prompt_mask: np.ndarray, max_new_tokens: int) -> None:
        """The longest row must stay inside every model's position range (GPT-2's learned table clamps)."""
        longest = int(prompt_mask.sum(axis=1).max()) + max_new_tokens
        for member in self._members:
            limit = member.config.max_position_embeddings
            if longest > limit:
                raise ValueError(f"the longest prompt plus max_new_tokens is {longest} tokens, beyond the "
                                 f"{limit} positions of a {member.config.architecture} model")

    def generate(
        self,
        prompts: np.ndarray | Sequence[Sequence[int]],
        prompt_mask: np.ndarray | None = None,
        *,
        key: Array,
        params: SamplingParams = SamplingParams(),
        alpha: float = 1.0,
        betas: Sequence[float] | None = None,
        stream: StreamFn | None = None,
        return_hidden: bool = False,
    ) -> Rollout:
        """Sample ``params.n`` responses to every prompt.

        Args:
            prompts: ``[B, P]`` left-padded token ids (with ``prompt_mask``; None means no padding), or a
                list of token-id lists (padded here). A row without any real token yields an empty response.
            prompt_mask: ``[B, P]`` 1 on real tokens.
            key: a ``jax.random`` key. The same key, prompts and parameters give the same tokens; sample
                ``j`` of prompt ``b`` draws from ``fold_in(fold_in(key, b), j)``, so it does not depend on
                ``n``.
            params: :class:`SamplingParams` (only ``max_new_tokens`` and ``n`` select a compiled program).
            alpha: weight of the base model's log-probabilities in the guided score (without guides it must be
                positive: ``alpha·logits`` at temperature ``T`` is the logits at temperature ``T / alpha``).
            betas: one weight per guide (required with guides). ``betas = 0`` reproduces the base model.
            stream: optional ``stream(step, tokens [R], emitted [R])`` called on the host after each
                token, in order (single device only); a different function compiles another program.
            return_hidden: also return the base model's hidden state behind each token
                (``Rollout.hidden_states``, ``[R, N, D]``: a PPO value head on the policy's trunk reads its
                values there instead of running the trunk again). Another compiled program.

        Returns:
            A :class:`Rollout` of ``R = B·n`` rows, its arrays on the sampler's devices.

        Raises:
            ValueError: prompts that are not left-padded, a prompt beyond the last length bucket or the
                model's positions, stop ids outside the vocabulary, guidance weights that do not match
                the guides, or ``stream`` on a multi-device mesh.
        """
        tokens, mask = checked_prompts(prompts, prompt_mask, self.pad_token_id)
        self._check_positions(mask, params.max_new_tokens)
        if stream is not None and self.mesh is not None and self.mesh.size > 1:
            raise ValueError("stream= runs an ordered host callback, which needs a single device (mesh=None)")
        weights = self._guidance_weights(alpha, betas)
        config = self.config
        stop_mask = params.stop_mask(config.vocab_size, config.eos_token_ids)

        batch = tokens.shape[0]
        tokens, mask = bucketed_prompts(tokens, mask, mesh=self.mesh, batch_buckets=self.batch_buckets,
                                        length_buckets=self.length_buckets, pad_token_id=self.pad_token_id)
        rows = tokens.shape[0]
        out = _generate.for_rows(rows * params.n)(
            tuple(m.states for m in self._members), tokens, mask, key, weights, params.filters(), stop_mask,
            np.int32(self.pad_token_id), graphdefs=tuple(m.graphdefs for m in self._members),
            max_new_tokens=params.max_new_tokens, n=params.n, candidates=self.candidates, mesh=self.mesh,
            stream=stream, return_hidden=return_hidden,
        )
        return out if rows == batch else out.take_rows(batch * params.n)
