"""Guided decoding speed against the public implementations' strategies: jaxalign's batched sampler vs batch 1.

LLMDoctor's guided decoding draws each token from ``softmax(α·log π_patient + β·log π_doctor)`` after a top-p
filter. The public code that does this (and its closest relatives) decodes one prompt at a time; this benchmark
implements their two per-token strategies in PyTorch/transformers, on the same models, prompts and rule, and
times jaxalign's batched, jitted guided decoding against both.

What the public implementations do per token (read for this benchmark; no code was copied):

- **LLMDoctor** (arXiv 2601.10416): the public implementation, ``Yellow4Submarine7/LLMdoctor2`` (its README
  calls it the official one), ``src/inference/reward_guided_decoder.py``: ``RewardGuidedDecoder.generate`` loops
  over new tokens; ``_generate_next_token`` runs the patient on **the whole sequence so far** (``input_ids`` and
  ``attention_mask``, no ``past_key_values``; the ``use_cache`` field of its config is never read) and takes the
  last position's logits; ``FlowGuidedRewardModel.compute_token_rewards`` (``flow_guided_reward.py``) runs the
  doctor on the whole sequence too, log-softmaxes the last position (adding the value head's ``V(s_t)``, a
  constant per row, then log-softmaxing again, which leaves the distribution unchanged); the two are combined as
  ``α·log π_patient + β·log π_doctor``, top-p filtered (sort, cumulative softmax, drop above ``p``), sampled with
  ``torch.multinomial``, and the token is concatenated to ``input_ids``. ``GuidedGenerator.generate``
  (``guided_generation.py``) hands it one prompt (``batch_generate`` loops ``generate`` over the prompts one by
  one), and so does ``inference.py``. The earlier ``Yellow4Submarine7/LLMdoctor``
  (``llmdoctor/core/online_alignment.py``, ``OnlineAlignment.generate_sequence``) has the same shape: one prompt,
  the whole token list re-fed to both models at every step (its model calls are placeholders there).
- **ARGS** (``deeplearning-wisc/args``, ``argsearch.py``, ``ARGS.generate`` / ``generate_step``): one prompt at a
  time, but **not** uncached as the issue says: with the transformers 4.34 it pins,
  ``prepare_inputs_for_generation(..., past_key_values=cached)`` cuts the input to the last token, so the LM
  decodes one token per step on its KV cache; per step the reward model scores the LM's top-k candidates as a
  batch of k sequences on its own cache (``rm_cached``, reordered to the chosen candidate with
  ``_reorder_cache``). Its reward model gives a scalar per candidate, not a next-token distribution, so it does
  not fit LLMDoctor's rule; per token it is a KV-cached batch-1 strategy (plus k reward-model rows), the second
  baseline below, not the first.
- **GenARM** (``Yuancheng-Xu/GenARM``, ``evaluation/HH/generate_outputs_HH.py``): one prompt per
  ``ModelArithmetic.generate_text`` call (the script loops over prompts), formula ``M_base + alpha·M_arm``
  (language-model-arithmetic, ``model_arithmetic.py``: ``next_token_speculative`` → ``forward_model`` per model;
  ``runnable_operators.py``: ``PromptedLLM.run`` keeps **one KV cache per model**, ``prepare_inputs`` feeds only
  the new token with ``past_key_values``, then log-softmax; ``create_sample_logprobs`` sums the weighted
  log-probs, applies temperature / top-k / top-p, and ``normal_sample`` draws with ``torch.multinomial``).

The strategies timed here, all with the same rule: ``α = 1``, ``β = 0.5``, top-p 0.9, temperature 1, exactly
``--new-tokens`` tokens per prompt (no stop token, so every strategy generates the same count):

- ``uncached, batch 1`` (LLMDoctor's public strategy): per prompt, per new token, both models run on the whole
  sequence so far (``use_cache=False``, all-ones ``attention_mask``, logits of every position as a plain
  ``model(...)`` call returns them), the last position's log-softmaxes are combined, top-p filtered, sampled, and
  the token appended. Its cost per token grows with the sequence, so it runs on the first ``--uncached-prompts``
  prompts only (their tokens/s is what is compared; the JSON records their prompt lengths).
- ``KV-cached, batch 1`` (GenARM's, and ARGS's for its LM): per prompt, each model prefills the prompt once and
  keeps its own ``past_key_values``; per token one forward of the new token per model, then the same combination
  and draw. Lighter than GenARM's own loop, which also splits and re-pads each model's cache per sample and
  re-decodes the whole text at every step to look for stop strings: the baseline is if anything faster than the
  public code.
- ``jaxalign (batched)``: :class:`jaxalign.rollout.GuidedSampler` over all ``--prompts`` prompts at once (one KV
  cache per model, prefill + decode loop in one compiled program), after a compiling warm-up call (compile time
  reported apart, not in tokens/s); the median of its timed calls.

The strategies run round robin so that load from other processes on a shared machine hits them alike: with
``R = --uncached-prompts`` rounds, round ``r`` decodes uncached prompt ``r``, the ``r``-th of ``R`` slices of the
prompts KV-cached, and one jaxalign call on all of them. Each strategy's tokens/s is the median over the rounds of
that round's tokens / seconds, so one round slowed by a burst from another process does not move it; the JSON also
has every round's rate, the overall one, and the CPU time other processes took in each round (``/proc/stat``).

Models: the patient is the embedded SmolLM2-135M-Instruct (Q4_1 GGUF dequantised, float32). Doctors: a
same-size copy of the patient (other buffers) and, with ``--doctor-layers k`` (default 4; 0 skips it), the
weak-to-strong shape ``models.first_layers(patient, k)``. The PyTorch models are the very same arrays, exported
with ``jaxalign.models.save_hf`` and loaded with ``transformers.AutoModelForCausalLM`` (float32, eager PyTorch,
``torch.set_num_threads(2)``, ``torch.inference_mode``); the run checks their logits against jaxalign's on one
prompt. Every seconds figure includes the prefill. PyTorch and XLA each use the machine's cores; the JSON records
the load that other processes put on the machine during the timed runs (from ``/proc/stat``).

    python benchmarks/guided_decoding.py [--prompts 16] [--new-tokens 32] [--uncached-prompts 4] [--doctor-layers 4]
    python benchmarks/guided_decoding.py --quick     # 2 prompts, 4 new tokens, 1 uncached prompt; writes no file

Writes ``benchmarks/results/guided_decoding.json`` (``_<backend>`` off the CPU) with the commit and machine, and
with matplotlib a PNG bar chart of the same name. Target: jaxalign ≥ 5× the KV-cached batch-1 baseline;
the ratio to the uncached one is reported.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import provenance  # benchmarks/provenance.py: run as `python benchmarks/guided_decoding.py`
from flax import nnx
from jax import monitoring
from sampling_throughput import COMPILE_EVENTS, QUESTIONS, chat_prompts
from tqdm import tqdm

from jaxalign import models
from jaxalign.rollout import GuidedSampler, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
ALPHA, BETA, TEMPERATURE = 1.0, 0.5, 1.0
TARGET_OVER_CACHED = 5.0
UNCACHED, CACHED, JAXALIGN = "uncached, batch 1", "KV-cached, batch 1", "jaxalign (batched)"


def copy_model(model: nnx.Module) -> nnx.Module:
    """An independent copy (other buffers) of ``model``: a same-size doctor that is not the patient's arrays."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


