"""ARGS decoding: a frozen LM's top-k next tokens re-ranked by a reward model, in one compiled loop.

At every step the patient (the frozen LM) proposes its ``k`` most likely next tokens and each candidate ``v``
is scored by the reward of the prefix it would extend:

    score(v) = z(v | x, y_<t) + w · r([x, y_<t, v])        for v in top_k(z(· | x, y_<t))

with ``z`` the patient's logits and ``r`` a :class:`~jaxalign.models.RewardModel`. ARGS-greedy takes the argmax,
ARGS-stochastic draws from ``softmax(score / T)`` over the ``k`` candidates.

Cost per token: one patient step and one pass of the reward model's trunk over the ``k`` candidates. Both
models keep a KV cache of the committed prefix. The candidates go through the reward trunk as one block of
``k`` tokens written to ``k`` scratch slots after the prefix, under a mask that lets candidate ``j`` see the
prefix and itself only (its RoPE / learned position is the one it would have in the sequence). The chosen
candidate's keys and values are then moved to the first scratch slot, so the chosen token is never run again.
With mean pooling the reward head reads ``(Σ_prefix h + h_v) / (n_prefix + 1)`` from a running float32 sum of
the committed tokens' final hidden states; the trunk is causal, so the prefix's states do not change when a
token is appended.

References:
    Khanov, Burapacheep, Li 2024, "ARGS: Alignment as Reward-Guided Search", ICLR 2024, arXiv 2402.01694
    (Eq. 1, the score; ARGS-greedy and ARGS-stochastic token selection). Public code:
    github.com/deeplearning-wisc/args, ``argsearch.py`` (``ARGS.generate_step``, ``generate_greedy_step_large``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from jaxalign.losses.core import token_logps
from jaxalign.models import KVCache, RewardModel, named_shardings
from jaxalign.models.cache import KEY_LAYOUT, VALUE_LAYOUT, LayerKV
from jaxalign.models.gpt2 import GPT2Model
from jaxalign.models.heads import POOLINGS
from jaxalign.models.llama import LlamaModel
from jaxalign.models.rope import inverse_frequencies, rope_tables
from jaxalign.models.stack import clip_index, scan_layers
from jaxalign.rollout.engine import (
    Rollout,
    _batch_spec,
    _constrain,
    _constrain_cache,
    _row_keys,
    _samples,
    _split,
    _stacked_and_unstacked,
    bucketed_prompts,
    checked_prompts,
)
from jaxalign.rollout.params import SamplingParams
from jaxalign.rollout.sampling import inverse_cdf

DEFAULT_K = 10
DEFAULT_WEIGHT = 1.5
MODES = ("greedy", "sample")


class _Carry(NamedTuple):
    """The decode loop's state; ``step`` is the index of the next response token."""

    step: Int[Array, ""]
    fed: Int[Array, " R"]  # the last token chosen, fed to the patient next
    fed_real: Bool[Array, " R"]  # whether it is part of the response (else padding, masked from the cache)
    done: Bool[Array, " R"]
    patient_cache: KVCache
    reward_cache: KVCache  # the committed prefix, then k scratch slots
    pooled_sum: Float[Array, "R D"]  # Σ of the committed tokens' final reward-trunk states (mean pooling)
    pooled_count: Float[Array, " R"]
    tokens: Int[Array, "R N"]
    response_mask: Bool[Array, "R N"]
    sampling_logps: Float[Array, "R N"]
    model_logps: Float[Array, "R N"]


def _trunk_block(trunk: nnx.Module, tokens: Int[Array, "R C"], positions: Int[Array, "R C"],
                 mask: Bool[Array, "R C S"], kv: LayerKV) -> tuple[Float[Array, "R C D"], LayerKV]:
    """The trunk's final hidden states of ``C`` tokens written at ``kv.index`` under a given attention ``mask``.

    What ``LlamaModel.__call__`` / ``GPT2Model.__call__`` compute with a cache, except that the positions and the
    mask are the caller's (the models derive a slot-causal mask, under which candidate ``j`` would see
    candidates ``0 .. j−1``).
    """
    config = trunk.config
    if isinstance(trunk, LlamaModel):
        cos, sin = rope_tables(positions, inverse_frequencies(config), config.compute_jnp_dtype)
        hidden = trunk.embed_tokens(clip_index(tokens, config.vocab_size))
        hidden, kv = scan_layers(trunk.layers, hidden, kv, n_layers=config.n_layers, remat=config.remat,
                                 remat_policy=config.remat_policy, cos=cos, sin=sin, mask=mask)
        return trunk.norm(hidden), kv
    if isinstance(trunk, GPT2Model):
        hidden = (trunk.wte(clip_index(tokens, config.vocab_size))
                  + trunk.wpe(clip_index(positions, config.max_position_embeddings)))
        hidden, kv = scan_layers(trunk.h, hidden, kv, n_layers=config.n_layers, remat=config.remat,
                                 remat_policy=config.remat_policy, mask=mask)
        return trunk.ln_f(hidden), kv
    raise TypeError(f"ARGS runs the reward model's trunk on candidate blocks; {type(trunk).__name__} is not "
                    "supported (LlamaModel, GPT2Model)")


