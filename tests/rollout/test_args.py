"""ARGS decoding (arXiv 2402.01694): the cached, batched loop against a reference that recomputes both models on
every whole candidate sequence (the paper's procedure), its identities with the patient's greedy decoding, a
reward that pulls towards a known token, reproducible sampling, and its errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from jaxalign.models import LlamaForCausalLM, ModelConfig, RewardModel, load_hf
from jaxalign.rollout import ArgsSampler, Sampler, SamplingParams
from tests.rollout.conftest import PROMPTS, N, V

FREE = SamplingParams(max_new_tokens=N, stop_token_ids=())  # never stops early: every step is compared
GREEDY = SamplingParams(max_new_tokens=N, temperature=0.0, stop_token_ids=())
K = 6  # one compiled loop per reward model is shared by most tests


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, mask):
    # Not nnx.jit: it writes its output state back into the module (new arrays), and the samplers built from the
    # module afterwards would compile their loops again.
    return nnx.merge(graphdef, state)(tokens, attention_mask=mask)


def _patient_logits(model, tokens, mask):
    return _forward(*nnx.split(model), tokens, mask)[0]


def _rewards(model, tokens, mask):
    return _forward(*nnx.split(model), tokens, mask)


def _right_padded(sequences: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(sequences), width), np.int32)
    mask = np.zeros((len(sequences), width), np.int32)
    for row, sequence in enumerate(sequences):
        tokens[row, :len(sequence)] = sequence
        mask[row, :len(sequence)] = 1
    return tokens, mask


def _width(prompts, steps: int) -> int:
    """One padded width for every call of the reference (one compiled forward per model)."""
    return max(len(p) for p in prompts) + steps + 1


def reference_args(patient, reward_model, prompts, *, k: int, weight: float, steps: int, temperature: float = 1.0,
                   reward_gain=1.0, objective_weights=None,
                   forced: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ARGS the slow way, one unpadded prompt at a time: at every step run the patient on the whole sequence, take
    its top-k, run the reward model on every whole ``sequence + [candidate]`` and pick the best score
    (``r = gain · head`` or, with ``objective_weights``, ``Σ_i w_i · gain_i · head_i``).

    With ``forced [B, steps]`` the given tokens are taken instead (each must be a candidate) to read off their
    ARGS probabilities. Returns ``(tokens, patient log-probs, log softmax(scores / T) at the tokens)``, each
    ``[B, steps]``.
    """
    width = _width(prompts, steps)
    tokens_out, model_logps, args_logps = [], [], []
    for row, prompt in enumerate(prompts):
        sequence, row_logps, row_args = [int(t) for t in prompt], [], []
        for step in range(steps):
            z = np.asarray(_patient_logits(patient, *_right_padded([sequence], width)))[0, len(sequence) - 1]
            candidates = np.argsort(-z, kind="stable")[:k]  # ties: the lower id first, as lax.top_k
            r = np.asarray(_rewards(reward_model, *_right_padded([sequence + [int(v)] for v in candidates], width)))
            r = r * np.float32(reward_gain) if objective_weights is None else r @ (
                np.asarray(reward_gain, np.float32) * np.asarray(objective_weights, np.float32))
            scores = z[candidates] + np.float32(weight) * r
            if forced is None:
                choice = int(np.argmax(scores))
            else:
                (where,) = np.flatnonzero(candidates == forced[row, step])
                choice = int(where)
            token = int(candidates[choice])
            z64, x = z.astype(np.float64), scores.astype(np.float64) / temperature
            row_logps.append(z64[token] - z64.max() - np.log(np.exp(z64 - z64.max()).sum()))
            row_args.append(x[choice] - x.max() - np.log(np.exp(x - x.max()).sum()))
            sequence.append(token)
        tokens_out.append(sequence[len(prompt):])
        model_logps.append(row_logps)
        args_logps.append(row_args)
    return np.asarray(tokens_out), np.asarray(model_logps), np.asarray(args_logps)


@pytest.fixture(scope="module")
def patient(llama):
    return llama[0]


