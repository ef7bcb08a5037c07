"""The jitted step on one device: exact gradient accumulation, parameter filters, reference models, mixed
precision, the non-finite guard, and clear errors for bad batches and objectives."""

from __future__ import annotations

import gc
import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxalign import losses
from jaxalign.models.lora import LoRAConfig, apply_lora
from jaxalign.train import OptimizerConfig, TrainStep, make_optimizer, make_schedule
from tests.train.tiny import BATCH, SGD, TINY, host_params, make_batch, sft_objective, tiny_model


def model_params(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, path)): np.asarray(variable.get_value())
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def batches(count: int, batch_size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [make_batch(rng, batch_size) for _ in range(count)]


def train(step: TrainStep, data, seed: int = 0):
    state = step.init(seed)
    history = []
    for batch in data:
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return state, history


def sgd() -> optax.GradientTransformation:
    return make_optimizer(SGD, total_steps=10)


def test_four_micro_batches_equal_one_four_times_larger_batch():
    data = batches(2, batch_size=BATCH)
    # Micro-batch i holds rows 2i and 2i+1: their loss-token counts differ, so averaging the four
    # micro-batch means would not give the token mean of the batch; only (sum, count) does.
    token_counts = [data[0]["attention_mask"][2 * i:2 * i + 2, 1:].sum() for i in range(4)]
    assert len(set(token_counts)) > 1
    whole, whole_history = train(TrainStep(sft_objective, tiny_model(), sgd()), data)
    accumulated, accumulated_history = train(TrainStep(sft_objective, tiny_model(), sgd(), micro_batches=4), data)
    for one, four in zip(whole_history, accumulated_history, strict=True):
        assert one["loss_count"] == four["loss_count"]
        for name in ("loss", "nll", "token_accuracy", "entropy", "grad_norm", "tokens"):
            np.testing.assert_allclose(four[name], one[name], rtol=2e-6, err_msg=name)
    expected = host_params(whole)
    for name, value in host_params(accumulated).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_only_the_filtered_parameters_train_and_have_optimizer_state():
    model = apply_lora(tiny_model(), LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj")), rngs=nnx.Rngs(1))
    before = model_params(model)
    # A Variable type (the LoRA adapters) or a path predicate (the head), here combined.
    step = TrainStep(sft_objective, model, sgd(), trainable=nnx.Any(nnx.LoRAParam, nnx.PathContains("lm_head")))
    state, _ = train(step, batches(2, batch_size=BATCH))
    expected = {f"model/layers/self_attn/{projection}/{factor}" for projection in ("q_proj", "v_proj")
                for factor in ("lora_a", "lora_b")} | {"lm_head/kernel"}
    assert set(host_params(state)) == expected
    momentum_shapes = sorted(leaf.shape for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim)
    assert momentum_shapes == sorted(before[name].shape for name in expected)
    after = model_params(step.trained_model(state))
    assert {name for name in before if not np.array_equal(after[name], before[name])} == expected
    # The caller's model is untouched although the step donated the state.
    for name, value in model_params(model).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def pairs(batch_size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    chosen, rejected = make_batch(rng, batch_size), make_batch(rng, batch_size)
    return {"chosen_tokens": chosen["tokens"], "chosen_mask": chosen["attention_mask"],
            "rejected_tokens": rejected["tokens"], "rejected_mask": rejected["attention_mask"]}


def dpo_objective(model, batch, *, key, ref):
    def logps(lm, side):
        tokens, mask = batch[f"{side}_tokens"], batch[f"{side}_mask"]
        logits, _ = lm(tokens, attention_mask=mask)
        return losses.sequence_logps(losses.token_logps(logits[:, :-1], tokens[:, 1:], mask[:, 1:]), mask[:, 1:])

    per_pair, metrics = losses.dpo_loss(logps(model, "chosen"), logps(model, "rejected"), logps(ref, "chosen"),
                                        logps(ref, "rejected"), beta=0.5)
    return (jnp.sum(per_pair), per_pair.shape[0]), metrics


def test_frozen_reference_model_is_shared_not_trained():
    policy, reference = tiny_model(), tiny_model()  # same seed: the policy starts as the reference
    reference_before = model_params(reference)
    step = TrainStep(dpo_objective, policy, optax.adam(1e-2), references={"ref": reference})
    state, history = train(step, [pairs(4, seed) for seed in range(3)])
    # DPO at policy == reference is ln 2 (docs/architecture.md); later steps move away from it.
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[2]["loss"] < history[0]["loss"]
    ref_params, _ = step.references["ref"]
    for path, variable in nnx.to_flat_state(ref_params):
        np.testing.assert_array_equal(variable.get_value(), reference_before["/".join(map(str, path))])
    # The train state holds the policy's parameters only: no reference copy, no optimizer state for it.
    assert set(host_params(state)) == set(reference_before)
    assert len(jax.tree.leaves(state.opt_state)) == 1 + 2 * len(reference_before)  # count, mu, nu


def test_mixed_precision_keeps_float32_master_weights():
    # The float32 model's weights stored in bfloat16 (built abstractly: no bfloat16 initialisation to compile).
    low = nnx.eval_shape(lambda: tiny_model(config=TINY.with_policy(param_dtype="bfloat16", compute_dtype="bfloat16")))
    nnx.update(low, jax.tree.map(lambda p: p.astype(jnp.bfloat16), nnx.state(tiny_model(), nnx.Param)))
    data = batches(1, batch_size=BATCH)
    # A rate so small that one update is far below bfloat16's resolution around the weights (~4e-3).
    step = TrainStep(sft_objective, low, optax.sgd(1e-4))
    initial = host_params(step.init(0))
    state, history = train(step, data)
    master = host_params(state)
    assert all(value.dtype == np.float32 for value in master.values())
    assert any(not np.array_equal(master[name], initial[name]) for name in master)
    trained = step.trained_model(state)
    assert all(value.dtype == jnp.bfloat16 for value in model_params(trained).values())
    # At initialisation the model predicts nearly uniformly: a loss of about ln V, also in bfloat16.
    assert history[0]["loss"] == pytest.approx(math.log(TINY.vocab_size), abs=0.05)


def poisonable_objective(model, batch, *, key):
    """SFT, made non-finite on demand: ``poison_loss`` rows give a NaN loss, ``poison_grad`` rows a finite
    loss with a NaN gradient (d sqrt(x)/dx is infinite at 0)."""
    (total, count), metrics = sft_objective(model, batch, key=key)
    total = total * jnp.where(jnp.max(batch["poison_loss"]) > 0, jnp.nan, 1.0)
    kernel = model.lm_head.kernel[...]
    total = total + 0.0 * jnp.sqrt(jnp.sum(kernel**2) * (1.0 - jnp.max(batch["poison_grad"])))
    return (total, count), metrics


def poisoned(batch, *, loss=0.0, grad=0.0):
    rows = batch["tokens"].shape[0]
    return {**batch, "poison_loss": np.full(rows, loss, np.float32), "poison_grad": np.full(rows, grad, np.float32)}


def without_schedule_counts(opt_state):
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree.map(lambda x: None if is_schedule(x) else x, opt_state, is_leaf=is_schedule)


def test_a_non_finite_loss_or_gradient_leaves_the_state_unchanged():
    step = TrainStep(poisonable_objective, tiny_model(), sgd())
    data = batches(3, batch_size=BATCH)
    state, metrics = step(step.init(0), poisoned(data[0]))
    assert metrics["finite"]
    for poison in ({"loss": 1.0}, {"grad": 1.0}):
        params, opt_state = host_params(state), jax.device_get(state.opt_state)
        assert any(leaf.any() for leaf in jax.tree.leaves(opt_state))  # momentum to keep
        state, metrics = step(state, poisoned(data[1], **poison))
        assert not metrics["finite"]
        assert bool(jnp.isfinite(metrics["loss"])) == ("grad" in poison)
        assert not jnp.isfinite(metrics["grad_norm"])
        for name, value in host_params(state).items():
            np.testing.assert_array_equal(value, params[name], err_msg=name)
        # Everything but the schedule's count, which follows the step (test_a_skipped_step_...).
        jax.tree.map(np.testing.assert_array_equal, without_schedule_counts(jax.device_get(state.opt_state)),
                     without_schedule_counts(opt_state))
    assert int(state.step) == 3  # the poisoned batches were consumed
    state, metrics = step(state, poisoned(data[2]))
    assert metrics["finite"] and int(state.step) == 4


def test_batch_size_must_split_into_the_micro_batches():
    model = tiny_model()  # kept alive: the step inits twice
    step = TrainStep(sft_objective, model, sgd(), micro_batches=4)
    with pytest.raises(ValueError, match=r"global batch size 6 must be a multiple of micro_batches \(4\)"):
        step(step.init(0), batches(1, batch_size=6)[0])
    ragged = {**batches(1, batch_size=8)[0], "extra": np.zeros((4, 2))}
    with pytest.raises(ValueError, match="same leading"):
        step(step.init(0), ragged)


@pytest.mark.parametrize(("objective", "error", "message"), [
    (lambda model, batch, *, key: sft_objective(model, batch, key=key)[0][0], TypeError, "must return"),
    (lambda model, batch, *, key: ((jnp.zeros(3), 1.0), {}), ValueError, "must be scalars"),
    (lambda model, batch, *, key: ((0.0, 1.0), {"loss": 0.0}), ValueError, "reserved"),
    (lambda model, batch, *, key: ((0.0, 1.0), None), TypeError, "dict of scalars"),
    # A per-row metric would otherwise be broadcast against the micro-batch counts without a word.
    (lambda model, batch, *, key: ((0.0, 1.0), {"ok": 0.0, "per_row": batch["attention_mask"][:, 0]}), ValueError,
     r"metrics must be scalars, but \{'per_row': \(2,\)\}"),
])
def test_objective_output_is_checked(objective, error, message):
    step = TrainStep(objective, tiny_model(), sgd())
    with pytest.raises(error, match=message):
        step(step.init(0), batches(1, batch_size=2)[0])


def test_a_filter_that_selects_nothing_raises():
    with pytest.raises(ValueError, match="selects none"):
        TrainStep(sft_objective, tiny_model(), sgd(), trainable=nnx.PathContains("no_such_module"))


def test_meshes_without_auto_axes_are_refused():
    explicit = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 3,
                             devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="needs Auto axes"):
        TrainStep(sft_objective, tiny_model(), sgd(), mesh=explicit)


class DropoutModel(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 1, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.lin(self.drop(x))


class BatchNormModel(nnx.Module):
    def __init__(self, rngs):
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.lin = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
        return self.lin(self.bn(x))


SMALL_RULES = {("lin", "kernel"): (None, None), ("lin", "bias"): (None,), ("bn", "scale"): (None,),
               ("bn", "bias"): (None,)}


def regression_objective(model, batch, *, key):
    y = model(batch["x"])[:, 0]
    poison = jnp.where(jnp.max(batch["poison"]) > 0, jnp.nan, 1.0)
    return (jnp.sum((y - batch["y"]) ** 2) * poison, jnp.asarray(y.shape[0], jnp.float32)), {}


def regression_batch(seed, *, poison=0.0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(4, 4)).astype(np.float32), "y": rng.normal(size=4).astype(np.float32),
            "poison": np.full(4, poison, np.float32)}


def flat_model_state(state) -> dict[str, np.ndarray]:
    def host(value):
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        return np.asarray(jax.device_get(value))
    return {"/".join(map(str, path)): host(variable.get_value())
            for path, variable in nnx.to_flat_state(state.model_state)}


@pytest.mark.parametrize(("build", "kind"), [
    (lambda: DropoutModel(nnx.Rngs(0, dropout=1)), "dropout"),
    (lambda: BatchNormModel(nnx.Rngs(0)), "batch_norm"),
])
def test_models_with_non_parameter_state_train_and_the_guard_restores_it(build, kind):
    step = TrainStep(regression_objective, build(), optax.sgd(0.1), rules=SMALL_RULES, micro_batches=2)
    state = step.init(0)
    before = flat_model_state(state)
    state, metrics = step(state, regression_batch(0))
    assert metrics["finite"]
    after = flat_model_state(state)
    if kind == "dropout":
        count, = (name for name in after if name.endswith("count"))
        assert int(after[count]) == int(before[count]) + 2  # one dropout mask per micro-batch
    else:
        for name in ("bn/mean", "bn/var"):
            assert not np.array_equal(after[name], before[name]), name
    state, metrics = step(state, regression_batch(1, poison=1.0))
    assert not metrics["finite"]
    for name, value in flat_model_state(state).items():
        np.testing.assert_array_equal(value, after[name], err_msg=name)
    assert isinstance(step.trained_model(state), type(build()))


def test_the_step_keeps_no_copy_of_the_initial_parameters():
    model = tiny_model()
    initial = [weakref.ref(leaf) for leaf in jax.tree.leaves(nnx.state(model))]
    step = TrainStep(sft_objective, model, sgd())
    expected = host_params(step.init(0))
    # While the caller holds the model, init() reads the same arrays again.
    jax.tree.map(np.testing.assert_array_equal, host_params(step.init(1)), expected)
    del model
    gc.collect()
    # Once the caller drops its model, nothing holds the initial values any more ...
    assert all(ref() is None for ref in initial)
    # ... so another init() cannot reproduce them, and says why.
    with pytest.raises(RuntimeError, match="initial parameters are gone"):
        step.init(0)
    # Built and dropped at once (Trainer(config, load_model(), ...)): the first init() is the last user.
    fresh = TrainStep(sft_objective, tiny_model(), sgd())
    refs = jax.tree.map(lambda leaf: weakref.ref(leaf), jax.tree.leaves(fresh._initial_values))
    fresh.init(0)
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_micro_batches_are_contiguous_rows_so_groups_stay_together():
    group_size, micro_batches = 4, 2
    seen = []

    def grpo_like_objective(model, batch, *, key):
        # Every group (the completions of one prompt) must arrive whole: a group-relative advantage
        # computed on a micro-batch would otherwise mix prompts.
        prompts = batch["prompt"].reshape(-1, group_size)
        whole = jnp.all(prompts == prompts[:, :1])
        advantages = losses.group_advantages(batch["reward"], group_size=group_size)
        loss = 0.0 * jnp.sum(model.lm_head.kernel[...]) + 0.0 * jnp.sum(advantages)
        jax.debug.callback(lambda rows: seen.append(np.asarray(rows)), batch["prompt"])
        return (loss, jnp.float32(batch["prompt"].shape[0])), {"whole_groups": whole.astype(jnp.float32)}

    batch = {"prompt": np.repeat(np.arange(4), group_size).astype(np.int32),
             "reward": np.arange(16, dtype=np.float32)}
    step = TrainStep(grpo_like_objective, tiny_model(), sgd(), micro_batches=micro_batches)
    _, metrics = step(step.init(0), batch)
    jax.effects_barrier()
    assert float(metrics["whole_groups"]) == 1.0
    assert sorted(map(tuple, seen)) == [(0, 0, 0, 0, 1, 1, 1, 1), (2, 2, 2, 2, 3, 3, 3, 3)]


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_skipped_step_still_advances_the_schedule(name):
    config = OptimizerConfig(name=name, learning_rate=1.0, schedule="linear", max_grad_norm=None)
    schedule = make_schedule(config, total_steps=10)
    step = TrainStep(poisonable_objective, tiny_model(), make_optimizer(config, total_steps=10))
    data = batches(4, batch_size=BATCH)
    state = step.init(0)
    for index, batch in enumerate(data):
        state, metrics = step(state, poisoned(batch, loss=float(index == 1)))
        assert bool(metrics["finite"]) == (index != 1)
    schedule_counts = [int(leaf.count) for leaf in jax.tree.leaves(
        state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
        if isinstance(leaf, optax.ScaleByScheduleState)]
    # The next update is number 4 (0-based), as the Trainer's logged learning_rate = schedule(step) says.
    assert schedule_counts == [int(state.step)] == [4]
    assert float(schedule(schedule_counts[0])) == pytest.approx(0.6)


def clipped_adamw():
    return make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant", max_grad_norm=1.0), total_steps=10)


@pytest.mark.parametrize(("guard", "from_parameters"), [(None, True), (None, False), (1e6, True)])
def test_update_ratio_is_the_parameters_relative_change(guard, from_parameters):
    optimizer = clipped_adamw()
    step = TrainStep(sft_objective, tiny_model(), optimizer, max_update_ratio=guard)
    step._ratio_from_parameters = from_parameters  # False: the way accelerators take it (inside the update)
    state = step.init(0)
    for batch in batches(2, batch_size=BATCH):
        before = host_params(state)
        state, metrics = step(state, batch)
        after = host_params(state)
        change = math.sqrt(sum(float(np.sum((after[k].astype(np.float64) - before[k]) ** 2)) for k in before))
        size = math.sqrt(sum(float(np.sum(before[k].astype(np.float64) ** 2)) for k in before))
        assert change > 0 and not metrics["diverging"]
        np.testing.assert_allclose(float(metrics["update_ratio"]), change / size, rtol=1e-4)


def test_a_step_without_the_update_ratio_updates_the_same_and_reports_no_ratio():
    optimizer = clipped_adamw()
    measured, unmeasured = (TrainStep(poisonable_objective, tiny_model(), optimizer) for _ in range(2))
    states = [measured.init(0), unmeasured.init(0)]
    # The second update is skipped (a NaN loss): that branch too is the same either way.
    data = [poisoned(batch, loss=float(index == 1)) for index, batch in enumerate(batches(3, batch_size=BATCH))]
    for batch in data:
        states[0], with_ratio = measured(states[0], batch)
        states[1], without = unmeasured(states[1], batch, with_update_ratio=False)
        assert "update_ratio" in with_ratio and "update_ratio" not in without
        assert set(with_ratio) - set(without) == {"update_ratio"}
        for name in without:
            np.testing.assert_array_equal(np.asarray(with_ratio[name]), np.asarray(without[name]), err_msg=name)
    jax.tree.map(np.testing.assert_array_equal, *jax.device_get(states))


def test_the_divergence_guard_measures_the_update_ratio_even_when_not_asked():
    step = TrainStep(sft_objective, tiny_model(), make_optimizer(
        OptimizerConfig(learning_rate=1e6, schedule="constant", max_grad_norm=None), total_steps=10),
        max_update_ratio=10.0)
    _, metrics = step(step.init(0), batches(1, batch_size=BATCH)[0], with_update_ratio=False)
    assert metrics["diverging"] and float(metrics["update_ratio"]) > 10.0


def test_an_update_the_divergence_guard_lets_through_is_the_unguarded_update():
    optimizer = clipped_adamw()
    guarded, unguarded = (TrainStep(sft_objective, tiny_model(), optimizer, max_update_ratio=ratio)
                          for ratio in (1e6, None))
    states = [guarded.init(0), unguarded.init(0)]
    for batch in batches(4, batch_size=BATCH):
        states[0], passed = guarded(states[0], batch)
        states[1], _ = unguarded(states[1], batch)
        assert passed["finite"] and not passed["diverging"]
    # Parameters and both of AdamW's moments (computed inside the guard's conditional) agree to float rounding.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *jax.device_get(states))


def test_the_divergence_guard_refuses_an_update_before_writing_it():
    step = TrainStep(sft_objective, tiny_model(), make_optimizer(
        OptimizerConfig(learning_rate=1e6, schedule="constant", max_grad_norm=None), total_steps=10),
        max_update_ratio=10.0)
    state = step.init(0)
    before, moments = host_params(state), jax.device_get(state.opt_state)
    state, metrics = step(state, batches(1, batch_size=BATCH)[0])
    assert metrics["finite"] and metrics["diverging"] and float(metrics["update_ratio"]) > 10.0
    for name, value in host_params(state).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    jax.tree.map(np.testing.assert_array_equal, without_schedule_counts(jax.device_get(state.opt_state)),
                 without_schedule_counts(moments))
