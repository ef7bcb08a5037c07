"""What LLMDoctor guided decoding costs per token: a patient steered by a doctor vs each model alone.

On SmolLM2-135M-Instruct (the embedded GGUF, loaded once, float32) it times one batch of chat prompts through:

- ``patient``: the patient alone (``rollout.Sampler``);
- ``doctor (same size)``: a copy of the patient alone, and ``doctor (4 layers)``: ``models.first_layers(patient,
  4)`` alone (the weak-to-strong doctor shape: the patient's embeddings, head and first layers);
- ``guided (same size)`` / ``guided (4 layers)``: ``rollout.GuidedSampler`` with that doctor, alpha 1, beta 0.5
  (the paper's defaults), weight 1 for the doctor's dimension.

Every run samples at temperature 1 with top-p 0.9 (the paper's) and no stop tokens, so every row decodes exactly
``--new-tokens`` tokens. Each setting is called with ``--new-tokens`` and with 1 new token (the prefill, the first
token and the per-call setup), alternately ``--repeats`` times after one compiling warm-up call each, and the
decode step is ``(t_N − t_1) / (N − 1)`` from the medians (as benchmarks/profile_decode.py does).

The target (the issue's): guided decoding costs per token at most ``(1 + doctor / patient) × 1.15`` of unguided
decoding, i.e. ``t_guided ≤ 1.15 · (t_patient + t_doctor)``, all measured in the same run. The guided loop runs
both models' layers, then one combination of the scores, one filter and one draw: it should cost about the sum of
the two models' steps minus one sampling step.

    python benchmarks/guided_decoding_cost.py [--batch 8] [--new-tokens 64] [--repeats 5] [--doctor-layers 4]
    python benchmarks/guided_decoding_cost.py --quick         # batch 4, 16 tokens, 2 repeats; writes no file

Writes ``benchmarks/results/guided_decoding_cost.json`` (``_<backend>`` off the CPU) with the commit and machine,
and with matplotlib a PNG bar chart of the same name.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import provenance  # benchmarks/provenance.py: run as `python benchmarks/guided_decoding_cost.py`
from flax import nnx
from jax import monitoring
from sampling_throughput import COMPILE_EVENTS, chat_prompts

from jaxalign import models
from jaxalign.rollout import GuidedSampler, Sampler, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SLACK = 1.15


def copy_model(model: nnx.Module) -> nnx.Module:
    """An independent copy (other buffers) of ``model``: a same-size doctor that is not the patient's arrays."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


class Setting:
    """One sampler and how to call it; keeps its timings."""

    def __init__(self, name: str, sampler, prompts, *, guided: bool, top_p: float):
        self.name, self.sampler, self.prompts, self.guided, self.top_p = name, sampler, prompts, guided, top_p
        self.seconds: dict[int, list[float]] = collections.defaultdict(list)
        self.compile_s = 0.0

    def call(self, new_tokens: int, seed: int):
        params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_p=self.top_p, stop_token_ids=())
        options = {"preference_weights": None} if self.guided else {}
        out = self.sampler.generate(self.prompts, key=jax.random.key(seed), params=params, **options)
        return jax.block_until_ready(out)

    def timed(self, new_tokens: int, seed: int) -> float:
        start = time.perf_counter()
        self.call(new_tokens, seed)
        seconds = time.perf_counter() - start
        self.seconds[new_tokens].append(seconds)
        return seconds

    def summary(self, new_tokens: int, batch: int) -> dict:
        full, first = statistics.median(self.seconds[new_tokens]), statistics.median(self.seconds[1])
        step = (full - first) / (new_tokens - 1)
        return {"generate_s": full, "generate_s_all": self.seconds[new_tokens], "first_token_s": first,
                "first_token_s_all": self.seconds[1], "decode_step_ms": step * 1e3,
                "decode_ms_per_token": step * 1e3 / batch, "tokens_per_s": batch * new_tokens / full,
                "compile_s": self.compile_s}