@pytest.fixture(scope="module")
def patient_greedy(patient):
    return Sampler(patient).generate(PROMPTS, key=jax.random.key(0), params=GREEDY)


@pytest.fixture(scope="module")
def reward_models(checkpoints):
    """``{name: (reward model, ArgsSampler options)}`` on trunks other than the patient's: a tied 3-layer Llama
    (last token, a gain), a Mistral with a sliding window of 4 (mean, two objectives combined with weights of
    both signs) and GPT-2 (mean)."""
    def build(arch, pooling, seed, **head):
        return RewardModel(load_hf(checkpoints(arch, seed=seed)[0]), pooling=pooling, rngs=nnx.Rngs(seed), **head)

    return {"llama_last": (build("llama_tied_3_layers", "last", 1), dict(reward_gain=2.0)),
            "mistral_window_mean": (build("mistral_window", "mean", 2, num_objectives=2),
                                    dict(reward_gain=[1.0, 2.0], objective_weights=[0.7, -0.4])),
            "gpt2_mean": (build("gpt2", "mean", 3), {})}


@pytest.mark.parametrize("name", ["llama_last", "mistral_window_mean", "gpt2_mean"])
def test_greedy_equals_recomputing_every_candidate_sequence(patient, reward_models, patient_greedy, name):
    reward_model, options = reward_models[name]
    k, weight = K, 3.0
    # GPT-2's run goes through the mesh code paths (parameter placement, sharding constraints) on one device.
    one_device = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    mesh = one_device if name == "gpt2_mean" else None
    args = ArgsSampler(patient, reward_model, k=k, weight=weight, mesh=mesh, **options)
    out = args.generate(PROMPTS, key=jax.random.key(0), params=FREE)
    tokens, model_logps, _ = reference_args(patient, reward_model, PROMPTS, k=k, weight=weight, steps=N, **options)
    np.testing.assert_array_equal(np.asarray(out.tokens), tokens)
    np.testing.assert_allclose(np.asarray(out.model_logps), model_logps, atol=1e-5)
    assert np.all(np.asarray(out.response_mask)) and np.all(np.asarray(out.lengths) == N)
    assert np.all(np.asarray(out.sampling_logps) == 0.0), "ARGS-greedy draws from a point mass"
    assert not np.array_equal(tokens, np.asarray(patient_greedy.tokens)), "the reward should change some choice"
    # A prompt's n samples share its prefill (both models' caches and the pooled state copied row by row):
    # greedy gives each prompt's answer n times over, in order.
    twice = args.generate(PROMPTS, key=jax.random.key(0), params=SamplingParams(max_new_tokens=N, stop_token_ids=(),
                                                                                n=2))
    np.testing.assert_array_equal(np.asarray(twice.tokens), np.repeat(tokens, 2, axis=0))
    np.testing.assert_allclose(np.asarray(twice.model_logps), np.repeat(model_logps, 2, axis=0), atol=1e-5)


def test_weight_zero_is_the_patients_greedy_decoding(patient, reward_models, patient_greedy):
    reward_model, options = reward_models["llama_last"]
    args = ArgsSampler(patient, reward_model, k=K, weight=0.0, **options)
    out = args.generate(PROMPTS, key=jax.random.key(0), params=FREE)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(patient_greedy.tokens))
    # The patient's prefill ends one column earlier than the engine's (float32 rounding of a cached step).
    np.testing.assert_allclose(np.asarray(out.model_logps), np.asarray(patient_greedy.model_logps), atol=1e-5)
    # Stopping as the engine does: the stop token is part of the response, then padding.
    stop = int(patient_greedy.tokens[0, 3])
    stopping = SamplingParams(max_new_tokens=N, stop_token_ids=(stop,))
    out = args.generate(PROMPTS, key=jax.random.key(0), params=stopping)
    greedy_stopping = SamplingParams(max_new_tokens=N, temperature=0.0, stop_token_ids=(stop,))
    expected = Sampler(patient).generate(PROMPTS, key=jax.random.key(0), params=greedy_stopping)
    for field in ("tokens", "response_mask", "lengths", "stopped"):
        np.testing.assert_array_equal(np.asarray(getattr(out, field)), np.asarray(getattr(expected, field)), field)
    assert bool(out.stopped[0]) and int(out.lengths[0]) <= 4