def _candidate_mask(cache: KVCache, k: int, sliding_window: int | None) -> Bool[Array, "R k S"]:
    """Candidate ``j`` (written at slot ``index + j``) sees the committed prefix and itself.

    A sliding window counts from the slot the candidate would take, ``index`` (transformers' convention: the
    current token and the ``W − 1`` before it).
    """
    slots = jnp.arange(cache.max_length)
    prefix = cache.valid & (slots < cache.index)[None]
    if sliding_window is not None:
        prefix = prefix & (slots > cache.index - sliding_window)[None]
    own = slots[None, :] == (cache.index + jnp.arange(k))[:, None]  # [k, S]
    return prefix[:, None, :] | own[None]


def _commit(cache: KVCache, choice: Int[Array, " R"], real: Bool[Array, " R"]) -> KVCache:
    """Keep candidate ``choice`` of each row: its keys/values (scratch slot ``index + choice``) move to slot
    ``index``, which becomes valid where ``real``; the other scratch slots stay invalid and are overwritten."""
    index = cache.index

    def keep(buffer, layout):  # a per-layer buffer: rows [R] first, the slots on axis layout.slots
        slot = jnp.reshape(index + choice, (-1, 1, 1, 1))
        slot = jnp.broadcast_to(slot, [1 if axis == layout.slots else n for axis, n in enumerate(buffer.shape)])
        start = [0, 0, 0, 0]
        start[layout.slots] = index
        return jax.lax.dynamic_update_slice(buffer, jnp.take_along_axis(buffer, slot, axis=layout.slots), start)

    return dataclasses.replace(
        cache, keys=tuple(keep(b, KEY_LAYOUT) for b in cache.keys),
        values=tuple(keep(b, VALUE_LAYOUT) for b in cache.values),
        valid=jax.lax.dynamic_update_slice(cache.valid, real[:, None], (0, index)),
        next_position=cache.next_position + real.astype(jnp.int32), index=index + 1,
    )