class MachineLoad:
    """CPU time the whole machine and this process spent between ``start()`` and ``stop()``, from /proc/stat."""

    def __init__(self):
        self.wall = self.machine = self.own = 0.0

    @staticmethod
    def _machine_busy_s() -> float | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user

    @staticmethod
    def _own_s() -> float:
        times = os.times()
        return times.user + times.system

    def __enter__(self):
        self._wall, self._machine, self._own = time.perf_counter(), self._machine_busy_s(), self._own_s()
        return self

    def __exit__(self, *_):
        machine = self._machine_busy_s()
        self.wall += time.perf_counter() - self._wall
        self.own += self._own_s() - self._own
        if machine is not None and self._machine is not None:
            self.machine += machine - self._machine

    @classmethod
    def combined(cls, loads: list[MachineLoad]) -> MachineLoad:
        total = cls()
        for load in loads:
            total.wall, total.machine, total.own = total.wall + load.wall, total.machine + load.machine, \
                total.own + load.own
        return total

    def summary(self) -> dict:
        wall = max(self.wall, 1e-9)
        return {"wall_s": self.wall, "own_cores": self.own / wall, "machine_cores": self.machine / wall,
                "other_processes_cores": max(0.0, (self.machine - self.own) / wall)}


def top_p_sample(torch, scores, *, top_p: float, generator):
    """One token per row from ``softmax(scores)`` restricted to the nucleus: the smallest set of most likely
    tokens whose probability reaches ``top_p`` (the first token past the threshold is kept, as transformers'
    TopPLogitsWarper and the public decoders do)."""
    ordered, order = torch.sort(scores, dim=-1, descending=True)
    cumulative = torch.cumsum(torch.softmax(ordered, dim=-1), dim=-1)
    drop = cumulative > top_p
    drop[..., 1:] = drop[..., :-1].clone()
    drop[..., 0] = False
    scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator)