def warm_up(setting: Setting, new_tokens: int) -> None:
    """Compile both programs (N and 1 new tokens), recording the compile time."""
    compile_seconds = collections.Counter()

    def on_event(name: str, seconds: float, **_) -> None:
        if name in COMPILE_EVENTS:
            compile_seconds[name] += seconds

    monitoring.register_event_duration_secs_listener(on_event)
    try:
        setting.call(new_tokens, 0)
        setting.call(1, 0)
    finally:
        monitoring.unregister_event_duration_listener(on_event)
    setting.compile_s = sum(compile_seconds.values())


def write_chart(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG chart (the JSON has every number)")
        return
    settings = results["settings"]
    names = list(settings)
    steps = [settings[name]["decode_step_ms"] for name in names]
    colours = ["#4c72b0" if name == "patient" else "#dd8452" if name.startswith("doctor") else "#55a868"
               for name in names]
    figure, axis = plt.subplots(figsize=(7.5, 4))
    bars = axis.bar([name.replace(" (", "\n(") for name in names], steps, color=colours)
    axis.bar_label(bars, labels=[f"{s:.1f}" for s in steps])
    label = f"target: {TARGET_SLACK} x (patient + doctor)"
    for index, name in enumerate(names):
        check = results["targets"].get(name)
        if check is not None:
            axis.hlines(check["limit_ms"], index - 0.4, index + 0.4, colors="#c44e52", linestyles=":", label=label)
            label = None
    axis.legend(fontsize=8, loc="upper left")
    axis.set_ylabel(f"decode step, batch {results['setup']['batch']} (ms, lower is better)")
    setup = results["setup"]
    axis.set_title(f"LLMDoctor guided decoding on SmolLM2-135M-Instruct (float32), batch {setup['batch']}, "
                   f"{setup['new_tokens']} new tokens, top-p {setup['top_p']}\n{setup['hardware']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--doctor-layers", type=int, default=4, help="layers of the small doctor (first_layers)")
    parser.add_argument("--quick", action="store_true", help="batch 4, 16 new tokens, 2 repeats; no file unless "
                                                             "--output")
    parser.add_argument("--output", type=Path, help="the JSON file (default: benchmarks/results/"
                                                    "guided_decoding_cost[_<backend>].json)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.new_tokens, args.repeats = 4, 16, 2
    if min(args.batch, args.repeats, args.doctor_layers) < 1 or args.new_tokens < 2:
        parser.error("--batch, --repeats, --doctor-layers must be >= 1 and --new-tokens >= 2")
    try:
        models.default_model_path()
        if importlib.util.find_spec("gguf") is None:
            raise FileNotFoundError("the gguf package, which reads the embedded model, is not installed")
    except FileNotFoundError as error:
        parser.error(str(error))

    start = time.perf_counter()
    patient, tokenizer = models.load_gguf(models.default_model_path())
    load_s = time.perf_counter() - start
    same_size, small = copy_model(patient), models.first_layers(patient, args.doctor_layers)
    prompts = chat_prompts(tokenizer, args.batch)
    small_name = f"{args.doctor_layers} layers"
    settings = [
        Setting("patient", Sampler(patient), prompts, guided=False, top_p=args.top_p),
        Setting("doctor (same size)", Sampler(same_size), prompts, guided=False, top_p=args.top_p),
        Setting(f"doctor ({small_name})", Sampler(small), prompts, guided=False, top_p=args.top_p),
        Setting("guided (same size)", GuidedSampler(patient, {"helpfulness": same_size}), prompts, guided=True,
                top_p=args.top_p),
        Setting(f"guided ({small_name})", GuidedSampler(patient, {"helpfulness": small}), prompts, guided=True,
                top_p=args.top_p),
    ]
    for setting in settings:
        warm_up(setting, args.new_tokens)
        print(f"compiled {setting.name}: {setting.compile_s:.1f} s")
    # Round robin, so that load from other processes on a shared machine hits every setting alike.
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for repeat in range(1, args.repeats + 1):
        for setting in settings:
            setting.timed(args.new_tokens, repeat)
            setting.timed(1, repeat)
    cores_used = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)

    summaries = {s.name: s.summary(args.new_tokens, args.batch) for s in settings}
    patient_ms = summaries["patient"]["decode_step_ms"]
    targets = {}
    for doctor_name in ("same size", small_name):
        doctor_ms = summaries[f"doctor ({doctor_name})"]["decode_step_ms"]
        guided_ms = summaries[f"guided ({doctor_name})"]["decode_step_ms"]
        limit = TARGET_SLACK * (patient_ms + doctor_ms)
        targets[f"guided ({doctor_name})"] = {
            "guided_ms": guided_ms, "patient_ms": patient_ms, "doctor_ms": doctor_ms,
            "guided_over_unguided": guided_ms / patient_ms,
            "allowed_over_unguided": TARGET_SLACK * (1 + doctor_ms / patient_ms),
            "guided_over_sum": guided_ms / (patient_ms + doctor_ms), "limit_ms": limit, "met": guided_ms <= limit,
            "whole_call_over_sum": summaries[f"guided ({doctor_name})"]["generate_s"] / (
                summaries["patient"]["generate_s"] + summaries[f"doctor ({doctor_name})"]["generate_s"]),
        }
    backend = jax.default_backend()
    hardware = f"{os.cpu_count()} CPU cores" if backend == "cpu" else f"JAX on {jax.devices()[0].device_kind}"
    results = {
        "setup": {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), float32", "batch": args.batch,
                  "new_tokens": args.new_tokens, "top_p": args.top_p, "temperature": 1.0, "alpha": 1.0, "beta": 0.5,
                  "doctor_layers": args.doctor_layers, "patient_layers": patient.config.n_layers,
                  "prompt_lengths": [len(p) for p in prompts], "repeats": args.repeats, "load_s": load_s,
                  "cores_used": cores_used, "jax": jax.__version__, "jax_backend": backend, "hardware": hardware,
                  "decode_step": "(median t(N new tokens) - median t(1 new token)) / (N - 1), whole batch"},
        "settings": summaries,
        "targets": targets,
        "provenance": provenance.describe(),
    }

    print(f"\nguided decoding cost, SmolLM2-135M-Instruct float32, batch {args.batch}, {args.new_tokens} new tokens, "
          f"top-p {args.top_p}, {hardware} (median of {args.repeats}; {cores_used:.1f} cores busy)")
    print(f"{'':22}{'decode step (ms)':>18}{'x patient':>11}{'first token (s)':>17}{'tokens/s':>10}{'compile (s)':>13}")
    for name, summary in summaries.items():
        print(f"{name:22}{summary['decode_step_ms']:>18.1f}{summary['decode_step_ms'] / patient_ms:>11.2f}"
              f"{summary['first_token_s']:>17.2f}{summary['tokens_per_s']:>10.0f}{summary['compile_s']:>13.1f}")
    print(f"\ntarget: t_guided <= {TARGET_SLACK} x (t_patient + t_doctor) per decode step")
    for name, check in targets.items():
        print(f"{name:22} {check['guided_ms']:.1f} ms vs limit {check['limit_ms']:.1f} ms: "
              f"{check['guided_over_unguided']:.2f}x unguided (allowed {check['allowed_over_unguided']:.2f}x), "
              f"{check['guided_over_sum']:.2f}x the sum "
              f"-> {'met' if check['met'] else 'MISSED'}")

    if args.quick and args.output is None:
        return
    output = args.output or RESULTS / f"guided_decoding_cost{'' if backend == 'cpu' else '_' + backend}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {output}")
    write_chart(results, output.with_suffix(".png"))


if __name__ == "__main__":
    main()