@functools.partial(jax.jit, static_argnames=("graphdefs", "max_new_tokens", "n", "k", "greedy", "mesh"))
def _args_generate(states, prompt_tokens, prompt_mask, key, weight, temperature, reward_scale, stop_mask,
                   pad_token_id, *, graphdefs, max_new_tokens: int, n: int, k: int, greedy: bool,
                   mesh: Mesh | None) -> Rollout:
    """The compiled prefill + ARGS decode loop over ``[B, P]`` prompts (see :meth:`ArgsSampler.generate`).

    ``states`` / ``graphdefs`` are ``(patient, reward model)``, each a ``(stacked, unstacked)`` pair: the
    prefill runs the layer scan, the decode loop the unrolled layers on per-layer caches (as the engine).
    """
    (patient_defs, reward_defs), (patient_states, reward_states) = graphdefs, states
    patient = nnx.merge(patient_defs[0], *patient_states[0])
    patient_decoder = nnx.merge(patient_defs[1], *patient_states[1])
    reward_model = nnx.merge(reward_defs[0], *reward_states[0])
    reward_decoder = nnx.merge(reward_defs[1], *reward_states[1])
    trunk, head = reward_decoder.backbone, reward_decoder.reward_head
    row_spec = _batch_spec(mesh, 2)
    tokens = _constrain(jnp.repeat(prompt_tokens, n, axis=0), mesh, row_spec)
    mask = _constrain(jnp.repeat(prompt_mask.astype(bool), n, axis=0), mesh, row_spec)
    rows, prompt_length = tokens.shape
    row_keys = _row_keys(key, rows, n)

    # Prefill: each model runs once over the [B, P] prompts (scanned layers, a cache of the prompt's slots), and
    # each prompt's caches and pooled state are copied for its n samples (as the Sampler). The patient's prefill
    # stops before the prompts' last column, which the first decode step feeds: the loop body is then the only
    # copy of the candidate scoring in the program (it holds a whole reward trunk).
    prompts = _constrain(prompt_tokens, mesh, row_spec)
    prompts_mask = _constrain(prompt_mask.astype(bool), mesh, row_spec)
    batch = prompts.shape[0]
    cache = _constrain_cache(KVCache.init(patient.config, batch_size=batch, max_length=prompt_length - 1), mesh)
    _, patient_cache = patient.hidden_states(prompts[:, :-1], attention_mask=prompts_mask[:, :-1], cache=cache)
    cache = _constrain_cache(KVCache.init(reward_model.backbone.config, batch_size=batch, max_length=prompt_length),
                             mesh)
    reward_hidden, reward_cache = reward_model.backbone(prompts, attention_mask=prompts_mask, cache=cache)
    real = prompts_mask.astype(jnp.float32)
    # The last response token is never fed to the patient; the reward trunk holds every committed token and,
    # after them, the k candidates of the step.
    patient_cache = _constrain_cache(patient_cache.per_layer(prompt_length + max_new_tokens - 1).repeat_rows(n),
                                     mesh)
    reward_cache = _constrain_cache(reward_cache.per_layer(prompt_length + max_new_tokens - 1 + k).repeat_rows(n),
                                    mesh)
    sliding_window = getattr(trunk.config, "sliding_window", None)

    def choose(carry: _Carry, logits: Float[Array, "R V"]) -> _Carry:
        """Score the patient's top-k candidates for token ``carry.step`` with the reward model, pick one,
        record it and commit it to the reward trunk's cache."""
        step, cache = carry.step, carry.reward_cache
        candidate_logits, candidates = jax.lax.top_k(logits, k)  # [R, k], ties: the lower id first
        positions = jnp.broadcast_to(cache.next_position[:, None], (rows, k))
        hidden, kv = _trunk_block(trunk, candidates, positions, _candidate_mask(cache, k, sliding_window),
                                  cache.for_layers())
        cache = dataclasses.replace(cache, keys=kv.keys, values=kv.values)
        hidden = hidden.astype(jnp.float32)
        if head.pooling == "mean":
            features = (carry.pooled_sum[:, None] + hidden) / (carry.pooled_count + 1.0)[:, None, None]
        else:
            features = hidden
        raw = head.project(features)  # [R, k] or [R, k, N]
        rewards = raw * reward_scale if raw.ndim == 2 else raw @ reward_scale
        scores = candidate_logits.astype(jnp.float32) + weight * rewards
        if greedy:
            choice = jnp.argmax(scores, axis=-1).astype(jnp.int32)  # the first maximum
            sampling_logp = jnp.zeros((rows,), jnp.float32)
        else:
            x = scores / temperature
            x = x - jnp.max(x, axis=-1, keepdims=True)
            uniforms = jax.vmap(lambda row_key: jax.random.uniform(jax.random.fold_in(row_key, step)))(row_keys)
            choice, total = inverse_cdf(jnp.exp(x), uniforms)
            sampling_logp = jnp.take_along_axis(x, choice[:, None], axis=-1)[:, 0] - jnp.log(total)
        emit = ~carry.done
        token = jnp.where(emit, jnp.take_along_axis(candidates, choice[:, None], axis=-1)[:, 0], pad_token_id)
        chosen_hidden = jnp.take_along_axis(hidden, choice[:, None, None], axis=1)[:, 0]
        return carry._replace(
            step=step + 1,
            fed=token,
            fed_real=emit,
            done=carry.done | (emit & stop_mask[token]),
            reward_cache=_commit(cache, choice, emit),
            pooled_sum=carry.pooled_sum + jnp.where(emit[:, None], chosen_hidden, 0.0),
            pooled_count=carry.pooled_count + emit.astype(jnp.float32),
            tokens=carry.tokens.at[:, step].set(token),
            response_mask=carry.response_mask.at[:, step].set(emit),
            sampling_logps=carry.sampling_logps.at[:, step].set(jnp.where(emit, sampling_logp, 0.0)),
            model_logps=carry.model_logps.at[:, step].set(token_logps(logits, token, emit)),
        )

    start = _Carry(
        step=jnp.zeros((), jnp.int32),
        fed=tokens[:, -1],
        fed_real=mask[:, -1],
        done=~jnp.any(mask, axis=1),  # rows without a prompt token (batch padding) generate nothing
        patient_cache=patient_cache,
        reward_cache=reward_cache,
        pooled_sum=_samples(jnp.einsum("btd,bt->bd", reward_hidden.astype(jnp.float32), real), n, mesh),
        pooled_count=_samples(jnp.sum(real, axis=1), n, mesh),
        tokens=jnp.full((rows, max_new_tokens), pad_token_id, jnp.int32),
        response_mask=jnp.zeros((rows, max_new_tokens), bool),
        sampling_logps=jnp.zeros((rows, max_new_tokens), jnp.float32),
        model_logps=jnp.zeros((rows, max_new_tokens), jnp.float32),
    )

    def decode_step(carry: _Carry) -> _Carry:
        hidden, patient_cache = patient_decoder.hidden_states(
            carry.fed[:, None], attention_mask=carry.fed_real[:, None], cache=carry.patient_cache)
        logits = _constrain(patient_decoder.logits(hidden[:, -1]), mesh, row_spec)
        return choose(carry._replace(patient_cache=patient_cache), logits)

    carry = jax.lax.while_loop(lambda c: (c.step < max_new_tokens) & ~jnp.all(c.done), decode_step, start)

    def rows_sharded(x):
        return _constrain(x, mesh, _batch_spec(mesh, x.ndim))

    return Rollout(
        tokens=rows_sharded(carry.tokens),
        response_mask=rows_sharded(carry.response_mask),
        lengths=rows_sharded(jnp.sum(carry.response_mask, axis=1, dtype=jnp.int32)),
        stopped=rows_sharded(jnp.any(carry.response_mask & stop_mask[carry.tokens], axis=1)),
        sampling_logps=rows_sharded(carry.sampling_logps),
        model_logps=rows_sharded(carry.model_logps),
        guide_logps=jnp.zeros((0, rows, max_new_tokens), jnp.float32),
        prompt_tokens=tokens,
        prompt_mask=mask,
    )