def test_one_candidate_is_the_patients_greedy_decoding_whatever_the_weight(patient, reward_models, patient_greedy):
    reward_model, options = reward_models["mistral_window_mean"]
    args = ArgsSampler(patient, reward_model, k=1, **options)
    for weight in (0.5, -4.0, 1e4):
        out = args.generate(PROMPTS, key=jax.random.key(0), params=FREE, weight=weight)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(patient_greedy.tokens))


def _token_lovers(checkpoints, target: int) -> dict[str, RewardModel]:
    """Reward models (last, mean) whose trunk passes each token's normed embedding through (attention and MLP
    outputs zeroed, final norm scale 1), with the head ``u = normed(e_target)``: ``h_v · u`` is largest at
    ``v = target`` (every normed embedding has the same length), so the reward of a sequence grows with a target
    token at its end (last) or anywhere (mean)."""
    lm = load_hf(checkpoints("llama", seed=0)[0])  # a copy of the patient's weights, changed below
    layers, trunk = lm.model.layers, lm.model
    layers.self_attn.o_proj.kernel[...] = jnp.zeros_like(layers.self_attn.o_proj.kernel[...])
    layers.mlp.down_proj.kernel[...] = jnp.zeros_like(layers.mlp.down_proj.kernel[...])
    trunk.norm.scale[...] = jnp.ones_like(trunk.norm.scale[...])
    embedding = trunk.embed_tokens.embedding[...][target]
    lovers = {}
    for pooling in ("last", "mean"):
        lovers[pooling] = RewardModel(lm, pooling=pooling, rngs=nnx.Rngs(0))
        lovers[pooling].reward_head.kernel[...] = (embedding / jnp.linalg.norm(embedding))[:, None]
    return lovers


def test_a_heavy_reward_for_one_token_steers_towards_it(checkpoints, patient, patient_greedy):
    # The patient's second choice for prompt 0's first token.
    logits = _patient_logits(patient, *_right_padded([PROMPTS[0]], _width(PROMPTS, N)))
    second = int(np.argsort(-np.asarray(logits[0, len(PROMPTS[0]) - 1]), kind="stable")[1])
    lovers = _token_lovers(checkpoints, second)
    out = ArgsSampler(patient, lovers["last"], k=3, weight=1e3).generate(
        PROMPTS, key=jax.random.key(0), params=FREE)
    assert int(patient_greedy.tokens[0, 0]) != second
    assert int(out.tokens[0, 0]) == second, "the target is a candidate at the first step: the reward picks it"
    assert np.sum(np.asarray(out.tokens) == second) > np.sum(np.asarray(patient_greedy.tokens) == second)
    # With every token a candidate, the reward decides everything (mean pooling: the candidate's share of the mean).
    everything = ArgsSampler(patient, lovers["mean"], k=V, weight=1e3).generate(
        PROMPTS, key=jax.random.key(0), params=FREE)
    assert np.all(np.asarray(everything.tokens) == second)