def guided_scores(torch, patient_logits, doctor_logits):
    """``α·log π_patient + β·log π_doctor`` over the vocabulary, at temperature 1, for ``[B, V]`` logits."""
    patient = torch.log_softmax(patient_logits.float() / TEMPERATURE, dim=-1)
    doctor = torch.log_softmax(doctor_logits.float() / TEMPERATURE, dim=-1)
    return ALPHA * patient + BETA * doctor


def decode_uncached(torch, patient, doctor, prompt: list[int], new_tokens: int, *, top_p: float, generator,
                    progress) -> list[int]:
    """LLMDoctor's public loop: both models on the whole sequence so far at every token, no cache."""
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    for _ in range(new_tokens):
        patient_logits = patient(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
        doctor_logits = doctor(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
        token = top_p_sample(torch, guided_scores(torch, patient_logits, doctor_logits), top_p=top_p,
                             generator=generator)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        progress.update(1)
    return ids[0, len(prompt):].tolist()


def decode_cached(torch, patient, doctor, prompt: list[int], new_tokens: int, *, top_p: float, generator,
                  progress) -> list[int]:
    """GenARM's public loop: each model keeps its own ``past_key_values``; one new token per model per step."""
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    patient_out = patient(input_ids=ids, attention_mask=mask, use_cache=True)
    doctor_out = doctor(input_ids=ids, attention_mask=mask, use_cache=True)
    response = []
    for step in range(new_tokens):
        token = top_p_sample(torch, guided_scores(torch, patient_out.logits[:, -1], doctor_out.logits[:, -1]),
                             top_p=top_p, generator=generator)
        response.append(int(token))
        progress.update(1)
        if step == new_tokens - 1:
            break  # the last token is never fed back
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        patient_out = patient(input_ids=token, attention_mask=mask, past_key_values=patient_out.past_key_values,
                              use_cache=True)
        doctor_out = doctor(input_ids=token, attention_mask=mask, past_key_values=doctor_out.past_key_values,
                            use_cache=True)
    return response


def rates(rounds: list[tuple[int, float]]) -> dict:
    """Tokens/s from ``(tokens, seconds)`` per round: the median round's (the figure compared: a round slowed by
    another process's burst does not move it), every round's, and all tokens over all seconds."""
    per_round = [tokens / seconds for tokens, seconds in rounds]
    return {"tokens_per_s": statistics.median(per_round), "tokens_per_s_rounds": per_round,
            "tokens_per_s_overall": sum(t for t, _ in rounds) / sum(s for _, s in rounds)}


class Baseline:
    """One batch-1 PyTorch strategy for one doctor: decodes the prompts it is given one after the other and keeps
    the responses and per-prompt seconds (each prompt's prefill included)."""

    def __init__(self, torch, decode, patient, doctor, *, new_tokens: int, top_p: float, seed: int, progress):
        self.torch, self.decode, self.patient, self.doctor = torch, decode, patient, doctor
        self.new_tokens, self.top_p, self.progress = new_tokens, top_p, progress
        self.generator = torch.Generator().manual_seed(seed)
        self.prompts, self.responses, self.seconds, self.rounds = [], [], [], []

    def run(self, prompts, load: MachineLoad) -> None:
        """One round: these prompts one after the other."""
        round_seconds = 0.0
        with self.torch.inference_mode(), load:
            for prompt in prompts:
                start = time.perf_counter()
                response = self.decode(self.torch, self.patient, self.doctor, prompt, self.new_tokens,
                                       top_p=self.top_p, generator=self.generator, progress=self.progress)
                self.seconds.append(time.perf_counter() - start)
                round_seconds += self.seconds[-1]
                self.prompts.append(prompt)
                self.responses.append(response)
        self.rounds.append((len(prompts) * self.new_tokens, round_seconds))

    def summary(self) -> dict:
        tokens, seconds = sum(len(r) for r in self.responses), sum(self.seconds)
        assert tokens == len(self.prompts) * self.new_tokens, (tokens, len(self.prompts), self.new_tokens)
        return {"prompts": len(self.prompts), "batch": 1, "new_tokens": self.new_tokens, "tokens": tokens,
                "seconds": seconds, **rates(self.rounds), "seconds_per_prompt": self.seconds,
                "prompt_lengths": [len(p) for p in self.prompts], "responses": self.responses}


class Batched:
    """jaxalign's GuidedSampler over the whole batch for one doctor: a compiling call, then timed calls."""

    def __init__(self, patient, doctor, prompts, *, new_tokens: int, top_p: float, progress):
        self.sampler = GuidedSampler(patient, {"helpfulness": doctor}, alpha=ALPHA, beta=BETA)
        self.params = SamplingParams(max_new_tokens=new_tokens, temperature=TEMPERATURE, top_p=top_p,
                                     stop_token_ids=())
        self.prompts, self.new_tokens, self.progress = prompts, new_tokens, progress
        self.seconds, self.out = [], None
        self.compile_s = self.first_call_s = 0.0

    def call(self, seed: int):
        out = self.sampler.generate(self.prompts, key=jax.random.key(seed), params=self.params,
                                    preference_weights=None)
        return jax.block_until_ready(out)

    def compile(self) -> None:
        compile_seconds = collections.Counter()

        def on_event(name: str, seconds: float, **_) -> None:
            if name in COMPILE_EVENTS:
                compile_seconds[name] += seconds

        monitoring.register_event_duration_secs_listener(on_event)
        try:
            start = time.perf_counter()
            self.call(0)
            self.first_call_s = time.perf_counter() - start
        finally:
            monitoring.unregister_event_duration_listener(on_event)
        self.compile_s = sum(compile_seconds.values())

    def run(self, seed: int, load: MachineLoad) -> None:
        with load:
            start = time.perf_counter()
            self.out = self.call(seed)
            self.seconds.append(time.perf_counter() - start)
        self.progress.update(len(self.prompts) * self.new_tokens)

    def summary(self) -> dict:
        lengths = np.asarray(self.out.lengths)
        tokens = int(lengths.sum())
        assert tokens == len(self.prompts) * self.new_tokens, (tokens, len(self.prompts), self.new_tokens)
        tokens_out = np.asarray(self.out.tokens)
        return {"prompts": len(self.prompts), "batch": len(self.prompts), "new_tokens": self.new_tokens,
                "tokens": tokens, "seconds": statistics.median(self.seconds), "seconds_all": self.seconds,
                **rates([(tokens, seconds) for seconds in self.seconds]),
                "compile_s": self.compile_s, "first_call_s": self.first_call_s, "calls": len(self.seconds),
                "prompt_lengths": [len(p) for p in self.prompts],
                "responses": [tokens_out[i, :lengths[i]].tolist() for i in range(len(self.prompts))]}


def to_torch(torch, transformers, model, directory: Path):
    """The same weights as a transformers LlamaForCausalLM (float32), via jaxalign's Hugging Face export."""
    models.save_hf(model, model.config, directory)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return torch_model.eval()


def logits_difference(torch, model, torch_model, prompt: list[int]) -> float:
    """Largest |jaxalign − transformers| over every position's logits of one prompt."""
    ours, _ = model(jnp.asarray([prompt]), attention_mask=jnp.ones((1, len(prompt)), bool))
    with torch.inference_mode():
        theirs = torch_model(input_ids=torch.tensor([prompt])).logits.float().numpy()
    return float(np.max(np.abs(np.asarray(ours, np.float32) - theirs)))


def write_chart(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: skipping the PNG chart (the JSON has every number)")
        return
    doctors = list(results["doctors"])
    names = [UNCACHED, CACHED, JAXALIGN]
    colours = {UNCACHED: "#c44e52", CACHED: "#dd8452", JAXALIGN: "#4c72b0"}
    width = 0.8 / len(names)
    figure, axis = plt.subplots(figsize=(8, 4.2))
    for index, name in enumerate(names):
        speeds = [results["doctors"][d]["strategies"][name]["tokens_per_s"] for d in doctors]
        positions = [k + (index - (len(names) - 1) / 2) * width for k in range(len(doctors))]
        bars = axis.bar(positions, speeds, width, color=colours[name], label=name)
        axis.bar_label(bars, labels=[f"{s:,.1f}" for s in speeds], fontsize=8)
    label = f"target: {TARGET_OVER_CACHED:g}x KV-cached"
    for k, doctor in enumerate(doctors):
        centre = k + (names.index(JAXALIGN) - (len(names) - 1) / 2) * width
        limit = TARGET_OVER_CACHED * results["doctors"][doctor]["strategies"][CACHED]["tokens_per_s"]
        axis.hlines(limit, centre - width / 2, centre + width / 2, colors="black", linestyles=":", label=label)
        label = None
    axis.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    axis.yaxis.set_major_formatter(plain)
    axis.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 3.0, 5.0)))
    axis.yaxis.set_minor_formatter(plain)
    axis.tick_params(axis="y", which="minor", labelsize=7)
    axis.set_xticks(range(len(doctors)))
    axis.set_xticklabels([f"doctor: {d}\njaxalign = {results['doctors'][d]['ratios']['over_cached']:.1f}x cached, "
                          f"{results['doctors'][d]['ratios']['over_uncached']:.1f}x uncached" for d in doctors],
                         fontsize=8)
    axis.set_ylabel(f"new tokens / s, median of {results['setup']['rounds']} rounds\n(log scale, higher is better)")
    axis.legend(fontsize=8, loc="upper left")
    setup = results["setup"]
    axis.set_title(f"LLMDoctor guided decoding, SmolLM2-135M-Instruct patient (float32), {setup['new_tokens']} new "
                   f"tokens per prompt, top-p {setup['top_p']}, alpha {ALPHA}, beta {BETA}\n"
                   f"jaxalign: {setup['prompts']} prompts in one batch; PyTorch: batch 1 "
                   f"(uncached on {setup['uncached_prompts']} prompts); {setup['hardware']}"
                   f"{', shared with other jobs' if results['machine_load']['shared'] else ''}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="prompts (jaxalign's batch, and the cached baseline's)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--uncached-prompts", type=int, default=4,
                        help="the first N prompts for the uncached baseline; also the rounds of the round robin and "
                             "jaxalign's timed calls (median)")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--doctor-layers", type=int, default=4,
                        help="also a doctor of the patient's first k layers (0: only the same-size doctor)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 prompts, 4 new tokens, 1 uncached prompt, 1 repeat; "
                                                             "no file unless --output")
    parser.add_argument("--output", type=Path, help="the JSON file (default: benchmarks/results/"
                                                    "guided_decoding[_<backend>].json)")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.new_tokens, args.uncached_prompts = 2, 4, 1
    if min(args.prompts, args.new_tokens, args.uncached_prompts) < 1 or args.doctor_layers < 0:
        parser.error("--prompts, --new-tokens, --uncached-prompts must be >= 1, --doctor-layers >= 0")
    if args.uncached_prompts > args.prompts:
        parser.error("--uncached-prompts cannot exceed --prompts (it runs on the first of them)")
    if not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1]")
    try:
        models.default_model_path()
        for package in ("gguf", "torch", "transformers"):
            if importlib.util.find_spec(package) is None:
                raise FileNotFoundError(f"the {package} package, which this benchmark needs, is not installed")
    except FileNotFoundError as error:
        parser.error(str(error))
    import torch
    import transformers

    torch.set_num_threads(2)
    load_before = os.getloadavg()
    start = time.perf_counter()
    patient, tokenizer = models.load_gguf(models.default_model_path())
    load_s = time.perf_counter() - start
    doctors = {"same size": copy_model(patient)}
    if args.doctor_layers:
        if args.doctor_layers > patient.config.n_layers:
            parser.error(f"--doctor-layers must be at most the patient's {patient.config.n_layers} layers")
        doctors[f"{args.doctor_layers} layers"] = models.first_layers(patient, args.doctor_layers)
    prompts = chat_prompts(tokenizer, args.prompts)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.prompts)]

    with tempfile.TemporaryDirectory(prefix="guided_decoding_") as scratch:
        torch_patient = to_torch(torch, transformers, patient, Path(scratch) / "patient")
        # The same-size doctor is loaded again from the patient's export: its own PyTorch buffers.
        torch_doctors = {"same size": transformers.AutoModelForCausalLM.from_pretrained(
            Path(scratch) / "patient", dtype=torch.float32).eval()}
        for name, doctor in doctors.items():
            if name != "same size":
                torch_doctors[name] = to_torch(torch, transformers, doctor, Path(scratch) / name.replace(" ", "_"))
    parity = {"patient": logits_difference(torch, patient, torch_patient, prompts[0])}
    for name, doctor in doctors.items():
        parity[f"doctor ({name})"] = logits_difference(torch, doctor, torch_doctors[name], prompts[0])
    print("max |logits jaxalign - transformers| on prompt 0: " + ", ".join(f"{k} {v:.2e}" for k, v in parity.items()))
    # One short untimed pass per PyTorch strategy so that first-call set-up costs are not in the timings.
    with torch.inference_mode():
        for decode in (decode_uncached, decode_cached):
            decode(torch, torch_patient, torch_doctors["same size"], prompts[0], 2, top_p=args.top_p,
                   generator=torch.Generator().manual_seed(0), progress=tqdm(disable=True))

    rounds = args.uncached_prompts
    chunks = [chunk.tolist() for chunk in np.array_split(np.arange(args.prompts), rounds)]
    total = len(doctors) * args.new_tokens * (rounds + args.prompts + rounds * args.prompts)
    progress = tqdm(total=total, unit="tok", dynamic_ncols=True, desc="compiling")
    runs = {}
    for index, (name, doctor) in enumerate(doctors.items()):
        seed = args.seed + 1000 * index
        runs[name] = {
            UNCACHED: Baseline(torch, decode_uncached, torch_patient, torch_doctors[name], new_tokens=args.new_tokens,
                               top_p=args.top_p, seed=seed, progress=progress),
            CACHED: Baseline(torch, decode_cached, torch_patient, torch_doctors[name], new_tokens=args.new_tokens,
                             top_p=args.top_p, seed=seed, progress=progress),
            JAXALIGN: Batched(patient, doctor, prompts, new_tokens=args.new_tokens, top_p=args.top_p,
                              progress=progress),
        }
        runs[name][JAXALIGN].compile()
        tqdm.write(f"compiled jaxalign's guided sampler with the {name} doctor: {runs[name][JAXALIGN].compile_s:.1f} s")
    # Round robin, so that load from other processes on a shared machine hits every strategy alike: round r
    # decodes uncached prompt r, the r-th slice of the prompts KV-cached, and one jaxalign call on all of them.
    loads = [MachineLoad() for _ in range(rounds)]
    for round_index, load in enumerate(loads):
        for name in doctors:
            for strategy, run in runs[name].items():
                progress.set_description(f"round {round_index + 1}/{rounds}: {strategy}, {name} doctor")
                if strategy == UNCACHED:
                    run.run([prompts[round_index]], load)
                elif strategy == CACHED:
                    run.run([prompts[i] for i in chunks[round_index]], load)
                else:
                    run.run(round_index + 1, load)
    progress.close()

    per_doctor = {}
    for name in doctors:
        strategies = {strategy: run.summary() for strategy, run in runs[name].items()}
        for result in strategies.values():
            result["sample_text"] = tokenizer.decode(result["responses"][0])
        ours = strategies[JAXALIGN]["tokens_per_s"]
        ratios = {"over_cached": ours / strategies[CACHED]["tokens_per_s"],
                  "over_uncached": ours / strategies[UNCACHED]["tokens_per_s"],
                  "cached_over_uncached": strategies[CACHED]["tokens_per_s"] / strategies[UNCACHED]["tokens_per_s"]}
        per_doctor[name] = {
            "strategies": strategies, "ratios": ratios,
            "target": {"over_cached_at_least": TARGET_OVER_CACHED, "met": ratios["over_cached"] >= TARGET_OVER_CACHED},
            # Not the same draws in general (the generators advance differently), but the first prompt of both
            # starts from the same seed, so equal tokens there show the two loops compute the same distribution.
            "baselines_same_tokens_on_prompt_0": (strategies[UNCACHED]["responses"][0]
                                                  == strategies[CACHED]["responses"][0]),
        }
    load_after = os.getloadavg()
    machine = MachineLoad.combined(loads).summary()

    backend = jax.default_backend()
    hardware = f"{os.cpu_count()} CPU cores" if backend == "cpu" else f"JAX on {jax.devices()[0].device_kind}"
    shared = machine["other_processes_cores"] >= 0.2
    results = {
        "setup": {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), float32, jaxalign and transformers",
                  "patient_layers": patient.config.n_layers, "doctors": list(doctors), "prompts": args.prompts,
                  "uncached_prompts": args.uncached_prompts, "new_tokens": args.new_tokens, "top_p": args.top_p,
                  "temperature": TEMPERATURE, "alpha": ALPHA, "beta": BETA, "rounds": rounds,
                  "seed": args.seed, "questions": questions, "prompt_lengths": [len(p) for p in prompts],
                  "load_s": load_s, "torch_threads": torch.get_num_threads(), "jax_backend": backend,
                  "hardware": hardware, "rule": "softmax(alpha*log pi_patient + beta*log pi_doctor), top-p, "
                                                "temperature 1, no stop token",
                  "seconds": "wall time of all prompts (baselines) or the median call after a compiling one "
                             "(jaxalign), prefill included",
                  "tokens_per_s": "median over the rounds of each round's tokens / seconds (compared); "
                                  "tokens_per_s_overall: all tokens / all seconds"},
        "logits_max_abs_diff": parity,
        "doctors": per_doctor,
        "machine_load": {**machine, "rounds": [load.summary() for load in loads],
                         "loadavg_before": load_before, "loadavg_after": load_after,
                         "shared": shared,
                         "note": ("other processes used the machine during the timed runs (other_processes_cores): "
                                  "a shared 2-core machine" if shared else
                                  "no other process used a noticeable share of the machine during the timed runs")},
        "provenance": provenance.describe(),
    }

    print(f"\nLLMDoctor guided decoding, SmolLM2-135M-Instruct float32 patient, {args.new_tokens} new tokens per "
          f"prompt, top-p {args.top_p}, alpha {ALPHA}, beta {BETA}, {hardware}")
    print(f"tokens/s: the median of the {rounds} rounds' (compared), and all tokens over all seconds; seconds: all "
          "prompts' (batch 1) or the median call (jaxalign), prefill included")
    header = (f"{'doctor':12}{'strategy':20}{'prompts':>8}{'batch':>6}{'new tokens':>11}{'seconds':>9}"
              f"{'tokens/s':>10}{'(all)':>8}{'jaxalign / this':>17}")
    print(header)
    print("-" * len(header))
    for name, entry in per_doctor.items():
        ours = entry["strategies"][JAXALIGN]["tokens_per_s"]
        for strategy, result in entry["strategies"].items():
            print(f"{name:12}{strategy:20}{result['prompts']:>8}{result['batch']:>6}{result['tokens']:>11}"
                  f"{result['seconds']:>9.2f}{result['tokens_per_s']:>10.1f}{result['tokens_per_s_overall']:>8.1f}"
                  f"{ours / result['tokens_per_s']:>16.2f}x")
        compile_s = entry["strategies"][JAXALIGN]["compile_s"]
        print(f"{'':12}(jaxalign compile {compile_s:.1f} s, not in tokens/s; target >= {TARGET_OVER_CACHED:g}x the "
              f"KV-cached baseline: {'met' if entry['target']['met'] else 'MISSED'})")
    print(f"\nother processes used {machine['other_processes_cores']:.2f} cores on average during the timed runs "
          f"(this one {machine['own_cores']:.2f}); load average before {load_before[0]:.2f}, after "
          f"{load_after[0]:.2f}; per round: "
          + ", ".join(f"{load.summary()['other_processes_cores']:.2f}" for load in loads) + " cores")
    print("max |logits jaxalign - transformers| on prompt 0: " + ", ".join(f"{k} {v:.2e}" for k, v in parity.items()))
    print(f"\nprompt 0: {questions[0]!r}")
    for name, entry in per_doctor.items():
        for strategy, result in entry["strategies"].items():
            print(f"  [{name} | {strategy}] {result['sample_text']!r}")

    if args.quick and args.output is None:
        return
    output = args.output or RESULTS / f"guided_decoding{'' if backend == 'cpu' else '_' + backend}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {output}")
    write_chart(results, output.with_suffix(".png"))


if __name__ == "__main__":
    main()
