"""A QLoRA training step: LoRA on an NF4 (and int8) base against LoRA on the float32 base, in one run; and
peft + bitsandbytes QLoRA in PyTorch on the same shape.

    python benchmarks/quantized_step.py [--rows 4] [--length 125] [--rank 16] [--repeats 4] [--no-torch]

The model has SmolLM2-135M's shape (benchmarks/model_shapes.py) and random weights; LoRA of ``--rank`` (alpha twice
the rank, no dropout) sits on all seven projections of every layer, as QLoRA trains. One step is the forward and
backward pass of the token-mean next-token NLL over ``--rows`` rows of ``--length`` random tokens, differentiated
with respect to the adapters only: an SFT step of 4 x 125 tokens by default, ``--rows 8 --length 120`` is a DPO
step's policy pass over 4 pairs. The optimizer update (a few adapters' worth, the same on every side) is left out.

- **jaxalign** (this process): the float32 base, the NF4 base (``QuantizeConfig(type="nf4")``: blocks of 64,
  double quantisation) and the int8 base, each a jitted ``value_and_grad`` over the adapters. Their timed calls
  take turns (one of each, ``--repeats`` times, after one untimed call each): the three run the same framework's
  code, so load from other processes on a shared machine hits them alike. Compile time is reported apart.
- **PyTorch** (a process of its own, unless ``--no-torch``): transformers' ``LlamaForCausalLM`` of the same
  shape loaded with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=float32)`` and peft's ``LoraConfig`` with the same
  rank, alpha and targets; and the same adapters on the float32 model. ``loss.backward()`` on the same token
  counts, each side's steps back to back after one untimed step; ``--torch-repeats`` timed steps each.

The reported time of a side is the median of its timed steps. Writes ``benchmarks/results/quantized_step.json``
(``quantized_step_<rows>x<length>.json`` for another size) and, with matplotlib, a PNG of the same name.
"""

# ruff: noqa: E402  (JAX is imported after the huge-pages re-execution)
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxalign.hostmem import use_transparent_huge_pages

if __name__ == "__main__" and "--torch-worker" not in sys.argv:
    use_transparent_huge_pages()

import numpy as np
import provenance  # benchmarks/provenance.py: run as `python benchmarks/quantized_step.py`
from model_shapes import SMOLLM2_135M  # benchmarks/model_shapes.py, beside this file

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
JAX_VARIANTS = ("float32", "nf4", "int8")


def random_tokens(rows: int, length: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, SMOLLM2_135M.vocab_size, size=(rows, length)).astype(np.int32)


def jaxalign_sides(args) -> dict:
    """Compile each variant's step, then time them in turns."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxalign.models import (
        LlamaForCausalLM,
        LoRAConfig,
        QuantizeConfig,
        apply_lora,
        quantize_model,
        storage_bytes,
        target_logps,
    )

    tokens = jnp.asarray(random_tokens(args.rows, args.length))
    mask = jnp.ones_like(tokens)
    lora = LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS)
    sides, steps = {}, {}
    for variant in JAX_VARIANTS:
        model = LlamaForCausalLM(SMOLLM2_135M, rngs=nnx.Rngs(0))
        if variant != "float32":
            quantize_model(model, QuantizeConfig(type=variant))
        apply_lora(model, lora, rngs=nnx.Rngs(1))
        graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)

        def loss(adapters, rest, graphdef=graphdef):
            return -jnp.mean(target_logps(nnx.merge(graphdef, adapters, rest), tokens, mask))

        started = time.perf_counter()
        compiled = jax.jit(jax.value_and_grad(loss)).lower(adapters, rest).compile()
        compile_s = time.perf_counter() - started
        sizes = storage_bytes(model)
        steps[variant] = lambda compiled=compiled, adapters=adapters, rest=rest: jax.block_until_ready(
            compiled(adapters, rest))
        steps[variant]()  # the untimed call
        sides[variant] = {"compile_s": compile_s, "weights_bytes": sizes["quantized"] + sizes["float"],
                          "projection_bytes": sizes["quantized"] or None, "step_s_all": []}
        del model
    for _ in range(args.repeats):
        for variant in JAX_VARIANTS:
            started = time.perf_counter()
            steps[variant]()
            sides[variant]["step_s_all"].append(time.perf_counter() - started)
    for side in sides.values():
        side["step_s"] = statistics.median(side["step_s_all"])
    return sides


def torch_worker(args) -> dict:
    """The PyTorch side (run in its own process): peft + bitsandbytes QLoRA, and peft LoRA on float32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # bitsandbytes' CPU backend would wait on a kernel download
    import bitsandbytes
    import peft
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    config = transformers.LlamaConfig(**{key: value for key, value in SMOLLM2_135M.to_hf().items()
                                         if key not in ("architectures", "model_type")})
    torch.manual_seed(0)
    tokens = torch.tensor(random_tokens(args.rows, args.length), dtype=torch.long)
    lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=list(TARGETS))
    sides = {}
    with tempfile.TemporaryDirectory() as directory:
        transformers.LlamaForCausalLM(config).save_pretrained(directory)
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        for name, extra in (("float32", {}), ("nf4", {"quantization_config": quantization})):
            model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                                      device_map="cpu", **extra)
            model = peft.get_peft_model(model, lora).train()

            def step(model=model):
                model.zero_grad(set_to_none=True)
                model(input_ids=tokens, labels=tokens).loss.backward()

            step()
            seconds = []
            for _ in range(args.torch_repeats):
                started = time.perf_counter()
                step()
                seconds.append(time.perf_counter() - started)
            sides[name] = {"step_s": statistics.median(seconds), "step_s_all": seconds}
            del model
    return {"sides": sides, "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                         "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__},
            "torch_threads": torch.get_num_threads()}


