"""``jaxalign eval`` end to end on tiny saved checkpoints (random Llamas + the word-level ChatML tokenizer of
tests/test_cli.py), through ``jaxalign.cli.main`` with a parser that registers the command."""

from __future__ import annotations

import argparse
import json

import pytest
from flax import nnx

from jaxalign import cli, data, models
from jaxalign.eval import perplexity, reward_accuracy
from jaxalign.eval.command import add_eval_command
from tests.models.conftest import make_hf_model
from tests.test_cli import tiny_tokenizer

PAIRS = [("Hi", "sky blue .", "Go away .", 2.0), ("sky ?", "blue", "Go", 0.5), ("Go away .", "Hi", "away away", 3.0),
         ("Hi ?", "blue sky", "sky", 0.1), ("blue", "Hi Hi .", "Go Go", 1.5)]
SAMPLING = ["--max-new-tokens", "4", "--temperature", "1.0", "--n", "2", "--batch-size", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny checkpoints with tokenizer files: the policy (seed 0) and the reference (seed 1)."""
    root = tmp_path_factory.mktemp("eval_cli")
    paths = []
    for seed in (0, 1):
        directory = root / f"tiny_llama_{seed}"
        make_hf_model("llama", seed=seed).save_pretrained(directory)
        tiny_tokenizer().save_pretrained(directory)
        paths.append(directory)
    return paths


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxalign")
    parser.add_argument("--debug", action="store_true")  # the global option cli.main reads
    add_eval_command(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


@pytest.fixture
def jaxalign_eval(monkeypatch, capsys):
    """``jaxalign_eval(*args) -> (status, stdout, stderr)`` through cli.main (its error handling included)."""
    monkeypatch.setattr(cli, "build_parser", eval_parser)

    def run(*args):
        status = cli.main(["eval", *map(str, args)])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def files(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Hi"}, {"prompt": [{"role": "user", "content": "sky ?"}]}, {"prompt": "Go away ."}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": [{"role": "user", "content": p}],
                                                    "chosen": [{"role": "assistant", "content": c}],
                                                    "rejected": [{"role": "assistant", "content": r}], "margin": m}
                                                   for p, c, r, m in PAIRS])
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": [{"role": "user", "content": p}],
                                                "completion": [{"role": "assistant", "content": c}]}
                                               for p, c, _, _ in PAIRS])
    return {"prompts": prompts, "pairs": pairs, "sft": sft}


@pytest.fixture
def reward_model_dir(checkpoints, tmp_path):
    """A reward model (the reference checkpoint's trunk, a fresh head, gain 2, bias 0.5) saved with
    ``jaxalign.models.save_reward_model``; returns ``(directory, reward model, tokenizer)``."""
    tokenizer = data.load_tokenizer(checkpoints[1])
    reward_model = models.RewardModel(models.load_hf(checkpoints[1]), rngs=nnx.Rngs(7))
    directory = models.save_reward_model(tmp_path / "reward_model", reward_model, models.load_hf(checkpoints[1]),
                                         tokenizer, gain=2.0, bias=0.5)
    return directory, reward_model, tokenizer


def test_policy_against_reference_end_to_end(checkpoints, files, jaxalign_eval, reward_model_dir, tmp_path):
    policy_dir, reference_dir = checkpoints
    out = tmp_path / "out"
    status, stdout, stderr = jaxalign_eval("--policy", policy_dir, "--reference", reference_dir, "--prompts",
                                           files["prompts"], "--reward-model", reward_model_dir[0], "--output", out,
                                           *SAMPLING)
    assert status == 0, stderr
    assert "evaluating" in stderr and "wrote eval.json, eval.png, samples.jsonl" in stderr

    report = json.loads((out / "eval.json").read_text())
    assert report["policy"] == str(policy_dir) and report["reference"] == str(reference_dir)
    summary = report["policy_eval"]
    assert summary["responses"] == 6 and summary["win_rate"]["n"] == 6 and summary["judge"] == "vader"
    assert summary["learned_win_rate"]["n"] == 6 and summary["learned_judge"] == "reward_model"
    assert summary["kl"]["mean"] != 0.0
    assert report["sampling"]["n"] == 2 and report["sampling"]["max_new_tokens"] == 4
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and samples[2]["prompt"] == [{"role": "user", "content": "sky ?"}]
    assert all(0 < s["policy_tokens"] <= 4 and "learned_policy" in s for s in samples)
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert "win rate vs reference (vader)" in stdout and "win rate vs reference (reward_model)" in stdout


def test_multi_objective_reward_model_uses_saved_or_given_dimension_weights(checkpoints, files, jaxalign_eval,
                                                                            tmp_path):
    """A two-objective, per-objective normalised reward model judges the policy with the weights it was saved with,
    or with ``--dimension-weights``; without either the command says how to give them."""
    tokenizer = data.load_tokenizer(checkpoints[1])
    reward_model = models.RewardModel(models.load_hf(checkpoints[1]), num_objectives=2, rngs=nnx.Rngs(7))

    def saved(name, weights):
        return models.save_reward_model(tmp_path / name, reward_model, models.load_hf(checkpoints[1]), tokenizer,
                                        gain=[2.0, 0.5], bias=[0.1, -0.3], dimension_weights=weights)

    common = ("--policy", checkpoints[0], "--reference", checkpoints[1], "--prompts", files["prompts"], *SAMPLING)

    def learned_mean(out):
        return json.loads((out / "eval.json").read_text())["policy_eval"]["learned_reward"]["policy"]["mean"]

    status, _, stderr = jaxalign_eval(*common, "--reward-model", saved("weighted", [1.0, 0.5]),
                                      "--output", tmp_path / "a")
    assert status == 0, stderr
    status, _, stderr = jaxalign_eval(*common, "--reward-model", saved("unweighted", None),
                                      "--dimension-weights", "1,0.5", "--output", tmp_path / "b")
    assert status == 0, stderr
    assert learned_mean(tmp_path / "a") == pytest.approx(learned_mean(tmp_path / "b"))
    status, _, stderr = jaxalign_eval(*common, "--reward-model", tmp_path / "unweighted")
    assert status == 2 and "give --dimension-weights W1,W2,..." in stderr
    status, _, stderr = jaxalign_eval(*common, "--reward-model", tmp_path / "weighted", "--dimension-weights", "1,2,3")
    assert status == 2 and "dimension_weights has shape (3,)" in stderr
    status, _, stderr = jaxalign_eval(*common, "--reward-model", tmp_path / "weighted", "--dimension-weights", "1,x")
    assert status == 2 and "comma-separated numbers" in stderr


def test_reward_accuracy_and_perplexity(checkpoints, files, jaxalign_eval, reward_model_dir, tmp_path):
    """What the command reports equals the library's functions on the same batches."""
    directory, reward_model, tokenizer = reward_model_dir
    out = tmp_path / "out"
    status, stdout, stderr = jaxalign_eval("--policy", checkpoints[0], "--reward-model", directory, "--pairs",
                                           files["pairs"], "--min-margin", "1.0", "--eval-sft", files["sft"],
                                           "--batch-size", "2", "--output", out)
    assert status == 0, stderr
    assert "wrote eval.json to" in stderr and not (out / "eval.png").exists()

    def batches(path):
        return data.build_batches(data.DataConfig(str(path), batch_size=2, shuffle=False, drop_last=False,
                                                  num_epochs=1), tokenizer)

    report = json.loads((out / "eval.json").read_text())
    expected = reward_accuracy(reward_model, batches(files["pairs"]), min_margin=1.0)
    accuracy = report["reward_accuracy"]
    assert accuracy["pairs"] == 5 and accuracy["above_margin"]["pairs"] == 3
    assert {k: accuracy[k] for k in ("correct", "pairs", "above_margin")} == {
        k: expected[k] for k in ("correct", "pairs", "above_margin")}
    assert f"reward-model accuracy: {expected['accuracy']:.3f}" in stdout
    policy = models.load_hf(checkpoints[0])
    assert report["perplexity"]["perplexity"] == pytest.approx(perplexity(policy, batches(files["sft"])), rel=1e-6)
    assert report["perplexity"]["tokens"] > 0 and "perplexity:" in stdout


def test_same_policy_and_reference_from_a_text_file(checkpoints, jaxalign_eval, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\n\nsky ?\nGo away .\n")
    status, stdout, stderr = jaxalign_eval("--policy", checkpoints[0], "--reference", checkpoints[0], "--prompts",
                                           prompts, "--no-progress", *SAMPLING)
    assert status == 0, stderr
    assert "sampled once" in stderr and "evaluating" not in stderr
    win_rate_line = next(line for line in stdout.splitlines() if line.startswith("win rate"))
    assert "0.500" in win_rate_line and "0W/6T/0L of 6" in win_rate_line


@pytest.mark.parametrize(("args", "message"), [
    ([], "nothing to evaluate"),
    (["--pairs", "pairs.jsonl"], "give --reward-model"),
    (["--prompts", "/no/such/prompts.txt"], "no such file"),
    (["--eval-sft", "/no/such/sft.jsonl"], "--eval-sft /no/such/sft.jsonl: no such file"),
    (["--prompts", "p.txt", "--n", "0"], "--n must be >= 1"),
    (["--prompts", "p.txt", "--confidence", "1.5"], "--confidence must be in (0, 1)"),
])
def test_bad_arguments_are_one_line_errors(jaxalign_eval, args, message):
    status, _, stderr = jaxalign_eval(*args)
    assert status == 2 and message in stderr and "Traceback" not in stderr
    assert stderr.startswith("jaxalign eval: error:")


@pytest.mark.parametrize("option", ["--policy", "--reference"])
def test_a_missing_model_path_names_its_option(jaxalign_eval, tmp_path, option):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\n")
    status, _, stderr = jaxalign_eval(option, "/no/such/model", "--prompts", str(prompts))
    assert status == 2 and f"{option} /no/such/model: no such file or directory" in stderr
    assert "Traceback" not in stderr


def test_bad_prompt_record_names_file_and_line(checkpoints, jaxalign_eval, tmp_path):
    prompts = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi"}, {"prompt": 3}])
    status, _, stderr = jaxalign_eval("--policy", checkpoints[0], "--reference", checkpoints[0], "--prompts", prompts)
    assert status == 2 and f"{prompts}, line 2, field 'prompt'" in stderr


def test_pairs_file_with_sft_records_is_refused(files, jaxalign_eval, reward_model_dir):
    status, _, stderr = jaxalign_eval("--reward-model", reward_model_dir[0], "--pairs", files["sft"])
    assert status == 2 and "expected preference or preference_group records, got sft records" in stderr
