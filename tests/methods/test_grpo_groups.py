"""GRPO's groups with their prompt run once (jaxalign.methods.groups): the layout by hand, and the log-probs,
losses, gradients and training runs of the plain rows, on rollouts the sampler wrote (left-padded prompts of
several lengths, responses that stop at different lengths)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.methods.groups import forward_flops, group_logps, group_rows, grouped, saves_work, ungroup
from jaxalign.methods.grpo import GRPOConfig, GRPOTrainer, grpo_objective
from jaxalign.methods.online import RolloutBatch, response_logps, sequence_inputs
from jaxalign.methods.rewards import FunctionReward
from jaxalign.models import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, ModelConfig
from jaxalign.rollout import Sampler, SamplingParams
from tests.methods.test_ppo import grpo_trainer, metrics_of, prompt_batches, tiny_policy, train_config
from tests.models.conftest import TINY
from tests.test_cli import tiny_tokenizer

TOL = dict(rtol=1e-5, atol=1e-5)
GROUP = 3
# A third of the vocabulary stops a response: the rows end at different lengths.
SAMPLING = SamplingParams(max_new_tokens=7, n=GROUP, stop_token_ids=tuple(range(0, TINY.vocab_size, 3)))
GPT2 = GPT2Config(vocab_size=TINY.vocab_size, d_model=24, n_layers=2, n_heads=3, intermediate_size=40,
                  max_position_embeddings=64)


def rollout_inputs(model, sampling=SAMPLING):
    """Three prompts (2, 4 and 6 words: left padding) × ``GROUP`` responses of the model."""
    batch = next(iter(prompt_batches(tiny_tokenizer(), 3)))
    rollout = Sampler(model).generate(batch["input_ids"], batch["attention_mask"], key=jax.random.key(4),
                                      params=sampling)
    lengths = np.asarray(rollout.lengths)
    assert len(set(lengths.tolist())) > 1 and np.asarray(rollout.prompt_mask).min() == 0  # what the test is for
    return rollout, sequence_inputs(rollout)


def test_group_rows_lay_out_each_prompt_once_then_its_responses():
    # Two groups of two rows: prompt length 3 (the second group's left-padded), 2 response slots.
    ids = jnp.array([[0, 5, 6, 7, 8], [0, 5, 6, 9, 1], [4, 3, 2, 10, 11], [4, 3, 2, 12, 0]])
    mask = jnp.array([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    rows = group_rows({"input_ids": ids, "attention_mask": mask, "positions": positions}, prompt_length=3, group=2)
    np.testing.assert_array_equal(rows["input_ids"], [[0, 5, 6, 7, 8, 9, 1], [4, 3, 2, 10, 11, 12, 0]])
    np.testing.assert_array_equal(rows["attention_mask"], [[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(rows["positions"], [[0, 0, 1, 2, 3, 2, 2], [0, 1, 2, 3, 4, 3, 3]])  # each row's own
    np.testing.assert_array_equal(rows["branch_ids"], [[0, 0, 0, 1, 1, 2, 2]] * 2)
    np.testing.assert_array_equal(rows["target_slots"], [[3, 4, 5, 6]] * 2)
    np.testing.assert_array_equal(rows["source_slots"], [[2, 3, 2, 5]] * 2)
    per_token = jnp.arange(8).reshape(4, 2)
    np.testing.assert_array_equal(grouped(per_token, 2), [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(ungroup(grouped(per_token, 2), 2), per_token)
    with pytest.raises(ValueError, match="not groups of 3"):
        group_rows({"input_ids": ids, "attention_mask": mask, "positions": positions}, prompt_length=3, group=3)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_group_logps_equal_each_rows_own(architecture):
    model = (LlamaForCausalLM(TINY, rngs=nnx.Rngs(0)) if architecture == "llama"
             else GPT2LMHeadModel(GPT2, rngs=nnx.Rngs(0)))
    rollout, inputs = rollout_inputs(model)
    prompt_length = int(rollout.prompt_tokens.shape[1])
    hidden, _ = model.hidden_states(inputs["input_ids"], positions=inputs["positions"],
                                    attention_mask=inputs["attention_mask"])
    want = response_logps(model, hidden, inputs["input_ids"], prompt_length, temperature=0.7, chunk_size=3,
                          with_entropy=True)
    rows = group_rows(inputs, prompt_length=prompt_length, group=GROUP)
    got = group_logps(model, rows, group=GROUP, temperature=0.7, chunk_size=3, with_entropy=True)
    mask = np.asarray(rollout.response_mask, bool)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a)[mask], np.asarray(b)[mask], **TOL)
    # The sampler's own log-probs of what it drew: an independent check of the group rows' slots.
    np.testing.assert_allclose(np.asarray(group_logps(model, rows, group=GROUP, chunk_size=None))[mask],
                               np.asarray(rollout.model_logps)[mask], atol=5e-5)


def _loss_and_grads(objective, model, batch):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        (total, count), metrics = objective(nnx.merge(graphdef, params, rest), batch, key=None)
        return total / count, metrics

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, metrics, grads


@pytest.mark.parametrize(("loss_type", "level"), [("dapo", "token"), ("grpo", "token"), ("dr_grpo", "token"),
                                                  ("bnpo", "sequence")])
def test_grpo_loss_and_gradients_on_group_rows_equal_the_plain_rows(loss_type, level):
    config = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, kl_coef=0.05, clip_eps_high=0.28,
                        chunk_size=2)
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(1))
    rollout, inputs = rollout_inputs(model)
    rng = np.random.default_rng(0)
    rows = rollout.response_mask.shape
    # Old and reference log-probs off the current ones, so ratios clip on both sides and the KL is not 0.
    plain = {**inputs, "response_mask": rollout.response_mask.astype(jnp.int32),
             "old_logps": rollout.model_logps + jnp.asarray(rng.normal(0, 0.3, rows), jnp.float32),
             "ref_logps": rollout.model_logps + jnp.asarray(rng.normal(0, 0.3, rows), jnp.float32),
             "advantages": jnp.asarray(rng.normal(0, 1, rows[0]), jnp.float32)}
    shared = GRPOTrainer.group_batch(plain, prompt_length=int(rollout.prompt_tokens.shape[1]), group=GROUP)
    assert shared["input_ids"].shape[0] == rows[0] // GROUP and shared["advantages"].shape == (rows[0] // GROUP, GROUP)
    objective = grpo_objective(config, temperature=0.9, max_new_tokens=SAMPLING.max_new_tokens)
    got, want = _loss_and_grads(objective, model, shared), _loss_and_grads(objective, model, plain)
    np.testing.assert_allclose(got[0], want[0], **TOL)
    for name in want[1]:
        np.testing.assert_allclose(got[1][name], want[1][name], **TOL, err_msg=name)
    for a, b in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2]), strict=True):
        np.testing.assert_allclose(a, b, **TOL)


def test_group_rows_are_chosen_only_where_they_save_work():
    smollm2 = ModelConfig(architecture="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                          head_dim=64, intermediate_size=1536)
    assert saves_work(smollm2, prompt_length=45, response_length=48, group=8)  # the chat prompts, 36 % fewer
    assert saves_work(smollm2, prompt_length=300, response_length=256, group=8)
    # 16 responses of 1024 tokens: a 16k-slot row whose attention costs more than the prompt's products save.
    assert not saves_work(smollm2, prompt_length=200, response_length=1024, group=16)
    assert not saves_work(smollm2, prompt_length=1, response_length=48, group=8)  # nothing to share


def test_forward_flops_counts_products_and_every_attention_pair():
    # SmolLM2-135M's layers by hand: q and o are 576x576, k and v 576x192, three 576x1536 MLP matrices.
    smollm2 = ModelConfig(architecture="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                          head_dim=64, intermediate_size=1536)
    layer_weights = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert forward_flops(smollm2, 10) == 2 * 30 * layer_weights * 10 + 4 * 30 * 576 * 10 * 10
    # GPT-2's MLP has two matrices (no gate); its attention has as many key/value heads as query heads.
    gpt2_weights = 4 * 24 * 24 + 2 * 24 * 40
    assert forward_flops(GPT2, 7) == 2 * 2 * gpt2_weights * 7 + 4 * 2 * 24 * 7 * 7


def test_grpo_trainer_shares_prompts_only_where_exact():
    assert grpo_trainer(None, 1, group=GROUP).group_size == GROUP
    assert grpo_trainer(None, 1, group=GROUP, shared_prompt=False).group_size == 0
    assert grpo_trainer(None, 1, group=2, num_minibatches=2).group_size == 0  # rows shuffled one by one
    assert grpo_trainer(None, 1, group=2, num_minibatches=2, minibatch_groups=True).group_size == 2
    # Two prompts in 4 micro-batches: the 8 rows split, 2 group rows would not.
    trainer = grpo_trainer(None, 1, group=4)
    rollout = Sampler(tiny_policy()).generate(*(next(iter(prompt_batches(tiny_tokenizer(), 2)))[key]
                                                for key in ("input_ids", "attention_mask")),
                                              key=jax.random.key(0), params=trainer.sampling)
    assert trainer.shared_group(rollout) == 4
    trainer.train_step.micro_batches = 4
    assert trainer.shared_group(rollout) == 0
    # Two minibatches of one group each: a minibatch's one group row cannot split into 2 micro-batches.
    trainer = grpo_trainer(None, 1, group=4, num_minibatches=2, minibatch_groups=True)
    assert trainer.shared_group(rollout) == 4
    trainer.train_step.micro_batches = 2
    assert trainer.shared_group(rollout) == 0


def test_minibatch_groups_shuffle_whole_groups_and_rows_as_before():
    """``minibatch_groups``: plain rows are drawn G at a time (a minibatch holds whole groups); without it, the
    row permutation is the one the loop always drew (a run resumed across this change shuffles as before)."""
    trainer = grpo_trainer(None, 1, group=3, num_minibatches=2)
    rows = np.arange(12)
    column = jnp.asarray(rows[:, None])
    batch = RolloutBatch.from_arrays({name: column for name in ("input_ids", "attention_mask", "positions",
                                                                "response_mask", "old_logps", "advantages")})
    by_rows = [np.asarray(m["input_ids"])[:, 0] for m in trainer._shuffled(batch, 12, step=5)]
    np.testing.assert_array_equal(np.concatenate(by_rows),
                                  np.random.default_rng([trainer.config.seed, 5, 0]).permutation(12))
    by_groups = [np.asarray(m["input_ids"])[:, 0] for m in trainer._shuffled(batch, 12, step=5, unit=3)]
    assert [len(m) for m in by_groups] == [6, 6]
    for minibatch in by_groups:
        groups = minibatch.reshape(-1, 3)
        np.testing.assert_array_equal(groups, groups[:, :1] + np.arange(3))  # each group whole, in order
        assert set(groups[:, 0] % 3) == {0}
    assert sorted(np.concatenate(by_groups)) == list(range(12))


def test_minibatch_groups_need_the_prompts_to_divide_into_the_minibatches(tmp_path):
    tokenizer = tiny_tokenizer()
    trainer = GRPOTrainer(train_config(tmp_path, 1), GRPOConfig(num_minibatches=2, minibatch_groups=True),
                          tiny_policy(), prompt_batches(tokenizer, 3),
                          reward=FunctionReward(response_length, "length", inputs="episodes"), tokenizer=tokenizer,
                          sampling=SAMPLING)
    with pytest.raises(ValueError, match=r"3 groups of 3 rows per iteration is not a multiple of num_minibatches=2"):
        trainer.run()


def response_length(episodes) -> np.ndarray:
    """A reward that differs within groups (the responses stop at different lengths)."""
    return np.asarray(episodes.response_mask, np.float64).sum(axis=1)


def counted(fn):
    calls = []

    def call(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return call, calls


@pytest.mark.parametrize("minibatches", [1, 2])
def test_grpo_runs_with_shared_prompts_equal_the_plain_runs(tmp_path, minibatches):
    """Two iterations (a reference unlike the policy, kl_coef > 0, μ = 2 epochs): the same rewards, KL,
    losses and parameters; with two minibatches a pass (``minibatch_groups``: one group each), the plain rows
    drawn group by group as the group rows are."""
    runs = {}
    for shared in (True, False):
        directory = tmp_path / str(shared)
        tokenizer = tiny_tokenizer()
        grpo = GRPOConfig(kl_coef=0.05, epochs=2, shared_prompt=shared, num_minibatches=minibatches,
                          minibatch_groups=minibatches > 1)
        trainer = GRPOTrainer(train_config(directory, 2, lr=1e-2), grpo, tiny_policy(0),
                              prompt_batches(tokenizer, 2), reward=FunctionReward(response_length, "length",
                                                                                  inputs="episodes"),
                              tokenizer=tokenizer, sampling=SAMPLING, reference=tiny_policy(1))
        assert trainer.group_size == (GROUP if shared else 0)
        trainer.group_batch, calls = counted(trainer.group_batch)
        trainer.run()
        assert len(calls) == (2 if shared else 0)  # both iterations on group rows
        runs[shared] = (metrics_of(directory), nnx.state(trainer.trained_model(), nnx.Param))
    (shared_metrics, shared_params), (plain_metrics, plain_params) = runs[True], runs[False]
    assert len(shared_metrics) == len(plain_metrics) == 2
    assert all(m["updates"] == 2 * minibatches for m in plain_metrics + shared_metrics)
    assert all(abs(m["loss"]) > 1e-3 and m["kl"] > 1e-3 for m in plain_metrics), plain_metrics
    for got, want in zip(shared_metrics, plain_metrics, strict=True):
        for key in ("reward", "kl", "loss", "grad_norm", "entropy", "response_length", "policy/clip_ratio/region_mean"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(shared_params), jax.tree.leaves(plain_params), strict=True):
        # Adam divides each update by its gradient's own scale, so on a weight whose gradient is near 0 the two
        # layouts' rounding moves the update by a fraction of lr (1e-2): 4.2e-5 on 1 of 4096 weights on an
        # AVX2-only CPU, under 2e-5 on the machines where it ran before. 1e-4 is 1 % of one step's lr; the
        # metrics above hold to 1e-4.
        np.testing.assert_allclose(a, b, atol=1e-4)