def torch_sides(args) -> dict:
    command = [sys.executable, __file__, "--torch-worker", "--rows", str(args.rows), "--length", str(args.length),
               "--rank", str(args.rank), "--torch-repeats", str(args.torch_repeats)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if result.returncode:
        raise RuntimeError(f"the PyTorch side failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_chart(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG chart (the JSON has every number)")
        return
    names, seconds, colours = [], [], []
    for variant, side in result["jaxalign"].items():
        names.append(f"jaxalign\n{variant} base")
        seconds.append(side["step_s"])
        colours.append("#4c72b0")
    for variant, side in (result.get("pytorch") or {}).get("sides", {}).items():
        names.append("peft + bnb\nnf4 base" if variant == "nf4" else "peft\nfloat32 base")
        seconds.append(side["step_s"])
        colours.append("#dd8452")
    figure, axis = plt.subplots(figsize=(7.5, 3.8))
    bars = axis.bar(names, seconds, color=colours)
    axis.bar_label(bars, labels=[f"{s:.2f} s" for s in seconds])
    axis.set_ylabel("LoRA step, forward + backward (s, lower is better)")
    setup = result["setup"]
    axis.set_title(f"SmolLM2-135M shape, LoRA r={setup['rank']} on all projections, {setup['rows']} x "
                   f"{setup['length']} tokens, {result['provenance']['machine']['cores']} CPU cores", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=125)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=4, help="timed calls of each jaxalign variant")
    parser.add_argument("--torch-repeats", type=int, default=2, help="timed steps of each PyTorch variant")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.torch_worker:
        print(json.dumps(torch_worker(args)))
        return

    ours = jaxalign_sides(args)
    theirs = None if args.no_torch else torch_sides(args)
    setup = {"model": "SmolLM2-135M shape, random weights", "rows": args.rows, "length": args.length,
             "rank": args.rank, "alpha": 2.0 * args.rank, "targets": list(TARGETS), "repeats": args.repeats,
             "torch_repeats": None if args.no_torch else args.torch_repeats, "jaxalign_order": "round-robin",
             "load_average": os.getloadavg()}
    ratios = {f"{variant}_over_float32": ours[variant]["step_s"] / ours["float32"]["step_s"]
              for variant in ("nf4", "int8")}
    if theirs is not None:
        ratios["peft_bnb_nf4_over_float32"] = theirs["sides"]["nf4"]["step_s"] / theirs["sides"]["float32"]["step_s"]
        ratios["peft_bnb_nf4_over_jaxalign_nf4"] = theirs["sides"]["nf4"]["step_s"] / ours["nf4"]["step_s"]
    stem = "quantized_step" + ("" if (args.rows, args.length) == (4, 125) else f"_{args.rows}x{args.length}")
    json_path = args.output_dir / f"{stem}.json"
    described = provenance.write_result(json_path, "quantized_step", setup=setup, jaxalign=ours, pytorch=theirs,
                                        ratios=ratios)

    print(f"\nLoRA r={args.rank} step (forward + backward), {args.rows} x {args.length} tokens, "
          f"{described['machine']['cores']} CPU cores, load average {setup['load_average'][0]:.1f}")
    print(f"{'':28}{'step (s)':>10}{'vs float32':>12}{'compile (s)':>13}")
    for variant, side in ours.items():
        print(f"{'jaxalign, ' + variant + ' base':28}{side['step_s']:>10.3f}"
              f"{side['step_s'] / ours['float32']['step_s']:>11.2f}x{side['compile_s']:>13.1f}")
    if theirs is not None:
        for variant, side in theirs["sides"].items():
            name = "peft + bnb, nf4 base" if variant == "nf4" else "peft, float32 base"
            print(f"{name:28}{side['step_s']:>10.3f}{side['step_s'] / theirs['sides']['float32']['step_s']:>11.2f}x"
                  f"{'-':>13}")
    print(f"wrote {json_path}")
    write_chart({"setup": setup, "jaxalign": ours, "pytorch": theirs, "provenance": described},
                args.output_dir / f"{stem}.png")


if __name__ == "__main__":
    main()
