"""Four ways to align the embedded default with the same gold judge: SFT, human in the loop, PPO and DPO.

    python -m experiments.compare_methods [--output-dir runs/compare_methods] [--hitl-versions 2] [--overwrite]
    python -m experiments.compare_methods --smoke     # every stage on a handful of prompts (checks the code path)
    python -m experiments.compare_methods --data records.jsonl --judge reward-model:DIR   # your data, your judge

The main job's setting (``experiments.sentiment``): SmolLM2-135M-Instruct asked for short reviews and opinions,
VADER's sentiment as the gold judge standing in for a human expert. Every method trains LoRA adapters
(r = 16, alpha = 32, the seven projections) on the same base with the same train prompts, and is evaluated on the
same held-out prompts with the same sampling keys. Stages, each cached in the output directory (a rerun skips what
is done; a killed training run resumes from its checkpoints):

1. pairs: the main job's prompts and split; four base samples per train prompt, the most and least positive by the
   gold judge form a pair (``experiments.sentiment.labelled_pairs``).
2. reward: PPO's reward model, the main job's Bradley-Terry probe on the train pairs (preset ``sentiment``).
3. sft: SFT on the chosen side of each pair, the best of the base model's samples (preset ``compare_methods``).
4. dpo: DPO on the pairs, the base (adapters off) as reference.
5. ppo: PPO on the train prompts with the reward model of stage 2 (not the gold judge: as a user would).
6. hitl: ``jaxalign hitl`` started as a server; a scripted reviewer (:class:`Reviewer`) asks it the train prompts
   over HTTP, two answers at a time, exactly the requests and feedback records the page's buttons send, and acts
   on the gold judge's scores: picks the better answer, accepts a good one, edits out negative sentences, rejects
   a negative one, gives thumbs to the other. The app retrains itself every ``--hitl-threshold`` records (its own
   ``hitl`` preset: SFT, DPO and KTO stages) and hot-swaps each version in; the reviewer keeps going on the new
   version until ``--hitl-versions`` versions have been served.
7. evaluation: each method's export against the base on the held-out prompts: gold win rate with its 95 %
   interval, mean gold score, KL to the base, response length; an LLM judge's win rate on the same pairs (both
   orders asked; by default the embedded model served by ``jaxalign serve``, started and stopped by the
   experiment; ``--judge-url`` for another) with Cohen's kappa against the gold judge's verdicts, so a reader
   sees how far to trust it; plus each method's training wall time, peak memory (the training process's maximum
   resident set, from ``wait4``) and trainable parameters.

Your own data and judge: ``--data FILE`` takes the prompts from any file ``jaxalign.data`` reads (UltraMedical's
``medical_qa`` conversations, preference pairs, SFT records, prompt files; a record's prompt must be one user
question), ``--judge`` names the gold judge: ``vader`` (default), ``reward-model:DIR`` (a saved reward model, e.g.
a domain one) or ``llm:URL[#MODEL]`` (an LLM over an OpenAI-compatible endpoint grading each answer 1-10).
Without them the experiment is the main job's sentiment setting, as published.

Writes ``<output-dir>/summary.json``, ``summary.png`` and ``samples.jsonl`` (every held-out prompt with each
method's answer and gold score), prints the table and a few answers side by side. ``--smoke`` runs every stage on
a few prompts with a few steps: it proves the code path, not the comparison.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from benchmarks.provenance import describe
from experiments.judged import free_port, gold_judge, judged_cell, judged_column, llm_judge, signals_as_exit
from experiments.sentiment import labelled_pairs, make_prompts, write_jsonl
from jaxalign.eval.templates import DEFAULT_TEMPLATES
from jaxalign.serve import children

METHODS = ("sft", "hitl", "ppo", "dpo")
PRESET = "compare_methods"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RESULT_FILE = "result.json"  # a finished stage's measurements; its presence marks the stage done
SHOWN_PROMPTS = 3
SMOKE_SETTINGS = {"prompts": 10, "samples": 2, "max_new_tokens": 8, "eval_samples": 1, "hitl_threshold": 6,
                  "hitl_versions": 1}
SMOKE_OVERRIDES = {
    "reward": ["normalize_samples=4"],
    "sft": ["train.total_steps=2", "data.batch_size=2"],
    "dpo": ["train.total_steps=2", "data.batch_size=2"],
    "ppo": ["train.total_steps=1", "data.batch_size=2", "sampling.max_new_tokens=8",
            "train.checkpoint.save_every_steps=1"],
}
SERVER_START_S = 900.0  # loading and compiling the served model, bounded
VERSION_TIMEOUT_S = 3600.0  # one retraining, bounded
REQUEST_TIMEOUT_S = 300.0
STOP_TRAINING_S = 120.0  # a training run stopped by SIGTERM saves its checkpoint first


# --- measured training runs -----------------------------------------------------------------------------------


def run_measured(command: list[str], *, log: Path | None = None) -> dict:
    """Run ``command`` and return its wall time and peak memory (maximum resident set, ``wait4``).

    The command is a child that dies with this process (``jaxalign.serve.children``). Any exit while it runs (an
    error, Ctrl-C, SIGTERM or SIGHUP to this process) stops it as a user's Ctrl-C would: SIGTERM to its process
    group (a training run saves its checkpoint), SIGKILL only after ``STOP_TRAINING_S``.

    Raises:
        RuntimeError: it exited with an error (the log's last line is in the message).
    """
    started = time.perf_counter()
    output = open(log, "ab") if log else None  # noqa: SIM115 - closed below, after the process ends
    try:
        with signals_as_exit():
            process = children.spawn(command, stdout=output, stderr=subprocess.STDOUT if output else None)
            try:
                _, status, usage = os.wait4(process.pid, 0)
            except BaseException:
                children.stop(process, timeout=STOP_TRAINING_S)
                raise
    finally:
        if output:
            output.close()
    code = os.waitstatus_to_exitcode(status)
    process.returncode = code  # reaped by wait4
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log else []
        raise RuntimeError(f"{' '.join(command[:6])} ... exited with {code}{': ' + tail[0] if tail else ''}")
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def train_stage(method: str, out: Path, overrides: list[str], *, preset: str = PRESET) -> dict:
    """``jaxalign train <method> --config <preset>`` into ``out/<method>``, measured; cached in its result.json."""
    directory = out / method
    result_file = directory / RESULT_FILE
    if result_file.is_file():
        print(f"      done earlier: {result_file}")
        return json.loads(result_file.read_text())
    command = [sys.executable, "-m", "jaxalign.cli", "train", method, "--config", preset,
               f"output_dir={directory}", *overrides]
    resumed = directory.exists()
    if resumed:
        command.append("--resume")  # an interrupted run continues from its checkpoints (wall time: this part)
    result = run_measured(command) | {"export": str(directory / "export"), "resumed": resumed}
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


# --- the scripted reviewer --------------------------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


class Reviewer:
    """A stand-in for the expert that acts on the gold judge's scores, through the app's HTTP interface.

    For each question it asks for two answers (``n=2``, as the page's "two answers" button) and sends, in order:

    - ``pick`` of the better answer when their gold scores differ by at least ``pick_gap``;
    - on the better answer: ``accept`` if it scores at least ``good``; otherwise ``edit`` if removing its
      negative sentences leaves text that scores ``edit_gain`` more (what an editor of this judge would do;
      the reviewer cannot write new text); otherwise ``reject`` if it is negative;
    - on the other answer: ``thumbs_up`` if it scores at least ``good``, ``thumbs_down`` if negative.
    """

    def __init__(self, url: str, model: str, judge, *, max_tokens: int, pick_gap: float = 0.05, good: float = 0.5,
                 edit_gain: float = 0.1):
        self.url, self.model = url, model
        self.judge = judge
        self.max_tokens = max_tokens
        self.pick_gap, self.good, self.edit_gain = pick_gap, good, edit_gain
        self.actions: dict[str, int] = {}

    def score(self, texts: list[str], prompt: str = "") -> list[float]:
        return [float(s) for s in self.judge.score([prompt] * len(texts), texts)]

    def ask(self, prompt: str, seed: int) -> tuple[list[str], str]:
        """Two answers to ``prompt`` and the version that gave them (``system_fingerprint``)."""
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "n": 2,
                "max_tokens": self.max_tokens, "temperature": 1.0, "seed": seed}
        reply = post(self.url + "/v1/chat/completions", body)
        return [choice["message"]["content"].strip() for choice in reply["choices"]], reply["system_fingerprint"]

    def review(self, prompt: str, answers: list[str], version: str) -> list[dict]:
        """The feedback records for one question (see the class docstring)."""
        scores = self.score(answers, prompt)
        best, other = (0, 1) if scores[0] >= scores[1] else (1, 0)
        base = {"prompt": prompt, "model_version": version}
        records = []
        if abs(scores[0] - scores[1]) >= self.pick_gap and answers[0] != answers[1]:
            records.append(base | {"action": "pick", "choice": {"responses": answers, "chosen": best}})
        answer, score = answers[best], scores[best]
        kept = " ".join(s for s in split_sentences(answer) if self.score([s], prompt)[0] >= 0)
        if answer and score >= self.good:
            records.append(base | {"action": "accept", "response": answer})
        elif kept and kept != answer and self.score([kept], prompt)[0] >= score + self.edit_gain:
            records.append(base | {"action": "edit", "response": answer, "edit": kept})
        elif answer and score < 0:
            records.append(base | {"action": "reject", "response": answer})
        if answers[other] and answers[other] != answer:
            if scores[other] >= self.good:
                records.append(base | {"action": "thumbs_up", "response": answers[other]})
            elif scores[other] < 0:
                records.append(base | {"action": "thumbs_down", "response": answers[other]})
        return records

    def send(self, record: dict) -> dict:
        reply = post(self.url + "/hitl/feedback", record)
        self.actions[record["action"]] = self.actions.get(record["action"], 0) + 1
        return reply


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"POST {url}: {error.code} {error.read().decode(errors='replace')[:500]}") from error


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT_S) as response:
        return json.loads(response.read())


def wait_for_server(url: str, process: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jaxalign hitl exited with {process.returncode} while starting (see {log})")
        try:
            return get(url + "/hitl/state")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(2.0)
    raise RuntimeError(f"jaxalign hitl did not answer within {SERVER_START_S:.0f} s (see {log})")


def wait_for_version(url: str, name: str, bar: tqdm) -> dict:
    """Block until ``name`` is served (its training shown on ``bar``); raise if it fails or takes too long."""
    deadline = time.monotonic() + VERSION_TIMEOUT_S
    while time.monotonic() < deadline:
        state = get(url + "/hitl/state")
        if version_served(state, name):
            return state
        status = state["retrain"]
        bar.set_postfix_str(f"{name}: {status['stage'] or status['state']} step {status['step']}/{status['steps']}")
        time.sleep(2.0)
    raise RuntimeError(f"version {name} was not served within {VERSION_TIMEOUT_S:.0f} s")


def version_served(state: dict, name: str) -> bool:
    """Whether ``/hitl/state`` shows ``name`` served (False while it trains or waits to be started).

    Raises:
        RuntimeError: ``name`` failed (the app retries the newest failed version when it starts again: rerun the
            experiment once its cause is fixed).
    """
    if state["serving"] == name:
        return True
    failed = [v for v in state["versions"] if v["name"] == name and v["status"] == "failed"]
    if failed and not (state["retrain"]["state"] == "training" and state["retrain"]["version"] == name):
        raise RuntimeError(f"retraining {name} failed: {failed[0]['error']} (rerun the experiment to retry it)")
    return False


def stop_server(server: subprocess.Popen, timeout: float = 120.0):
    """SIGINT (uvicorn's graceful shutdown; the app stops a running retraining), SIGKILL to its process group after
    ``timeout``; returns the server's resource usage (None if it had already been reaped)."""
    if server.returncode is not None:
        return None
    server.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    while not (ended := os.wait4(server.pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            children.signal_group(server.pid, signal.SIGKILL)
            ended = os.wait4(server.pid, 0)
            break
        time.sleep(0.5)
    server.returncode = os.waitstatus_to_exitcode(ended[1])
    return ended[2]


def hitl_stage(out: Path, prompts: list[str], *, threshold: int, versions: int, max_tokens: int, seed: int,
               judge, server_options: tuple[str, ...] = ()) -> dict:
    """The human-in-the-loop app with the scripted reviewer, until ``versions`` versions have been served.

    The app is a child of this process that dies with it, and any exit of this stage stops it (an error, Ctrl-C,
    SIGTERM or SIGHUP; a SIGKILL through Linux's parent-death signal). ``server_options`` go to ``jaxalign hitl``
    after the experiment's own (a test's tiny model, say)."""
    directory = out / "hitl"
    result_file = directory / RESULT_FILE
    if result_file.is_file():
        print(f"      done earlier: {result_file}")
        return json.loads(result_file.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), directory / "server.log"
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "jaxalign.cli", "hitl", "--output-dir", str(directory), "--port", str(port),
               "--retrain-threshold", str(threshold), "--max-tokens", str(max_tokens), "--max-batch", "8",
               "--max-model-len", "256"]
    command += list(server_options)
    started = time.perf_counter()
    order = random.Random(seed).sample(prompts, len(prompts))
    asked = 0
    with signals_as_exit():
        with open(log, "ab") as output:
            server = children.spawn(command, stdout=output, stderr=subprocess.STDOUT)
        try:
            state = wait_for_server(url, server, log)
            reviewer = Reviewer(url, state["model"], judge, max_tokens=max_tokens)
            first = int(state["serving"][1:])  # a restarted experiment continues from the version served
            with tqdm(total=versions, unit="version", desc="hitl", dynamic_ncols=True,
                      initial=min(first, versions)) as bar:
                for number in range(first + 1, versions + 1):
                    # Questions go in batches the server decodes together; feedback is sent in question order.
                    while get(url + "/hitl/state")["retrain"]["state"] == "idle":
                        batch = [order[(asked + i) % len(order)] for i in range(8)]
                        with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
                            replies = list(pool.map(reviewer.ask, batch,
                                                    [seed * 100003 + asked + i for i in range(8)]))
                        asked += len(batch)
                        for prompt, (answers, version) in zip(batch, replies):
                            for record in reviewer.review(prompt, answers, version):
                                reviewer.send(record)
                        bar.set_postfix_str(f"asked {asked}, feedback {sum(reviewer.actions.values())}")
                    wait_for_version(url, f"v{number}", bar)
                    bar.update(1)
            loop_seconds = time.perf_counter() - started
        finally:
            usage = stop_server(server)
    served = json.loads((directory / "versions" / f"v{versions}" / "version.json").read_text())
    stage_runs = [info for v in range(1, versions + 1)
                  for info in json.loads((directory / "versions" / f"v{v}" / "version.json").read_text())
                  ["stages"].values() if "seconds" in info]
    server_peak = usage.ru_maxrss / 1024 if usage else float("nan")
    result = {
        "export": served["model"],
        "seconds": round(loop_seconds, 1),  # the whole loop: the reviewer's questions, the retrainings, the swaps
        "training_seconds": round(sum(info["seconds"] for info in stage_runs), 1),
        # The server and a training stage are resident together.
        "peak_rss_mib": round(server_peak + max((info["peak_rss_mib"] for info in stage_runs), default=0.0), 1),
        "server_peak_rss_mib": round(server_peak, 1),
        "questions": asked, "actions": reviewer.actions, "versions": versions,
    }
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


# --- evaluation, report ----------------------------------------------------------------------------------------


def trainable_parameters() -> dict[str, int]:
    """Per method: the LoRA adapters of the seven projections (PPO also trains its value head on the shared
    trunk). Counted on a model of its own: LoRA is applied in place."""
    import jax
    from flax import nnx

    from jaxalign import models

    model, _ = models.load_gguf(models.default_model_path())
    models.apply_lora(model, models.LoRAConfig(rank=16, alpha=32, targets=LORA_TARGETS), rngs=nnx.Rngs(0))
    size = lambda state: int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(state)))  # noqa: E731
    adapters = size(nnx.state(model, nnx.LoRAParam))
    value_head = size(nnx.state(models.ValueHead(model.config.d_model, rngs=nnx.Rngs(0))))
    return {method: adapters + (value_head if method == "ppo" else 0) for method in METHODS}


def evaluate(out: Path, method: str, export: str, reference, tokenizer, prompts: list[str], *, judge, samples: int,
             max_new_tokens: int, seed: int) -> dict:
    """The gold evaluation of one method against the base (cached in ``evaluation/<method>.json``)."""
    import jax

    from jaxalign import eval as jeval
    from jaxalign import models
    from jaxalign.rollout import SamplingParams

    cache = out / "evaluation" / f"{method}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    policy, _ = models.load_pretrained(export, source=f"{method} export")
    evaluation = jeval.evaluate_policy(
        policy, reference, tokenizer, prompts, judge=judge,
        params=SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0), samples_per_prompt=samples,
        key=jax.random.key(seed + 2), batch_size=32)  # the same key for every method: the same base samples
    result = evaluation.to_dict() | {"records": [
        {"prompt": r["prompt"], "response": r["policy"], "gold": r["gold_policy"], "base": r["reference"],
         "gold_base": r["gold_reference"]} for r in evaluation.records]}
    cache.parent.mkdir(exist_ok=True)
    cache.write_text(json.dumps(result, default=float) + "\n")
    return result


def table(rows: dict[str, dict]) -> str:
    header = ("method", "gold win rate vs base [95% CI]", "LLM-judged [95% CI], kappa vs gold", "gold score",
              "KL (nats)", "length", "wall time", "peak memory", "trainable")
    lines = [header]
    for method, row in rows.items():
        win, gold, kl = row["win_rate"], row["gold_reward"]["policy"], row["kl"]
        lines.append((method, f"{win['rate']:.1%} [{win['low']:.1%}, {win['high']:.1%}]",
                      judged_cell(row.get("judged")),
                      f"{gold['mean']:+.3f}", f"{kl['mean']:.2f}", f"{row['response_length']['policy']['mean']:.1f}",
                      f"{row['seconds'] / 60:.1f} min", f"{row['peak_rss_mib'] / 1024:.2f} GiB",
                      f"{row['trainable_parameters'] / 1e6:.2f} M"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines)


def plot(rows: dict[str, dict], base_gold: float, path: Path, *, judge_name: str = "VADER") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    colours = [f"C{i}" for i in range(len(names))]
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    judged = {n: rows[n]["judged"]["win_rate"] for n in names
              if rows[n].get("judged") and rows[n]["judged"].get("win_rate")}
    width = 0.4 if judged else 0.8
    xs = np.arange(len(names))
    win = [rows[n]["win_rate"] for n in names]
    axes[0].bar(xs - (width / 2 if judged else 0), [w["rate"] for w in win], width, color=colours, capsize=4,
                yerr=[[w["rate"] - w["low"] for w in win], [w["high"] - w["rate"] for w in win]],
                label=f"gold ({judge_name})")
    if judged:
        kept = [i for i, n in enumerate(names) if n in judged]
        rates = [judged[names[i]] for i in kept]
        axes[0].bar(xs[kept] + width / 2, [w["rate"] for w in rates], width, color="white", edgecolor="black",
                    hatch="//", capsize=4, label="LLM judge",
                    yerr=[[w["rate"] - w["low"] for w in rates], [w["high"] - w["rate"] for w in rates]])
        for i in kept:
            kappa = rows[names[i]]["judged"]["agreement_with_gold"]["kappa"]
            axes[0].text(xs[i] + width / 2, 0.02, "κ " + ("-" if kappa is None else f"{kappa:.2f}"), ha="center",
                         fontsize=7, rotation=90)
    axes[0].set_xticks(xs, names)
    axes[0].axhline(0.5, color="grey", ls="--", lw=1)
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    axes[0].set_title("win rate vs base per judge (95% CI)")
    gold = [rows[n]["gold_reward"]["policy"] for n in names]
    axes[1].bar(names, [g["mean"] for g in gold], color=colours, capsize=6,
                yerr=[[g["mean"] - g["low"] for g in gold], [g["high"] - g["mean"] for g in gold]])
    axes[1].axhline(base_gold, color="grey", ls="--", lw=1, label=f"base {base_gold:+.2f}")
    axes[1].set_title(f"mean gold score ({judge_name})")
    axes[1].legend(fontsize=8)
    kl = [rows[n]["kl"] for n in names]
    axes[2].bar(names, [k["mean"] for k in kl], color=colours, capsize=6,
                yerr=[[k["mean"] - k["low"] for k in kl], [k["high"] - k["mean"] for k in kl]])
    axes[2].set_title("KL to the base (nats per response)")
    axes[3].bar(names, [rows[n]["seconds"] / 60 for n in names], color=colours)
    axes[3].set_title("wall time (min); peak memory on the bars")
    for i, name in enumerate(names):
        axes[3].text(i, rows[name]["seconds"] / 60, f"{rows[name]['peak_rss_mib'] / 1024:.1f} GiB", ha="center",
                     va="bottom", fontsize=8)
    for axis in axes:
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle("SmolLM2-135M-Instruct, LoRA r=16 on the seven projections, held-out prompts; gold judge "
                    f"{judge_name}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def side_by_side(rows: dict[str, dict]) -> list[dict]:
    """Per held-out row: the prompt, the base's answer and each method's, with gold scores."""
    first = next(iter(rows.values()))["records"]
    samples = []
    for i, record in enumerate(first):
        sample = {"prompt": record["prompt"], "base": record["base"], "gold_base": record["gold_base"]}
        for method, row in rows.items():
            sample[method] = row["records"][i]["response"]
            sample[f"gold_{method}"] = row["records"][i]["gold"]
        samples.append(sample)
    return samples


def show(samples: list[dict], methods, count: int) -> str:
    shown, seen = [], set()
    for sample in samples:
        prompt = sample["prompt"] if isinstance(sample["prompt"], str) else json.dumps(sample["prompt"])
        if prompt in seen:
            continue
        seen.add(prompt)
        lines = [f"prompt: {prompt}", f"  base ({sample['gold_base']:+.2f}): {sample['base']}"]
        lines += [f"  {m} ({sample[f'gold_{m}']:+.2f}): {sample[m]}" for m in methods]
        shown.append("\n".join(lines))
        if len(shown) == count:
            break
    return "\n\n".join(shown)


# --- main ------------------------------------------------------------------------------------------------------


def question_of(record, path: Path, number: int) -> str:
    """The one user question a record of ``path`` asks (its prompt; a conversation's turns before its last reply).

    Raises:
        ValueError: the record has no prompt, or a prompt of several turns (the methods here answer one question).
    """
    from jaxalign import data as jdata

    if isinstance(record, jdata.ScoredConversation):
        prompt = tuple(record.messages[:-1])
    elif isinstance(record, jdata.PreferenceGroup):
        prompt = record.pairs[0].prompt
    else:
        prompt = getattr(record, "prompt", None)
    if isinstance(prompt, str):
        text = prompt
    else:
        users = [m for m in prompt or () if m.role != "system"]
        if len(users) != 1 or users[0].role != "user":
            raise ValueError(f"{path}, record {number}: field 'prompt': {len(users)} turns before the answer; the "
                             "comparison asks one user question per record")
        text = users[0].content
    if not text.strip():
        raise ValueError(f"{path}, record {number}: field 'prompt' is empty")
    return text.strip()


def prompts_from(path: Path, count: int, seed: int) -> list[str]:
    """Up to ``count`` distinct questions of the records in ``path`` (any format ``jaxalign.data`` reads), in a
    seeded order."""
    from jaxalign import data as jdata

    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    records, _ = jdata.read_records(path)
    questions = list(dict.fromkeys(question_of(r, path, i) for i, r in enumerate(records, start=1)))
    if len(questions) < 5:
        raise ValueError(f"--data {path}: {len(questions)} distinct question(s); the comparison needs at least 5 "
                         "(one in five is held out)")
    order = np.random.default_rng(seed).permutation(len(questions))
    return [questions[i] for i in order[:count]]


def judge_rows(out: Path, rows: dict[str, dict], spec, *, samples: int) -> None:
    """Each method's LLM-judged column (``row["judged"]``) on the first ``samples`` samples per held-out prompt,
    cached beside its evaluation."""
    for method, row in rows.items():
        cache = out / "evaluation" / f"{method}.judged.json"
        if cache.is_file() and json.loads(cache.read_text())["judge"] == spec.name:
            row["judged"] = json.loads(cache.read_text())
            continue
        records = [r for i, r in enumerate(row["records"]) if i % row["samples_per_prompt"] < samples]
        row["judged"] = judged_column(spec, [r["prompt"] for r in records], [r["response"] for r in records],
                                      [r["base"] for r in records], [r["gold"] for r in records],
                                      [r["gold_base"] for r in records], clusters=[r["prompt"] for r in records],
                                      label=method)
        cache.write_text(json.dumps(row["judged"], default=float) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/compare_methods"))
    parser.add_argument("--data", type=Path, default=None,
                        help="take the prompts from these records (any format jaxalign.data reads, e.g. "
                             "UltraMedical medical_qa); default: the main job's review/opinion prompts")
    parser.add_argument("--judge", default="vader", metavar="vader|reward-model:DIR|llm:URL[#MODEL]",
                        help="the gold judge: labels the pairs, guides the scripted reviewer, scores the evaluation "
                             "(default vader)")
    parser.add_argument("--prompts", type=int, default=320, help="prompts in all (80%% train, 20%% held out)")
    parser.add_argument("--samples", type=int, default=4, help="base samples per train prompt for the pairs")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=2, help="samples per held-out prompt and method")
    parser.add_argument("--hitl-threshold", type=int, default=48, help="feedback records per HITL version")
    parser.add_argument("--hitl-versions", type=int, default=2, help="HITL versions trained and served")
    parser.add_argument("--judge-url", help="the LLM judge's OpenAI-compatible base URL (default: the embedded model "
                                            "served by jaxalign serve, started and stopped by the experiment)")
    parser.add_argument("--judge-model", help="the judge model's name at --judge-url")
    parser.add_argument("--judge-samples", type=int, default=1,
                        help="held-out samples per prompt the LLM judge compares (default 1: the first)")
    parser.add_argument("--no-llm-judge", action="store_true", help="leave out the LLM-judged column")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help=f"every stage, tiny ({SMOKE_SETTINGS})")
    parser.add_argument("--overwrite", action="store_true", help="start again: delete the output directory first")
    args = parser.parse_args(argv)
    overrides = {stage: [] for stage in SMOKE_OVERRIDES}
    if args.smoke:
        for name, value in SMOKE_SETTINGS.items():
            setattr(args, name, value)
        overrides = dict(SMOKE_OVERRIDES)
    if args.judge_model and not args.judge_url:
        parser.error("--judge-model goes with --judge-url")
    # Bad input is refused here, before minutes of loading and sampling.
    judge = gold_judge(args.judge)
    prompts = (make_prompts(args.prompts, args.seed) if args.data is None
               else prompts_from(args.data, args.prompts, args.seed))
    out = args.output_dir
    if args.overwrite and out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()  # of this invocation: stages cached by an earlier one are not counted

    from jaxalign import models

    judge_name = getattr(judge, "name", type(judge).__name__)
    held_out = max(1, len(prompts) // 5)  # the main job's split
    train_prompts, eval_prompts = prompts[held_out:], prompts[:held_out]
    base, tokenizer = models.load_gguf(models.default_model_path())
    settings = {"prompts": args.prompts, "samples": args.samples, "max_new_tokens": args.max_new_tokens,
                "seed": args.seed}
    if args.data is not None or args.judge != "vader":  # the default run's cache key stays as it was
        settings |= {"data": None if args.data is None else str(args.data.resolve()), "judge": args.judge}

    print(f"[1/7] pairs: {args.samples} base samples per train prompt, best vs worst by the gold judge ({judge_name})")
    train_pairs, _, left_out, _ = labelled_pairs(
        out, base, tokenizer, train_prompts, eval_prompts, settings=settings, seed=args.seed,
        samples=args.samples, max_new_tokens=args.max_new_tokens, batch_size=32, judge=judge)
    prompt_file = write_jsonl(out / "prompts_train.jsonl",
                              [{"prompt": [{"role": "user", "content": p}]} for p in train_prompts])
    print(f"      {len(train_pairs)} train pairs (left out: {left_out})")
    pairs = [f"data.source={out / 'pairs_train.jsonl'}"]
    runs = {}

    print("[2/7] reward model for PPO: the main job's Bradley-Terry probe on the train pairs")
    reward = train_stage("reward", out, pairs + overrides["reward"], preset="sentiment")
    print("[3/7] SFT on the best sampled answers (LoRA)")
    runs["sft"] = train_stage("sft", out, pairs + overrides["sft"])
    print("[4/7] DPO on the pairs (LoRA)")
    runs["dpo"] = train_stage("dpo", out, pairs + overrides["dpo"])
    print("[5/7] PPO on the reward model (LoRA)")
    runs["ppo"] = train_stage("ppo", out, [f"data.source={prompt_file}", f"reward.model={reward['export']}"]
                              + overrides["ppo"])
    print(f"[6/7] human in the loop: jaxalign hitl and a scripted reviewer, {args.hitl_versions} versions of "
          f"{args.hitl_threshold} records")
    runs["hitl"] = hitl_stage(out, train_prompts, threshold=args.hitl_threshold, versions=args.hitl_versions,
                              max_tokens=args.max_new_tokens, seed=args.seed, judge=judge)
    print(f"      {runs['hitl']['questions']} questions, feedback {runs['hitl']['actions']}")

    print(f"[7/7] evaluation on {len(eval_prompts)} held-out prompts, {args.eval_samples} samples each")
    rows, trainable = {}, trainable_parameters()
    for method in METHODS:
        evaluation = evaluate(out, method, runs[method]["export"], base, tokenizer, eval_prompts, judge=judge,
                              samples=args.eval_samples, max_new_tokens=args.max_new_tokens, seed=args.seed)
        rows[method] = evaluation | runs[method] | {"trainable_parameters": trainable[method]}
    if not args.no_llm_judge:
        print(f"      LLM judge on {min(args.judge_samples, args.eval_samples)} sample(s) per held-out prompt "
              f"and method, against the base")
        # The sentiment setting asks the judge the gold judge's question; the user's data, the default one.
        templates = None if args.judge == "vader" and args.data is None else dict(DEFAULT_TEMPLATES)
        with llm_judge(out, url=args.judge_url, model=args.judge_model, templates=templates) as spec:
            judge_rows(out, rows, spec, samples=args.judge_samples)
    base_gold = rows["sft"]["gold_reward"]["reference"]["mean"]
    samples = side_by_side(rows)
    write_jsonl(out / "samples.jsonl", samples)
    summary = {"provenance": describe(), "total_minutes": round((time.perf_counter() - started) / 60, 1),
               "settings": vars(args) | {"output_dir": str(out)}, "gold_judge": judge_name,
               "base_gold_reward": base_gold, "reward_model": reward,
               "methods": {m: {k: v for k, v in row.items() if k != "records"} for m, row in rows.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    plot(rows, base_gold, out / "summary.png", judge_name=judge_name)
    print()
    print(table(rows))
    print(f"\nbase model's mean gold score {base_gold:+.3f}; held-out answers side by side "
          f"(gold score in brackets; all in {out / 'samples.jsonl'}):\n")
    print(show(samples, METHODS, SHOWN_PROMPTS))
    print(f"\nwrote {out / 'summary.json'} and {out / 'summary.png'}")
    if args.smoke:
        print("smoke run: every stage ran (the comparison needs the full run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
