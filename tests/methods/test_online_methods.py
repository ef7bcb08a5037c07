"""`jaxalign train ppo|grpo` end to end on a tiny saved Llama: configs with reward functions, ADLF composites
and weighted rewards, the gold judge logged and evaluated, LoRA with the base as reference, plots, exports
that load back, and clear errors for bad configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxalign import models
from jaxalign.cli import main
from jaxalign.methods import pipeline, recipe
from tests.models.conftest import make_hf_model
from tests.test_cli import VOCAB, tiny_tokenizer

PROMPTS = ["Hi", "sky ?", "Go away .", "blue sky", "Hi Hi ?", "away", "Go", "sky blue ."]


def count_blue(episodes) -> np.ndarray:
    """A token-counting reward for the configs below (``function: tests.methods.test_online_methods:count_blue``)."""
    return ((episodes.response_tokens == VOCAB["blue"]) & episodes.response_mask).sum(axis=1).astype(np.float64)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}], "difficulty": len(p)}) + "\n"
                            for p in PROMPTS))
    return path


def config(checkpoint, prompts, tmp_path, method, *overrides, **extra):
    values = {"method": method, "output_dir": str(tmp_path / method), "model": {"path": str(checkpoint)},
              "data": {"source": str(prompts), "batch_size": 4, "max_length": 32},
              "eval_data": {"source": str(prompts), "batch_size": 4, "max_length": 32},
              "train": {"total_steps": 3, "optimizer": {"learning_rate": 1e-2},
                        "log": {"progress_bar": False, "tensorboard": False}},
              "sampling": {"max_new_tokens": 5, "stop_token_ids": []},
              "reward": {"function": "tests.methods.test_online_methods:count_blue", "inputs": "episodes"},
              "gold": "vader", **extra}
    return recipe.load_run_config(values, list(overrides))


def test_ppo_run_logs_evaluates_plots_and_exports(checkpoint, prompts_file, tmp_path):
    run_config = config(checkpoint, prompts_file, tmp_path, "ppo", "loss.epochs=2", "loss.critic=shared",
                        "curriculum=difficulty")
    result = pipeline.run(run_config)
    out = Path(run_config.output_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all("gold_reward" in r and "reward/count_blue" in r and "value_loss" in r for r in records)
    evaluation = json.loads((out / "eval.json").read_text())["evaluation"]
    assert evaluation["prompts"] == len(PROMPTS) and evaluation["judge"] == "vader"
    assert 0.0 <= evaluation["win_rate"]["rate"] <= 1.0
    assert result.eval_metrics["kl/mean"] == pytest.approx(evaluation["kl"]["mean"])
    for png in ("metrics.png", "reward_vs_kl.png"):
        assert (out / png).stat().st_size > 0
    reloaded = models.load_hf(out / "export")
    tokens = np.array([[2, 5, 6, 7]], np.int32)
    np.testing.assert_allclose(reloaded(tokens)[0], result.model(tokens)[0], atol=1e-5)


def test_grpo_run_with_lora_weighted_rewards_and_an_adlf_composite(checkpoint, prompts_file, tmp_path):
    reward = {"weighted": [
        {"function": "tests.methods.test_online_methods:count_blue", "inputs": "episodes", "weight": 1.0,
         "name": "blue"},
        {"composite": {"alpha": 0.5, "external": {"function": "length"},
                       "internal": {"coherence": 1.0, "length_penalty": 0.5, "fluency": 0.2, "faithfulness": 0.1},
                       "target_length": 3}, "weight": 0.1, "name": "adlf"}]}
    run_config = config(checkpoint, prompts_file, tmp_path, "grpo", "sampling.n=4", "reference=lora_base",
                        "model.lora={rank: 4, alpha: 8, targets: [q_proj, v_proj]}", "loss.kl_coef=0.05",
                        reward=reward)
    pipeline.run(run_config)
    out = Path(run_config.output_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    for key in ("reward/blue", "reward/adlf", "reward/adlf/internal/coherence", "reward/adlf/internal/fluency",
                "reward/adlf/internal/faithfulness", "reward/adlf/external/length", "kl", "policy/kl"):
        assert key in last and np.isfinite(last[key]), key
    # The first iteration samples from the base itself: zero KL to the LoRA base.
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert (out / "export" / "config.json").is_file()


def test_train_command_runs_ppo_from_a_yaml_file(checkpoint, prompts_file, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps({
        "output_dir": str(tmp_path / "cli"), "model": {"path": str(checkpoint)},
        "data": {"source": str(prompts_file), "batch_size": 4, "max_length": 32},
        "train": {"total_steps": 2, "log": {"progress_bar": False, "tensorboard": False}},
        "sampling": {"max_new_tokens": 4}, "reward": {"function": "length"}, "loss": {"epochs": 1}}))
    assert main(["train", "ppo", "--config", str(path)]) == 0
    assert (tmp_path / "cli" / "export" / "config.json").is_file()


def test_online_config_errors_name_the_problem(checkpoint, prompts_file, tmp_path):
    with pytest.raises(ValueError, match="needs a reward"):
        config(checkpoint, prompts_file, tmp_path, "ppo", reward=None)
    with pytest.raises(ValueError, match="reference for ppo"):
        config(checkpoint, prompts_file, tmp_path, "ppo", "reference=none")
    with pytest.raises(ValueError, match="unknown PPO option"):
        pipeline.run(config(checkpoint, prompts_file, tmp_path, "ppo", "loss.clip=0.1"))
    with pytest.raises(ValueError, match="sampling: unknown key"):
        pipeline.run(config(checkpoint, prompts_file, tmp_path, "grpo", "sampling.groups=4"))
    with pytest.raises(ValueError, match="GRPO needs groups"):
        pipeline.run(config(checkpoint, prompts_file, tmp_path, "grpo"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi", "chosen": " blue", "rejected": " red"}) + "\n")
    held_out_pairs = config(checkpoint, prompts_file, tmp_path, "ppo", f"eval_data.source={pairs}",
                            f"output_dir={tmp_path / 'refused'}")
    with pytest.raises(ValueError, match=r"eval_data .*pairs.jsonl: method ppo evaluates on prompt records .*the "
                                         r"file holds PreferenceRecord"):
        pipeline.run(held_out_pairs)
    assert not Path(held_out_pairs.output_dir).exists()  # refused before training, nothing left behind


def test_ppo_on_a_gpt2_checkpoint_with_a_separate_critic_and_the_faithfulness_signal(prompts_file, tmp_path):
    directory = tmp_path / "tiny_gpt2"
    make_hf_model("gpt2").save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    reward = {"composite": {"alpha": 0.5, "external": {"function": "length"}, "internal": {"faithfulness": 1.0}}}
    run_config = config(directory, prompts_file, tmp_path, "ppo", "train.total_steps=2", "loss.critic=separate",
                        "eval_data=null", reward=reward)
    pipeline.run(run_config)
    records = [json.loads(line) for line in (Path(run_config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["reward/internal/faithfulness"]) for r in records)