class _RewardMember(NamedTuple):
    """The reward model as ``_args_generate`` takes it (as the engine's ``_Member``): stacked and unstacked."""

    graphdefs: tuple[Any, Any]
    states: tuple[tuple[nnx.State, nnx.State], tuple[nnx.State, nnx.State]]
    config: Any


def _split_reward_model(reward_model: RewardModel, mesh: Mesh | None) -> _RewardMember:
    """The reward model in inference mode, placed on ``mesh`` with the training rules, stacked and unstacked."""
    model = nnx.view(reward_model, deterministic=True, raise_if_not_found=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if mesh is not None:
        params = jax.device_put(params, named_shardings(params, mesh))
        rest = jax.device_put(rest, NamedSharding(mesh, PartitionSpec()))
    return _RewardMember(*_stacked_and_unstacked(graphdef, params, rest), reward_model.backbone.config)


def _check_k(k) -> int:
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
        raise ValueError(f"ARGS: k (the candidates per step) must be an int >= 1, got {k!r}")
    return int(k)


def _check_weight(weight) -> float:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(float(weight)):
        raise ValueError(f"ARGS: weight (of the reward) must be a finite number, got {weight!r}")
    return float(weight)


class ArgsSampler:
    """ARGS decoding (reward-guided search): the patient's top-k tokens re-ranked by a reward model.

    Formula: for ``v ∈ top_k(z_t)`` with ``z_t`` the patient's next-token logits after ``[x, y_<t]``,
    ``s(v) = z_t(v) + w · r([x, y_<t, v])``; ``mode="greedy"`` takes ``argmax_v s(v)`` (ARGS-greedy),
    ``mode="sample"`` draws ``v ~ softmax(s / T)`` over the ``k`` candidates (ARGS-stochastic). ``r`` is the
    reward model's head on its pooled final hidden states (its own pooling, last token or mean), times
    ``reward_gain`` (and combined with ``objective_weights`` for a multi-objective head).

    Example::

        reward_model, info = models.load_reward_model("runs/sentiment/reward")
        args = ArgsSampler(patient, reward_model, k=10, weight=1.5, reward_gain=info["gain"])
        out = args.generate(prompt_ids, key=jax.random.key(0),
                            params=SamplingParams(max_new_tokens=64))        # mode="greedy"
        out.tokens, out.response_mask, out.model_logps                       # [B, 64]: the patient's log-probs

    Args:
        patient: the frozen causal LM proposing the candidates (``LlamaForCausalLM``, ``GPT2LMHeadModel``).
        reward_model: a :class:`~jaxalign.models.RewardModel` on a Llama-family or GPT-2 trunk sharing the
            patient's vocabulary (tokenizer), pooling ``last`` or ``mean``.
        k: candidates per step, ``1 ≤ k ≤ V`` (a static shape: each value compiles once). The paper's 10.
        weight: the reward's weight ``w`` (finite; negative steers away from the reward). The paper's 1.5.
        reward_gain: multiplies the head's raw output, one number or one per objective: pass a saved reward
            model's ``info["gain"]`` so that ``w`` weighs the normalised reward. Its ``bias`` is the same for
            every candidate of a row and changes nothing.
        objective_weights: for a multi-objective head, the weights combining its ``N`` objectives (required
            there, e.g. ``info["dimension_weights"]``); None for a scalar head.
        mesh: a ``(data, fsdp, tensor)`` mesh: parameters placed with the training rules, prompt rows split over
            ``data × fsdp`` (as :class:`~jaxalign.rollout.Sampler`). None: the models run where their arrays are.
        pad_token_id: written after a row ends; default the patient config's pad id, else its first EOS, else 0.
        length_buckets, batch_buckets: as :class:`~jaxalign.rollout.Sampler`.

    Raises:
        ValueError: ``k`` not an int in ``[1, V]``, ``weight`` or a gain not finite, the vocabularies differ,
            objective weights missing for a multi-objective head (or given for a scalar one, or of the wrong
            length), or a pooling other than ``last`` / ``mean``.
        TypeError: ``reward_model`` is not a :class:`~jaxalign.models.RewardModel`, or ``patient`` not a causal LM.

    References:
        Khanov et al. 2024, "ARGS: Alignment as Reward-Guided Search", arXiv 2402.01694, Eq. 1 (the score) and
        its greedy / stochastic token selection. Defaults ``k = 10``, ``w = 1.5``: the authors' released run
        configuration (``greedy_rm_1.5.jsonl``: ``rm_weight 1.5, topk 10``).

    Notes:
        Deviations from the public code (``argsearch.py``, ``ARGS.generate_step``):

        - **Batched**: left-padded prompt batches and ``n`` samples per prompt; the public code decodes one
          unpadded prompt at a time (``method="topk"`` asserts a batch of 1).
        - **Caches**: the public code also decodes with ``past_key_values`` (transformers feeds only the new
          tokens), but its reward model's cache holds the chosen prefix **repeated ``k`` times** (``k`` rows,
          reordered with ``_reorder_cache`` after every step). Here each row keeps one prefix cache plus ``k``
          scratch slots; the candidates run as one block masked to see the prefix and themselves, and the chosen
          one's keys/values are moved into place: the same reward values, ``1/k`` of the cache memory.
        - **Stopping**: the public loop always runs ``max_new_token`` steps and never stops at EOS (the run script
          strips special tokens afterwards). Here a row ends after a token of ``params.stop_token_ids`` (None:
          the patient's EOS ids), as in :class:`~jaxalign.rollout.Sampler`; ``stop_token_ids=()`` gives the public
          behaviour.
        - **Temperature**: ARGS-stochastic divides the scores by ``params.temperature`` (must be > 0). The public
          ``generate`` defaults to 0.7 and its run script never changes it; ``SamplingParams`` defaults to 1.
          The draw is an inverse CDF with one uniform per row and step (:func:`~jaxalign.rollout.inverse_cdf`,
          keys as the Sampler's), not ``torch.multinomial``.
        - **Pooling**: the public reward model is a transformers ``AutoModelForSequenceClassification``, which
          reads the last token. Here the reward model's own pooling applies; ``mean`` (the embedded sentiment
          preset's probe) averages the final hidden states of prompt, response so far and candidate.
        - **Scores** use the patient's raw logits, as the public code does (``mout.logits[:, -1]``); log-probs
          differ from them by a per-row constant and would give the same choices and probabilities.
        - ``params.top_k`` / ``top_p`` / ``min_p`` are refused (the candidates are the patient's top ``k``);
          ``mode="greedy"`` ignores ``params.temperature``. The released configuration runs the public
          ``greedy_large`` method, which scores the candidates in chunks (of 5) to bound the memory of the
          repeated caches and keeps the first best, i.e. the same choice as ARGS-greedy here.
        - A prompt plus ``max_new_tokens`` beyond a model's positions raises a ``ValueError``; the public code
          prints a message and returns None.
    """

    def __init__(self, patient: nnx.Module, reward_model: RewardModel, *, k: int = DEFAULT_K,
                 weight: float = DEFAULT_WEIGHT, reward_gain: float | Sequence[float] = 1.0,
                 objective_weights: Sequence[float] | None = None, mesh: Mesh | None = None,
                 pad_token_id: int | None = None, length_buckets: Sequence[int] | None = None,
                 batch_buckets: Sequence[int] | None = None):
        if not isinstance(reward_model, RewardModel):
            raise TypeError(f"ArgsSampler needs a jaxalign.models.RewardModel as reward_model, got "
                            f"{type(reward_model).__name__}")
        pooling = reward_model.reward_head.pooling
        if pooling not in POOLINGS:
            raise ValueError(f"ArgsSampler supports the reward poolings {POOLINGS}, got {pooling!r}")
        config = getattr(patient, "config", None)
        vocab, reward_vocab = getattr(config, "vocab_size", None), reward_model.backbone.config.vocab_size
        if vocab is not None and reward_vocab != vocab:
            raise ValueError(
                f"the reward model has a vocabulary of {reward_vocab} tokens but the patient has {vocab}: ARGS scores "
                "the patient's candidate tokens with the reward model, so both must share one vocabulary (the same "
                "tokenizer)")
        self.k = self._checked_k(k, reward_vocab)
        self.weight = _check_weight(weight)
        self.reward_scale = self._scale(reward_model.reward_head.num_objectives, reward_gain, objective_weights)
        self._patient = _split(patient, mesh)  # raises TypeError unless a causal LM
        self._reward = _split_reward_model(reward_model, mesh)
        self.pooling = pooling
        self.mesh = mesh
        self.length_buckets = tuple(length_buckets) if length_buckets else None
        self.batch_buckets = tuple(batch_buckets) if batch_buckets else None
        config = self.config
        if pad_token_id is None:
            pad_token_id = config.pad_token_id if config.pad_token_id is not None else (
                config.eos_token_ids[0] if config.eos_token_ids else 0)
        self.pad_token_id = int(pad_token_id)

    @property
    def config(self):
        """The patient's config."""
        return self._patient.config

    @staticmethod
    def _checked_k(k, vocab: int) -> int:
        k = _check_k(k)
        if k > vocab:
            raise ValueError(f"ARGS: k={k} candidates exceed the vocabulary of {vocab} tokens")
        return k

    @staticmethod
    def _scale(objectives: int | None, gain, objective_weights) -> np.ndarray:
        """The factor of the head's output: ``gain`` (scalar head) or ``gain_i · weight_i`` per objective."""
        gain = np.asarray(gain, np.float64)
        if not np.all(np.isfinite(gain)):
            raise ValueError(f"ARGS: reward_gain must be finite, got {gain.tolist()!r}")
        if objectives is None:
            if objective_weights is not None:
                raise ValueError("ARGS: objective_weights are for a multi-objective reward head; this one is scalar")
            if gain.shape != ():
                raise ValueError(f"ARGS: reward_gain must be one number for a scalar reward head, got {gain.tolist()}")
            return np.float32(gain)
        if objective_weights is None:
            raise ValueError(f"ARGS: the reward head has {objectives} objectives: pass objective_weights= (one per "
                             "objective) to combine them into one reward")
        weights = np.asarray(objective_weights, np.float64)
        if weights.shape != (objectives,) or not np.all(np.isfinite(weights)):
            raise ValueError(f"ARGS: objective_weights must be {objectives} finite numbers, got {objective_weights!r}")
        if gain.shape not in ((), (objectives,)):
            raise ValueError(f"ARGS: reward_gain must be one number or {objectives}, got {gain.tolist()}")
        return (gain * weights).astype(np.float32)

    def _check_positions(self, prompt_mask: np.ndarray, max_new_tokens: int) -> None:
        longest = int(prompt_mask.sum(axis=1).max()) + max_new_tokens
        for name, config in (("patient", self.config), ("reward model", self._reward.config)):
            if longest > config.max_position_embeddings:
                raise ValueError(f"the longest prompt plus max_new_tokens is {longest} tokens, beyond the "
                                 f"{config.max_position_embeddings} positions of the {name} ({config.architecture})")

    def generate(
        self,
        prompts: np.ndarray | Sequence[Sequence[int]],
        prompt_mask: np.ndarray | None = None,
        *,
        key: Array,
        params: SamplingParams = SamplingParams(),
        mode: str = "greedy",
        weight: float | None = None,
        k: int | None = None,
    ) -> Rollout:
        """Decode ``params.n`` responses to every prompt with ARGS.

        Args:
            prompts: ``[B, P]`` left-padded token ids (with ``prompt_mask``; None means no padding), or a list of
                token-id lists (padded here). A row without any real token yields an empty response.
            prompt_mask: ``[B, P]`` 1 on real tokens.
            key: a ``jax.random`` key (``mode="sample"``: sample ``j`` of prompt ``b`` draws step ``t`` from
                ``fold_in(fold_in(fold_in(key, b), j), t)``, as the Sampler; ignored by ``greedy``).
            params: :class:`SamplingParams`: ``max_new_tokens``, ``n``, ``stop_token_ids`` and, for ``sample``,
                ``temperature`` (> 0); ``top_k`` / ``top_p`` / ``min_p`` must stay off.
            mode: ``"greedy"`` (ARGS-greedy) or ``"sample"`` (ARGS-stochastic).
            weight: this call's reward weight (default the sampler's); traced, so changing it does not recompile.
            k: this call's candidate count (default the sampler's); another value compiles another program.

        Returns:
            A :class:`~jaxalign.rollout.Rollout` of ``R = B·n`` rows: ``tokens`` / ``response_mask`` / ``lengths``
            / ``stopped`` ``[R, N]`` / ``[R]``; ``sampling_logps`` ``[R, N]`` the log-probability of each token
            under ``softmax(s / T)`` over the candidates (0 for ``greedy``); ``model_logps`` ``[R, N]`` the
            patient's ``log softmax(z_t)`` at the token (for KL to the patient); ``guide_logps`` ``[0, R, N]``;
            ``hidden_states`` None.

        Raises:
            ValueError: an unknown ``mode``, ``temperature = 0`` with ``sample``, a top-k/top-p/min-p filter,
                bad ``weight`` or ``k``, prompts that are not left-padded, beyond the last length bucket or a
                model's positions, or stop ids outside the vocabulary.
        """
        if mode not in MODES:
            raise ValueError(f"ARGS: mode must be one of {MODES} (ARGS-greedy, ARGS-stochastic), got {mode!r}")
        greedy = mode == "greedy"
        if not greedy and params.temperature == 0:
            raise ValueError("ARGS: mode='sample' needs SamplingParams.temperature > 0 (use mode='greedy' for argmax)")
        if params.top_k or params.top_p != 1.0 or params.min_p:
            raise ValueError(
                "ARGS: SamplingParams.top_k / top_p / min_p are not applied: the candidates are the patient's top k "
                f"(k={self.k if k is None else k}); leave them at 0 / 1 / 0")
        weight = self.weight if weight is None else _check_weight(weight)
        k = self.k if k is None else self._checked_k(k, self.config.vocab_size)
        tokens, mask = checked_prompts(prompts, prompt_mask, self.pad_token_id)
        self._check_positions(mask, params.max_new_tokens)
        config = self.config
        stop_mask = params.stop_mask(config.vocab_size, config.eos_token_ids)

        batch = tokens.shape[0]
        tokens, mask = bucketed_prompts(tokens, mask, mesh=self.mesh, batch_buckets=self.batch_buckets,
                                        length_buckets=self.length_buckets, pad_token_id=self.pad_token_id)
        rows = tokens.shape[0]
        out = _args_generate(
            (self._patient.states, self._reward.states), tokens, mask, key, np.float32(weight),
            np.float32(params.temperature if not greedy else 1.0), self.reward_scale, stop_mask,
            np.int32(self.pad_token_id), graphdefs=(self._patient.graphdefs, self._reward.graphdefs),
            max_new_tokens=params.max_new_tokens, n=params.n, k=k, greedy=greedy, mesh=self.mesh,
        )
        return out if rows == batch else out.take_rows(batch * params.n)
