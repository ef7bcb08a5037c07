"""Reward heads with a hidden layer, dropout and a log-variance output: the function by hand, dropout only with
a key, partition rules for every weight, and save/load round trips (old linear files included)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models import RewardHead, RewardModel, load_hf, load_reward_model, partition_specs, save_reward_model
from jaxalign.models.reward_io import HEAD_FILE, META_FILE
from tests.models.conftest import B, T, V, right_padded

LENGTHS = [7, 4, 1]


def test_hidden_head_by_hand_and_dropout_only_with_a_key(rng):
    head = RewardHead(6, hidden=5, dropout=0.5, activation="tanh", rngs=nnx.Rngs(0))
    features = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    w1, b1 = np.asarray(head.up_proj.kernel[...]), np.asarray(head.up_proj.bias[...])
    w2, b2 = np.asarray(head.kernel[...]), np.asarray(head.bias[...])
    expected = np.tanh(np.asarray(features) @ w1 + b1) @ w2[:, 0] + b2[0]
    np.testing.assert_allclose(head.project(features), expected, rtol=1e-5, atol=1e-6)
    key = jax.random.key(1)
    dropped = head.project(features, key=key)
    assert not np.allclose(dropped, expected, atol=1e-4)
    np.testing.assert_array_equal(dropped, head.project(features, key=key))  # the key decides the mask
    np.testing.assert_allclose(nnx.view(head, deterministic=True).project(features, key=key), expected, rtol=1e-5,
                               atol=1e-6)
    # Inverted dropout keeps the mean: averaged over many keys, the hidden layer's input is unbiased.
    linear = RewardHead(6, dropout=0.5, rngs=nnx.Rngs(0))
    draws = jax.vmap(lambda k: linear.project(features, key=k))(jax.random.split(key, 4000))
    np.testing.assert_allclose(draws.mean(0), linear.project(features), atol=0.1)


def test_log_variance_output_is_a_second_column_the_reward_leaves_out(rng):
    head = RewardHead(6, hidden=3, log_variance=True, rngs=nnx.Rngs(0))
    assert head.kernel[...].shape == (3, 2)
    features = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    mean, log_variance = head.project_with_log_variance(features)
    np.testing.assert_array_equal(mean, head.project(features))
    assert not np.allclose(mean, log_variance)
    with pytest.raises(ValueError, match="has no log-variance output"):
        RewardHead(6, rngs=nnx.Rngs(0)).project_with_log_variance(features)
    with pytest.raises(ValueError, match="log_variance is for a scalar head"):
        RewardHead(6, num_objectives=2, log_variance=True, rngs=nnx.Rngs(0))
    for kwargs, message in (({"hidden": 0}, "hidden must be a positive int"), ({"dropout": 1.0}, r"dropout must be in"),
                            ({"activation": "swish"}, "activation must be one of")):
        with pytest.raises(ValueError, match=message):
            RewardHead(6, rngs=nnx.Rngs(0), **kwargs)


def test_every_head_weight_has_a_partition_rule(hf_checkpoint):
    model = RewardModel(load_hf(hf_checkpoint("llama")), hidden=16, dropout=0.1, rngs=nnx.Rngs(0))
    specs = {"/".join(map(str, path)): tuple(v.get_value()) for path, v in nnx.to_flat_state(partition_specs(model))}
    assert specs["reward_head/up_proj/kernel"] == ("fsdp", "tensor")  # an MLP's up-projection: column parallel
    assert specs["reward_head/kernel"] == ("fsdp", None)


@pytest.mark.parametrize("settings", [{"hidden": 8, "dropout": 0.1, "activation": "relu"},
                                      {"hidden": None, "dropout": 0.2, "log_variance": True}])
def test_saved_heads_load_back(hf_checkpoint, tmp_path, rng, settings):
    lm = load_hf(hf_checkpoint("llama"))
    model = RewardModel(lm, pooling="mean", rngs=nnx.Rngs(4), **settings)
    save_reward_model(tmp_path / "rm", model, load_hf(hf_checkpoint("llama")), gain=2.0, bias=-1.0,
                      metadata={"scores": {"mean": -1.0, "std": 2.0}})
    reloaded, info = load_reward_model(tmp_path / "rm")
    assert info["head"] == {"hidden": None, "dropout": 0.0, "activation": "tanh", "log_variance": False,
                            **settings}
    tokens, mask = jnp.asarray(rng.integers(0, V, size=(B, T))), jnp.asarray(right_padded(LENGTHS))
    np.testing.assert_allclose(reloaded(tokens, attention_mask=mask), model(tokens, attention_mask=mask), atol=1e-5)


def test_linear_files_without_head_settings_still_load_and_broken_ones_are_named(hf_checkpoint, tmp_path):
    lm = load_hf(hf_checkpoint("llama"))
    save_reward_model(tmp_path / "rm", RewardModel(lm, rngs=nnx.Rngs(0)), load_hf(hf_checkpoint("llama")))
    meta = json.loads((tmp_path / "rm" / META_FILE).read_text())
    del meta["head"]  # as files were written before heads could have a hidden layer
    (tmp_path / "rm" / META_FILE).write_text(json.dumps(meta))
    reloaded, _ = load_reward_model(tmp_path / "rm")
    assert reloaded.reward_head.up_proj is None
    meta["head"] = {"hidden": 8}
    (tmp_path / "rm" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"{HEAD_FILE}: no tensor 'up_proj.kernel', which the head"):
        load_reward_model(tmp_path / "rm")
    meta["head"] = {"hidden": 8, "depth": 2}
    (tmp_path / "rm" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"field 'head' has unknown key\(s\) \['depth'\]"):
        load_reward_model(tmp_path / "rm")
