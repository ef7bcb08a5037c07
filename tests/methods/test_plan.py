"""``jaxalign plan``: a run's step compiled from abstract shapes on a tiny saved Llama (parts add up, LoRA and nf4
shrink what they should, a 2-device FSDP mesh halves the sharded state), published config.json files of 7-70B models
read without weights, and bad input named in one line."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

from jaxalign.cli import main
from jaxalign.methods import plan, recipe
from jaxalign.train.config import MeshConfig
from tests.train.conftest import python_env

CONFIGS = Path(__file__).parent / "model_configs"
PUBLISHED = {"llama-3-8b": 8.030e9, "llama-3-70b": 70.554e9, "qwen2-7b": 7.616e9, "mistral-7b": 7.242e9}
LORA = "model.lora={rank: 2, alpha: 4, targets: [q_proj, v_proj]}"


@pytest.fixture(scope="module")
def run_yaml(checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "run.yaml"
    path.write_text(json.dumps({"output_dir": "unused", "model": {"path": str(checkpoint)},
                                "data": {"source": "unused.jsonl", "max_length": 16, "batch_size": 4},
                                "train": {"total_steps": 10}}))
    return path


def planned(capsys, run_yaml, method, *extra) -> dict:
    assert main(["plan", "--config", str(run_yaml), "--method", method, "--json", "--device-memory", "1GiB",
                 *extra]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_parts_of_full_lora_and_nf4_steps(checkpoint, run_yaml, capsys):
    """Full SFT trains every weight (float32 masters, Adam's two moments); LoRA DPO trains its adapters only, over a
    frozen float base; on an nf4 base that base is its 4-bit storage. The compiled total holds them all."""
    full = planned(capsys, run_yaml, "sft")
    config = recipe.load_run_config(str(run_yaml), [], method="sft")
    model = plan.abstract_model(plan.model_config(config.model), config, lora=False)
    weights = sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert full["trained_weights"] == weights and full["frozen_weights"] == 0 == full["quantized_base"]
    assert 2 * weights <= full["optimizer_state"] < 2 * weights + 1024
    assert full["total"] >= full["trained_weights"] + full["optimizer_state"] and full["temporaries"] > 0
    assert full["fits"] is True
    fields = {field.name for field in dataclasses.fields(plan.Plan)}
    text = plan.report(plan.Plan(**{k: v for k, v in full.items() if k in fields}), config, 1000, None).splitlines()
    assert text[0].startswith("jaxalign plan: sft on ") and "batch 4 x 16 tokens" in text[0]
    assert text[-1].startswith("does not fit: ") and "1.0 GiB" not in text[-1]

    lora = planned(capsys, run_yaml, "dpo", LORA, "reference=lora_base")
    with_lora = plan.abstract_model(plan.model_config(config.model), recipe.load_run_config(
        str(run_yaml), [LORA], method="sft"), lora=True)
    adapters = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(with_lora, nnx.LoRAParam)))
    assert 0 < adapters < weights / 40
    assert lora["trained_weights"] == 4 * adapters and lora["reference"] == 0
    assert lora["frozen_weights"] == weights and lora["quantized_base"] == 0
    qlora = planned(capsys, run_yaml, "dpo", LORA, "reference=model", "model.quantize={type: nf4, block_size: 16}")
    assert 0 < qlora["quantized_base"] < (lora["frozen_weights"] - qlora["frozen_weights"]) / 5
    assert qlora["reference"] > qlora["quantized_base"]  # the reference: a second, quantised, copy
    sft_qlora = planned(capsys, run_yaml, "sft", LORA, "model.quantize={type: nf4, block_size: 16}")
    assert sft_qlora["quantized_base"] == qlora["quantized_base"] and sft_qlora["trained_weights"] == 4 * adapters


def test_an_fsdp_mesh_shards_the_state(checkpoint, run_yaml):
    """``--mesh fsdp=2`` compiles the 2-device program (emulated devices in a child process, started from a
    process whose JAX has one device, as a user's shell command is)."""
    command = [sys.executable, "-m", "jaxalign.cli", "plan", "--config", str(run_yaml), "--method", "sft", "--mesh",
               "fsdp=2", "--device", "v5e", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, env=python_env(1), timeout=600,
                            cwd=run_yaml.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads(result.stdout[result.stdout.index("{"):])
    config = recipe.load_run_config(str(run_yaml), [], method="sft")
    model = plan.abstract_model(plan.model_config(config.model), config, lora=False)
    weights = sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert sharded["mesh"]["fsdp"] == 2 and weights / 2 <= sharded["trained_weights"] <= 0.55 * weights
    assert sharded["fits"] is True and sharded["device_memory"] == plan.DEVICES["v5e"]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_give_the_published_sizes(name, run_yaml):
    config = recipe.load_run_config(str(run_yaml), ["model.param_dtype=bfloat16"], method="sft")
    architecture = plan.model_config(config.model, CONFIGS / f"{name}.json")
    model = plan.abstract_model(architecture, config, lora=False)
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == pytest.approx(PUBLISHED[name], rel=1e-3)


@pytest.mark.parametrize("arguments, message", [
    (["--device", "h100"], "argument --device: invalid choice: 'h100'"),
    (["--mesh", "fsdp=x"], "--mesh: the size of fsdp must be a positive int, got 'x'"),
    (["--device-memory", "lots"], "--device-memory 'lots': expected a size such as 24GiB"),
    (["--model-config", "missing/config.json"], "--model-config missing/config.json: no such file"),
    (["model.quantize.block_size=64", "model.quantize.type=nf4", LORA],
     "model.quantize.block_size=64 does not divide the input dimension 32"),
])
def test_bad_input_is_one_line_naming_the_option(run_yaml, capsys, arguments, message):
    with pytest.raises(SystemExit) if arguments[0] == "--device" else _nothing():
        code = main(["plan", "--config", str(run_yaml), "--method", "sft", *arguments])
        assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert message in error[-1], error


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("arguments, message", [
    (["--mesh", "fsdp=3"], "data.batch_size 4 does not split over train.micro_batches (1) x the mesh's batch shards "
                           "(data x fsdp = 3): make it a multiple of 3"),
    (["--mesh", "fsdp=8", "train.mesh.fsdp=2"],
     "--mesh fsdp=8 and train.mesh (data=1, fsdp=2, tensor=1) disagree: give the mesh once"),
    (["train.mesh.data=2"], "train.mesh (data=2, fsdp=-1, tensor=1) infers an axis from the device count"),
])
def test_a_mesh_the_run_cannot_take_is_one_line(run_yaml, capfd, arguments, message):
    """A batch the mesh does not split is named before the compile (in the child emulating the devices, whose
    stderr capfd holds), and a --mesh that a train.mesh set beside it contradicts is refused."""
    assert main(["plan", "--config", str(run_yaml), "--method", "sft", *arguments]) == 2
    error = capfd.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error


@pytest.mark.parametrize("given, configured, planned", [
    (None, MeshConfig(), MeshConfig(1, 1, 1)),
    (None, MeshConfig(1, 2, 1), MeshConfig(1, 2, 1)),
    ("fsdp=8", MeshConfig(), MeshConfig(1, 8, 1)),
    ("data=2,fsdp=4", MeshConfig(data=2), MeshConfig(2, 4, 1)),
    ("data=2,fsdp=4", MeshConfig(2, 4, 1), MeshConfig(2, 4, 1)),
])
def test_the_mesh_planned_is_the_runs(given, configured, planned):
    assert plan.planned_mesh(given, configured) == planned


# --- the online methods -------------------------------------------------------------------------------------------

ONLINE = ["reward={function: vader}", "sampling={max_new_tokens: 8}", "loss.epochs=1"]


@pytest.fixture(scope="module")
def online_plans(run_yaml) -> dict:
    """PPO with LoRA and a shared critic (a value head on the trunk, the LoRA base the reference), GRPO in groups
    of 2 with a frozen reference: each iteration's three programs compiled once for the module."""
    cases = {
        "ppo": ("ppo", [LORA, "reference=lora_base", "loss.critic=shared"]),
        "grpo": ("grpo", ["reference=model", "sampling={max_new_tokens: 8, n: 2}", "loss.num_minibatches=2",
                          "loss.kl_coef=0.05"]),
    }
    plans = {}
    for name, (method, overrides) in cases.items():
        config = recipe.load_run_config(str(run_yaml), [*ONLINE, *overrides], method=method)
        plans[name] = (config, plan.plan_run(config, plan.model_config(config.model)))
    return plans


def _param_bytes(module, dtype_bytes=4) -> int:
    return sum(math.prod(x.shape) * dtype_bytes for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_a_separate_critic_is_a_second_trained_trunk(run_yaml):
    """Its float32 masters and Adam moments beside the policy's; the initial weights the trainer keeps are both
    trunks; the KV cache is the decode loop's per-layer buffers of prompt + response − 1 slots, sized exactly."""
    from jaxalign.methods import plan_online

    config = recipe.load_run_config(str(run_yaml), [*ONLINE, "reference=model", "loss.critic=separate"],
                                    method="ppo")
    sizes = plan_online.build_parts(config, plan.model_config(config.model)).sizes
    policy = plan.abstract_model(plan.model_config(config.model), config, lora=False)
    weights, architecture = _param_bytes(policy), policy.config
    assert sizes["trained_weights"] == weights and sizes["critic"] == weights + 4 * (architecture.d_model + 1)
    trained = weights + sizes["critic"]
    assert 2 * trained <= sizes["optimizer_state"] < 2 * trained + 1024
    assert sizes["reference"] == weights == sizes["initial_weights"] - sizes["critic"]
    assert sizes["frozen_weights"] == 0 == sizes["reward_model"] and 0 < sizes["sampler_weights"] < weights
    slots, rows = 16 + 8 - 1, 4
    kv = 2 * architecture.n_layers * rows * architecture.n_kv_heads * architecture.head_dim * slots * 4
    assert sizes["kv_cache"] == kv + rows * slots + rows * 4


def test_ppo_plans_each_phase_with_what_stays_resident(online_plans, run_yaml):
    """The total is the largest of sampling, scoring and update, each of which holds everything resident; the
    sampling program's temporaries hold the KV cache."""
    config, ppo = online_plans["ppo"]
    policy = plan.abstract_model(plan.model_config(config.model), config, lora=False)
    weights = _param_bytes(policy)
    assert 0 < ppo.critic < weights / 100 and ppo.reference == 0 and ppo.frozen_weights == weights
    assert ppo.trained_weights < weights / 40
    assert ppo.rollout == {"prompts": 4, "samples": 1, "rows": 4, "minibatch": 4, "prompt_length": 16,
                           "new_tokens": 8, "group": 0}
    assert list(ppo.phases) == ["sampling", "scoring", "update"] and ppo.total == max(ppo.phases.values())
    resident = (ppo.trained_weights + ppo.critic + ppo.optimizer_state + ppo.frozen_weights + ppo.initial_weights
                + ppo.sampler_weights)
    assert min(ppo.phases.values()) > resident and ppo.phase_temporaries["sampling"] >= ppo.kv_cache > 0
    assert ppo.batch == {name: [4, 24] for name in ("input_ids", "attention_mask", "positions")} | {
        name: [4, 8] for name in ("response_mask", "old_logps", "old_values", "advantages", "returns")}
    text = plan.report(ppo, config, 2**40, None).splitlines()
    assert text[0].startswith("jaxalign plan: ppo on ") and "4 prompts x 1 samples, 16 + 8 tokens" in text[0]
    assert any(line.split()[:3] == ["KV", "cache", "(sampling)"] for line in text)
    assert any(line.strip().startswith("total (the ") for line in text) and text[-1].startswith("fits: ")
    refused = plan.report(ppo, config, ppo.total / 2, None).splitlines()[-1]
    assert refused.startswith("does not fit: ") and "; what would: " in refused


def test_grpo_plans_groups_minibatches_and_the_json(online_plans, run_yaml, capsys):
    config, grpo = online_plans["grpo"]
    assert grpo.critic == 0 and grpo.rollout["rows"] == 8 and grpo.rollout["minibatch"] == 4
    assert grpo.batch["advantages"][0] in (4, 2)  # rows, or group rows of 2 responses
    assert "ref_logps" in grpo.batch and set(grpo.phases) == {"sampling", "scoring", "update"}
    assert grpo.kv_cache > 0 and grpo.initial_weights == grpo.reference == grpo.trained_weights
    header = plan.report(grpo, config, None, None).splitlines()[0]
    assert "4 prompts x 2 samples, 16 + 8 tokens, minibatches of 4 rows" in header
    assert ("each prompt once for its 2 responses" in header) == (grpo.rollout["group"] == 2)
    with pytest.raises(ValueError, match=r"sampling.n=1: GRPO needs groups"):
        plan.plan_run(recipe.load_run_config(str(run_yaml), ONLINE, method="grpo"),
                      plan.model_config(config.model))


def test_a_reward_model_directory_is_sized_from_its_config(checkpoint, run_yaml, tmp_path):
    """A reward model in the process is its float32 trunk and head, read from its directory's config.json and
    reward_model.json (no weights)."""
    from jaxalign.methods import plan_online

    directory = tmp_path / "rm"
    directory.mkdir()
    (directory / "config.json").write_text((checkpoint / "config.json").read_text())
    (directory / "reward_model.json").write_text(json.dumps({"gain": 1.0, "bias": 0.0, "num_objectives": None,
                                                             "pooling": "last", "head": {}}))
    config = recipe.load_run_config(str(run_yaml), [*ONLINE, "reward={composite: {external: {model: %s}}}"
                                                    % directory], method="ppo")
    lm = plan.abstract_model(plan.model_config(config.model), config, lora=False)
    trunk = _param_bytes(lm.model)
    assert plan_online.reward_model_bytes(config) == trunk + 4 * (lm.config.d_model + 1)


@pytest.mark.parametrize("arguments, message", [
    (["--method", "ppo", "reward={model: someone/reward-model}"],
     "reward.model someone/reward-model: jaxalign plan sizes a reward model from its directory's config.json"),
    (["--method", "ppo", "reward={function: vader}", "sampling={n: 2}"], "sampling.n=2: PPO samples one response"),
    (["--method", "kto"], "argument --method: invalid choice: 'kto'"),
    (["--method", "ppo", "reward={function: vader}", "loss.num_minibatches=2", "train.micro_batches=4"],
     "loss.num_minibatches=2: a minibatch of 2 rows does not split over train.micro_batches=4"),
])
def test_bad_online_input_is_one_line_naming_the_key(run_yaml, capsys, arguments, message):
    with pytest.raises(SystemExit) if "kto" in arguments else _nothing():
        assert main(["plan", "--config", str(run_yaml), *arguments]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert message in error[-1], error


def test_a_method_not_planned_is_named(run_yaml, tmp_path, capsys):
    path = tmp_path / "kto.yaml"
    path.write_text(json.dumps({**json.loads(run_yaml.read_text()), "method": "kto"}))
    assert main(["plan", "--config", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert "method kto: jaxalign plan covers the methods sft, dpo, ppo, grpo; kto is not planned yet" in error[-1]
