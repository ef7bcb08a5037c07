"""Typed per-method options: every preset still loads for its methods, and a bad ``loss`` key is refused
before any work, naming the key (and jaxalign's spelling of a key spelt as TRL spells it)."""

from __future__ import annotations

import dataclasses

import pytest

from jaxalign.methods import specs
from jaxalign.methods.recipe import load_run_config

PRESET_METHODS = [("hh_rlhf", "sft"), ("hh_rlhf", "reward"), ("hh_rlhf", "dpo"), ("pku_saferlhf", "reward"),
                  ("pku_saferlhf", "dpo"), ("sentiment", "reward"), ("sentiment", "dpo"), ("sentiment_ppo", "ppo"),
                  ("sentiment_grpo", "grpo")]


@pytest.mark.parametrize("preset, method", PRESET_METHODS)
def test_every_preset_loads_its_typed_spec(preset, method):
    config = load_run_config(preset, method=method)
    assert isinstance(config.loss, specs.LOSS_SPECS[method])
    # The resolved config round-trips (what run.json stores and --resume reads back).
    again = type(config).from_dict(config.to_dict())
    assert again.loss == config.loss


def test_overrides_are_typed_and_checked():
    config = load_run_config("hh_rlhf", ["loss.beta=0.05", "loss.loss_type=[sigmoid,sft]",
                                         "loss.loss_weights=[1.0,0.5]"], method="dpo")
    assert config.loss.beta == 0.05 and config.loss.loss_type == ("sigmoid", "sft")
    assert config.loss.options()["loss_weights"] == [1.0, 0.5]
    assert load_run_config("hh_rlhf", ["loss.beta=1e-1"], method="dpo").loss.beta == 0.1  # YAML 1.1 string
    with pytest.raises(ValueError, match=r"loss\.beta must be a number or null, got 'abc'"):
        load_run_config("hh_rlhf", ["loss.beta=abc"], method="dpo")
    with pytest.raises(ValueError, match=r"loss\.average \(SFTSpec\) must be one of"):
        load_run_config("hh_rlhf", ["loss.average=per_token"], method="sft")
    with pytest.raises(ValueError, match=r"unknown DPO option\(s\) \['betta'\] \(known: loss_type, beta,"):
        load_run_config("hh_rlhf", ["loss.betta=0.1"], method="dpo")


@pytest.mark.parametrize("method, key, ours", [("ppo", "cliprange", "clip_eps"), ("ppo", "num_ppo_epochs", "epochs"),
                                               ("grpo", "beta", "kl_coef"), ("grpo", "epsilon", "clip_eps"),
                                               ("reward", "center_rewards_coefficient", "center_coef"),
                                               ("dpo", "loss_types", "loss_type")])
def test_a_peer_spelling_names_ours(method, key, ours):
    preset = {"ppo": "sentiment_ppo", "grpo": "sentiment_grpo"}.get(method, "hh_rlhf")
    with pytest.raises(ValueError, match=rf"loss\.{key} is loss\.{ours} here"):
        load_run_config(preset, [f"loss.{key}=1"], method=method)


def test_option_sets_follow_the_losses():
    """DPOSpec holds every keyword option of the DPO-family losses it feeds (a new loss option needs a field)."""
    import inspect

    from jaxalign import losses

    accepted = set()
    for fn in (losses.dpo_loss, losses.simpo_loss, losses.orpo_loss):
        accepted |= {n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
    fields = {f.name for f in dataclasses.fields(specs.DPOSpec)}
    assert accepted <= fields, accepted - fields
    from jaxalign.methods.reward import reward_objective

    reward_fields = {f.name for f in dataclasses.fields(specs.RewardSpec)}
    assert set(inspect.signature(reward_objective).parameters) <= reward_fields