@pytest.mark.parametrize("name", ["llama_last", "gpt2_mean"])  # mean pooling: the samples' pooled state is copied
def test_sampling_is_reproducible_and_its_logps_are_the_args_distribution(patient, reward_models, name):
    reward_model, options = reward_models[name]
    k, weight, temperature = K, 2.0, 0.7
    args = ArgsSampler(patient, reward_model, k=k, weight=weight, **options)
    params = SamplingParams(max_new_tokens=N, temperature=temperature, stop_token_ids=(), n=2)
    first = args.generate(PROMPTS, key=jax.random.key(3), params=params, mode="sample")
    again = args.generate(PROMPTS, key=jax.random.key(3), params=params, mode="sample")
    other = args.generate(PROMPTS, key=jax.random.key(4), params=params, mode="sample")
    np.testing.assert_array_equal(np.asarray(first.tokens), np.asarray(again.tokens))
    np.testing.assert_array_equal(np.asarray(first.sampling_logps), np.asarray(again.sampling_logps))
    assert not np.array_equal(np.asarray(first.tokens), np.asarray(other.tokens))
    assert first.tokens.shape == (2 * len(PROMPTS), N)
    # Each token's log-probability under softmax((logit + w·r) / T) over the candidates, recomputed the slow way.
    prompts = [prompt for prompt in PROMPTS for _ in range(2)]
    _, model_logps, args_logps = reference_args(patient, reward_model, prompts, k=k, weight=weight, steps=N,
                                                temperature=temperature, forced=np.asarray(first.tokens), **options)
    np.testing.assert_allclose(np.asarray(first.sampling_logps), args_logps, atol=1e-4)
    np.testing.assert_allclose(np.asarray(first.model_logps), model_logps, atol=1e-5)
    assert np.all(np.asarray(first.sampling_logps) < 0)


def test_bad_inputs_are_refused(patient, reward_models):
    reward_model, _ = reward_models["llama_last"]
    for k, message in ((0, "k .* must be an int >= 1"), (-3, "must be an int >= 1"), (2.0, "must be an int"),
                       (True, "must be an int"), (V + 1, f"exceed the vocabulary of {V}")):
        with pytest.raises(ValueError, match=message):
            ArgsSampler(patient, reward_model, k=k)
    for weight in (float("nan"), float("inf"), -float("inf"), "1.5", None):
        with pytest.raises(ValueError, match="weight .* must be a finite number"):
            ArgsSampler(patient, reward_model, weight=weight)
    other = ModelConfig(architecture="llama", vocab_size=53, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                        head_dim=8, intermediate_size=32)
    # Shapes only (nnx.eval_shape): the checks come before any array is touched.
    with pytest.raises(ValueError, match="vocabulary of 53 tokens but the patient has 97"):
        ArgsSampler(patient, nnx.eval_shape(lambda: RewardModel(LlamaForCausalLM(other, rngs=nnx.Rngs(0)),
                                                                rngs=nnx.Rngs(0))))
    with pytest.raises(TypeError, match="RewardModel"):
        ArgsSampler(patient, patient)
    two_objectives = nnx.eval_shape(lambda: RewardModel(patient, num_objectives=2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="2 objectives: pass objective_weights"):
        ArgsSampler(patient, two_objectives)
    with pytest.raises(ValueError, match="objective_weights must be 2 finite numbers"):
        ArgsSampler(patient, two_objectives, objective_weights=[1.0])
    with pytest.raises(ValueError, match="reward_gain must be finite"):
        ArgsSampler(patient, reward_model, reward_gain=float("nan"))

    args = ArgsSampler(patient, reward_model, k=2)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="mode must be one of"):
        args.generate(PROMPTS, key=key, params=FREE, mode="beam")
    with pytest.raises(ValueError, match="temperature > 0"):
        args.generate(PROMPTS, key=key, params=GREEDY, mode="sample")
    with pytest.raises(ValueError, match="top_k / top_p / min_p are not applied"):
        args.generate(PROMPTS, key=key, params=SamplingParams(top_p=0.9))
    with pytest.raises(ValueError, match="weight .* must be a finite number"):
        args.generate(PROMPTS, key=key, params=FREE, weight=float("nan"))
    with pytest.raises(ValueError, match=f"exceed the vocabulary of {V}"):
        args.generate(PROMPTS, key=key, params=FREE, k=V + 1)
    with pytest.raises(ValueError, match="not left-padded"):
        args.generate(np.ones((1, 4), np.int32), np.asarray([[1, 1, 0, 0]]), key=key, params=FREE)
    with pytest.raises(ValueError, match="positions of the reward model"):
        ArgsSampler(patient, reward_models["gpt2_mean"][0]).generate(PROMPTS, key=key,
                                                                  params=SamplingParams(max_new_tokens=60))
