"""Typed per-method options: every preset still loads for its methods, and a bad ``loss`` key is refused
before any work, naming the key (and jaxalign's spelling of a key spelt as TRL spells it)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from jaxalign import cli
from jaxalign.methods import specs
from jaxalign.methods.recipe import load_run_config

PRESET_METHODS = [("hh_rlhf", "sft"), ("hh_rlhf", "distill"), ("hh_rlhf", "reward"), ("hh_rlhf", "dpo"),
                  ("hh_rlhf", "kto"), ("pku_saferlhf", "reward"),
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
                                               ("dpo", "loss_types", "loss_type"),
                                               ("kto", "loss_types", "loss_type")])
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
    kto_fields = {f.name for f in dataclasses.fields(specs.KTOSpec)}
    kto_accepted = {n for n, p in inspect.signature(losses.kto_loss).parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert kto_accepted <= kto_fields, kto_accepted - kto_fields
    from jaxalign.methods.kto import kto_objective

    assert set(inspect.signature(kto_objective).parameters) - {"reference"} == kto_fields
    from jaxalign.methods.reward import reward_objective

    reward_fields = {f.name for f in dataclasses.fields(specs.RewardSpec)}
    fitted = {"score_mean", "score_std"}  # the training scores' statistics, from the data
    assert set(inspect.signature(reward_objective).parameters) - fitted <= reward_fields
    from jaxalign.methods.sft import sft_objective

    sft_fields = {f.name for f in dataclasses.fields(specs.SFTSpec)}
    assert set(inspect.signature(sft_objective).parameters) - {"chunk_size", "weight_scale"} == sft_fields


@pytest.mark.parametrize("override, message", [
    ("loss.precompute_ref_log_probs=true", r"loss: \['precompute_ref_log_probs'\] is not a KTO loss option: "
                                           r"loss\.precompute_ref_log_probs is the run setting "
                                           r"reference=precomputed here"),
    ("loss.max_length=64", r"loss\.max_length is data\.max_length here"),
    ("loss.betta=0.1", r"unknown KTO option\(s\) \['betta'\] \(known: loss_type, beta, desirable_weight, "
                       r"undesirable_weight, chunk_size\)"),
    ("loss.beta=abc", r"loss\.beta must be a number, got 'abc'"),
    ("loss.beta=0", r"loss\.beta \(KTOSpec\) must be > 0, got 0"),
    ("loss.desirable_weight=[1.0]", r"loss\.desirable_weight must be a number, got \[1\.0\]"),
    ("loss.undesirable_weight=-0.5", r"loss\.undesirable_weight \(KTOSpec\) must be >= 0, got -0\.5"),
    ("loss.loss_type=sigmoid", r"loss\.loss_type \(KTOSpec\) must be one of \('kto', 'apo_zero_unpaired'\), "
                               r"got 'sigmoid'"),
    ("reference=none", r"reference for kto must be model, precomputed or lora_base, got 'none'"),
    ("reference=precomputed", r"reference='precomputed' cannot serve loss\.loss_type=kto"),
    ("train.micro_batches=8", r"method kto needs at least 2 examples per micro-batch \(data\.batch_size 8 x 1 "
                              r"process\(es\) / train\.micro_batches 8 = 1\)"),
])
def test_kto_options_are_checked_when_the_config_loads(override, message):
    with pytest.raises(ValueError, match=message):
        load_run_config("hh_rlhf", [override], method="kto")


def test_kto_spec_defaults_are_trls_and_both_weights_zero_is_refused():
    config = load_run_config("hh_rlhf", ["loss.loss_type=apo_zero_unpaired", "reference=precomputed"], method="kto")
    assert config.loss == specs.KTOSpec(loss_type="apo_zero_unpaired") and config.reference == "precomputed"
    from trl.trainer.kto_config import KTOConfig

    trl_defaults = {field.name: field.default for field in dataclasses.fields(KTOConfig)}
    for name in ("loss_type", "beta", "desirable_weight", "undesirable_weight"):
        assert getattr(specs.KTOSpec(), name) == trl_defaults[name], name
    with pytest.raises(ValueError, match=r"loss\.undesirable_weight \(KTOSpec\) must be > 0 when desirable_weight "
                                         r"is 0"):
        specs.KTOSpec(desirable_weight=0.0, undesirable_weight=0.0)
    assert specs.KTOSpec(desirable_weight=0.0).undesirable_weight == 1.0  # one class may be switched off


def test_a_bad_override_is_named_not_the_preset(capsys):
    """The command line's value is what is wrong: the error names the override, not the preset file."""
    assert cli.main(["train", "sft", "--config", "hh_rlhf", "data.batch_size=-1", "--print-config"]) == 2
    assert capsys.readouterr().err == ("jaxalign train: error: data.batch_size=-1 (command line): data: DataConfig: "
                                       "batch_size must be a positive int, got -1\n")
    # Among good overrides (data.source fills in a key the file may lack), only the bad one is named.
    with pytest.raises(ValueError, match=r"^train\.optimizer\.learning_rate=-1 \(command line\): train: "):
        load_run_config("hh_rlhf", ["data.source=x.jsonl", "train.optimizer.learning_rate=-1", "loss.beta=0.2"],
                        method="dpo")
    # An override that conflicts with the file's value is named too (without it the config is valid).
    with pytest.raises(ValueError, match=r"^data\.max_prompt_length=5000 \(command line\): "):
        load_run_config("hh_rlhf", ["data.max_prompt_length=5000"], method="sft")


def test_a_bad_value_in_the_file_is_blamed_on_the_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: sft\noutput_dir: runs/x\ndata: {source: x.jsonl, batch_size: -1}\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(config))}: data: DataConfig: batch_size must be a "
                                         r"positive int, got -1$"):
        load_run_config(str(config), ["train.total_steps=5"])


def test_an_option_the_schedule_ignores_is_refused_naming_the_override():
    with pytest.raises(ValueError, match=r"^train\.optimizer\.restarts=2 \(command line\): train: "
                                         r"OptimizerConfig\.restarts=2 is used only by schedule cosine_with_restarts; "
                                         r"schedule 'cosine' has no cycles \(set schedule: cosine_with_restarts\)$"):
        load_run_config("hh_rlhf", ["train.optimizer.restarts=2"], method="sft")
    config = load_run_config("hh_rlhf", ["train.optimizer.restarts=2",
                                         "train.optimizer.schedule=cosine_with_restarts"], method="sft")
    assert config.train.optimizer.restarts == 2
