"""Less work, same numbers: pairs with their prompt run once (shared-prompt rows) and the LM head only at
completion targets (target slots) give the log-probs, losses and gradients of the plain ``[B, 2, T]`` batches."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import data as jdata
from jaxalign.methods import common, dpo, reward, sft
from jaxalign.models import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    LoRAConfig,
    LoRALinear,
    ModelConfig,
    RewardModel,
    apply_lora,
    scoring,
)

V = 53
TOL = dict(rtol=1e-5, atol=1e-5)
LLAMA = ModelConfig(architecture="llama", vocab_size=V, d_model=24, n_layers=2, n_heads=3, n_kv_heads=1, head_dim=8,
                    intermediate_size=40)
GPT2 = GPT2Config(vocab_size=V, d_model=24, n_layers=2, n_heads=3, intermediate_size=40, max_position_embeddings=64)
# (prompt length, chosen completion, rejected completion); the last pair's prompts differ in their last token.
SHAPES = [(5, 3, 7), (1, 6, 2), (9, 4, 4), (3, 1, 8), (6, 5, 3)]


def pairs_dataset(seed: int = 0, *, split_last_prompt: bool = True) -> jdata.TokenizedDataset:
    rng = np.random.default_rng(seed)
    examples = []
    for index, (prompt, chosen, rejected) in enumerate(SHAPES):
        shared = rng.integers(1, V, prompt)
        sides = []
        for length in (chosen, rejected):
            ids = np.concatenate([shared, rng.integers(1, V, length)]).astype(np.int32)
            sides.append(jdata.TokenSequence(ids, prompt))
        if split_last_prompt and index == len(SHAPES) - 1:
            sides[1].ids[prompt - 1] = (sides[0].ids[prompt - 1] + 1) % V
        examples.append(jdata.TokenizedExample(sequences=tuple(sides), values={"margin": float(index)}))
    return jdata.TokenizedDataset(kind="preference", layout=(2,), examples=examples, pad_token_id=0,
                                  value_keys=("margin",))


def batches(dataset, *, batch_size=6, **layout):
    # One batch of the five pairs and a padding row (example_mask 0): one compiled shape per layout.
    iterator = jdata.BatchIterator(dataset.batched_as(**layout), batch_size=batch_size, shuffle=False,
                                   drop_last=False, num_epochs=1)
    return [jax.tree.map(jnp.asarray, dict(batch)) for batch in iterator]


LAYOUTS = {"plain": {}, "targets": {"compact_targets": True},
           "shared": {"share_prompts": True, "compact_targets": True}}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    config = LLAMA if request.param == "llama" else GPT2
    cls = LlamaForCausalLM if request.param == "llama" else GPT2LMHeadModel
    return cls(config, rngs=nnx.Rngs(0))


def test_shared_rows_hold_the_prompt_once():
    dataset = pairs_dataset()
    (first, _), (plain, _) = batches(dataset, batch_size=3, **LAYOUTS["shared"]), batches(dataset, batch_size=3)
    prompt, chosen, rejected = SHAPES[0]
    row = np.asarray(first["input_ids"][0])
    np.testing.assert_array_equal(row[:prompt + chosen], plain["input_ids"][0, 0, :prompt + chosen])
    np.testing.assert_array_equal(row[prompt + chosen:prompt + chosen + rejected],
                                  plain["input_ids"][0, 1, prompt:prompt + rejected])
    np.testing.assert_array_equal(first["branch_ids"][0, :prompt + chosen + rejected],
                                  [0] * prompt + [1] * chosen + [2] * rejected)
    np.testing.assert_array_equal(first["positions"][0, prompt + chosen:prompt + chosen + rejected],
                                  np.arange(prompt, prompt + rejected))  # continuing from the prompt's end
    # rejected's first target is predicted from the prompt's last token, not from chosen's last
    assert int(first["source_slots"][0, 1, 0]) == prompt - 1
    assert first["input_ids"].shape[1] < 2 * plain["input_ids"].shape[2]
    last = batches(dataset, batch_size=3, **LAYOUTS["shared"])[1]  # the split prompt: only its common prefix is shared
    real = np.asarray(last["attention_mask"][1]).astype(bool)
    assert int(np.sum(real & (np.asarray(last["branch_ids"][1]) == 0))) == SHAPES[-1][0] - 1


@pytest.mark.parametrize("layout", ["targets", "shared"])
def test_sequence_logps_equal_the_plain_batches(model, layout):
    dataset = pairs_dataset()
    fn = jax.jit(lambda batch: common.sequence_logps(model, batch, 4))
    for plain, other in zip(batches(dataset), batches(dataset, **LAYOUTS[layout]), strict=True):
        (want, want_n), (got, got_n) = fn(plain), fn(other)
        valid = np.asarray(plain["example_mask"]).astype(bool)
        np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], **TOL)
        np.testing.assert_array_equal(np.asarray(got_n)[valid], np.asarray(want_n)[valid])


@pytest.mark.parametrize("layout", ["targets", "shared"])
def test_the_head_chunks_count_positions_per_sequence(monkeypatch, layout):
    # A shared row gathers both sequences' K targets; its chunks hold as many logits as the unshared rows' do.
    llama = LlamaForCausalLM(LLAMA, rngs=nnx.Rngs(0))
    batch = batches(pairs_dataset(), **LAYOUTS[layout])[0]
    k = batch["target_slots"].shape[-1]
    chunked, chunk_positions = [], scoring.map_position_chunks

    def recorded(fn, params, arrays, *, chunk_size):  # (positions of a row, positions of its chunks)
        chunked.append((arrays[0].shape[1], chunk_size))
        return chunk_positions(fn, params, arrays, chunk_size=chunk_size)

    monkeypatch.setattr(scoring, "map_position_chunks", recorded)
    sequences = 2 if layout == "shared" else 1
    for chunk_size in (k, k - 1):
        chunked.clear()
        common.sequence_logps(llama, batch, chunk_size)
        assert chunked == ([] if chunk_size == k else [(sequences * k, sequences * chunk_size)])


def _loss_and_grads(objective, model, batch, **refs):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        (total, count), _ = objective(nnx.merge(graphdef, params, rest), batch, key=None, **refs)
        return total / count

    return jax.jit(jax.value_and_grad(loss))(params)


def _assert_same(got, want):
    np.testing.assert_allclose(got[0], want[0], **TOL)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize(("loss_type", "layout"), [("sigmoid", "targets"), ("sigmoid", "shared"),
                                                   ("simpo", "shared"), ("orpo", "shared")])
def test_pairwise_losses_and_gradients_equal_the_plain_batches(model, loss_type, layout):
    dataset = pairs_dataset()
    reference_free = loss_type in dpo.REFERENCE_FREE_LOSSES
    objective = dpo.dpo_objective(loss_type=loss_type, reference="none" if reference_free else "model",
                                  chunk_size=3)
    # A reference that differs from the policy, so the loss is not ln 2 whatever the log-probs.
    refs = {} if reference_free else {"ref": type(model)(model.config, rngs=nnx.Rngs(7))}
    for plain, other in zip(batches(dataset), batches(dataset, **LAYOUTS[layout]), strict=True):
        _assert_same(_loss_and_grads(objective, model, other, **refs),
                     _loss_and_grads(objective, model, plain, **refs))


def test_lora_base_reference_and_precomputed_reference_equal_the_plain_batches():
    model = LlamaForCausalLM(LLAMA, rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj")), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(5)
    for _, module in nnx.iter_modules(model):  # non-zero adapters: the policy differs from its LoRA base
        if isinstance(module, LoRALinear):
            module.lora_b[...] = jnp.asarray(rng.normal(0, 0.3, size=module.lora_b[...].shape), jnp.float32)
    dataset = pairs_dataset(1)
    objective = dpo.dpo_objective(reference="lora_base", chunk_size=None)
    for plain, shared in zip(batches(dataset), batches(dataset, **LAYOUTS["shared"]), strict=True):
        _assert_same(_loss_and_grads(objective, model, shared), _loss_and_grads(objective, model, plain))
    config = jdata.DataConfig("unused.jsonl", batch_size=2, shuffle=False)
    want = dpo.precompute_reference_logps(model, dataset, config, chunk_size=2)
    got = dpo.precompute_reference_logps(model, dataset.batched_as(share_prompts=True, compact_targets=True), config,
                                         chunk_size=2)
    np.testing.assert_allclose([e.values["ref_logps"] for e in got.examples],
                               [e.values["ref_logps"] for e in want.examples], **TOL)


@pytest.mark.parametrize("average", ["token_mean", "sequence_mean"])
def test_sft_with_target_slots_equals_the_full_head(model, average):
    pairs = pairs_dataset(2, split_last_prompt=False)
    dataset = sft.chosen_as_sft(pairs)
    objective = sft.sft_objective(average=average, chunk_size=2)
    for plain, compact in zip(batches(dataset), batches(dataset, compact_targets=True), strict=True):
        assert compact["target_slots"].shape[1] == max(c for _, c, _ in SHAPES)  # K: the longest completion
        _assert_same(_loss_and_grads(objective, model, compact), _loss_and_grads(objective, model, plain))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_reward_model_on_shared_rows_equals_the_plain_batches(pooling):
    reward_model = RewardModel(LlamaForCausalLM(LLAMA, rngs=nnx.Rngs(0)), pooling=pooling, rngs=nnx.Rngs(2))
    objective = reward.reward_objective(use_margin=True, center_coef=0.01)
    dataset = pairs_dataset(3)
    for plain, shared in zip(batches(dataset), batches(dataset, share_prompts=True), strict=True):
        _assert_same(_loss_and_grads(objective, reward_model, shared),
                     _loss_and_grads(objective, reward_model, plain))


def test_pair_layout_shares_only_where_exact():
    dataset = pairs_dataset()
    llama = LlamaForCausalLM(LLAMA, rngs=nnx.Rngs(0))
    assert common.pair_layout(dataset, llama, shared_prompt=True).share_prompts
    assert not common.pair_layout(dataset, llama, shared_prompt=False).share_prompts
    windowed = LlamaForCausalLM(dataclasses.replace(LLAMA, architecture="mistral", sliding_window=4),
                                rngs=nnx.Rngs(0))
    assert not common.pair_layout(dataset, windowed, shared_prompt=True).share_prompts
    with pytest.raises(ValueError, match="preference pairs"):
        sft.chosen_as_sft(dataset).batched_as(share_prompts=True)
