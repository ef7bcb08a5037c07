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
