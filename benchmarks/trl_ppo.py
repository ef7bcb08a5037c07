"""TRL's PPO trainer, timed per iteration: generation, scoring and training (the TRL side of ppo_throughput.py).

What runs: ``trl.experimental.ppo.PPOTrainer`` of **TRL 0.29.1** (the installed TRL, 1.x, has no PPO trainer
any more) in its own ``train()`` loop, on CPU in float32, with ``torch.set_num_threads(os.cpu_count())``.
TRL 0.29.1 lives in its own ``pip install --no-deps --target`` directory (default ``benchmarks/.cache/trl029``,
installed from PyPI by :func:`ensure_trl_ppo` when missing) that is put first on ``PYTHONPATH`` for this
script's process only; :func:`subprocess_command` gives the argv and environment to start it with, and running
the file directly re-executes it that way, so a caller never needs to know where TRL 0.29 lives.

Models, all loaded from the one ``--checkpoint`` directory (a transformers checkpoint with its tokenizer):
the policy and the frozen reference (``AutoModelForCausalLM``), and the value and reward models
(``AutoModelForSequenceClassification(num_labels=1)`` on the same weights; their ``score`` heads are
random, seeded, which changes no timing). TRL trains the policy and the value model together (its
``PolicyAndValueWrapper``: both backbones forward and backward every step).

One iteration = one rollout batch of ``--batch-size`` prompts (``per_device_train_batch_size`` =
``local_rollout_forward_batch_size`` = batch size, ``gradient_accumulation_steps=1``, ``num_mini_batches=1``,
``num_ppo_epochs=1``): sample ``--new-tokens`` tokens per prompt (``response_length``; ``stop_token="eos"``,
so a row ends at EOS and generation ends when all rows have, nothing else truncates), score, one PPO
optimizer step. bf16/fp16, gradient checkpointing, evaluation, sample generations, checkpoints and reporting
are off. Prompts: ``{"prompt": "..."}`` JSONL records (user messages), rendered with the tokenizer's chat
template and generation prompt, tokenised once and padded on the left per batch (as TRL's PPO example does).

Timing (wall clock), by wrapping what TRL's loop calls (the wrappers only read the clock):

- ``generate_s``: ``ppo_trainer.batch_generation`` (``model.generate`` with ``output_scores``: TRL takes the
  rollout log-probabilities from the generation logits, so no separate policy forward pass is run).
- ``score_s``: from the end of generation to the first training forward pass: the log-softmax of the
  generation logits, the reference model's forward pass, the value model's and the reward model's forward
  passes (``get_reward``), EOS truncation, the KL-penalised rewards and GAE advantages and returns.
- ``train_s``: from the first training forward pass (``ppo_trainer.forward`` on the trained wrapper) to the end
  of the last ``optimizer.step()``: forward, PPO loss, backward and AdamW step of policy + value model.
- ``total_s``: from one ``on_step_end`` callback to the next (``on_train_begin`` for the first): the whole
  iteration, including ``other_s`` = total minus the three phases (fetching and collating the batch, the
  metrics ``train()`` logs, ``gc.collect()`` and the trainer's bookkeeping).

The first ``--warmup`` iterations are dropped (kept under ``warmup_iterations``); ``median`` is the
per-key median of the next ``--iterations``. Each iteration also records ``prompt_tokens`` (the batch's
padded prompt width) and ``response_tokens`` (decoding steps taken: fewer than ``--new-tokens`` when every
row stopped at EOS), to compare the work with the other side's.

Deviations from TRL's defaults, forced by the benchmark:

- A tokenizer without a pad token, or whose pad token is its EOS token (SmolLM2: both ``<|im_end|>``), gets
  a new ``[PAD]`` token, as TRL's PPO example does: TRL tells padding from tokens by id, so with pad = EOS
  it would mask the ``<|im_end|>`` inside every chat prompt and every generated EOS. The new id is outside
  the embedding matrix, which is fine because TRL replaces pad ids by 0 before every forward pass.

Compatibility with transformers 5.23 / accelerate 1.15 / torch 2.13 (CPU): TRL 0.29.1's PPO trainer runs
unpatched (``PPOConfig``, the trainer's hand-made ``Trainer`` state (it never calls ``Trainer.__init__``),
``generate`` with ``top_k=0.0`` and a ``GenerationConfig``, ``create_optimizer_and_scheduler``, ``Trainer.log``),
so nothing is monkeypatched beyond the timing wrappers. It warns (harmlessly) that ``gradient_checkpointing``
is renamed and that ``generate`` gets a ``GenerationConfig`` plus loose arguments, and prints
``===training policy===`` on stdout. Its ``Accelerator`` picks the device itself (``config.device`` says
which: CPU on a machine without a GPU).

Commands::

    python benchmarks/trl_ppo.py --checkpoint DIR --prompts prompts.jsonl --out trl_ppo.json
    # from another script (e.g. ppo_throughput.py):
    argv, env = subprocess_command(["--checkpoint", DIR, "--prompts", FILE, "--out", OUT])
    subprocess.run(argv, env=env, check=True)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRL_VERSION = "0.29.1"
DEFAULT_TARGET = Path(__file__).resolve().parent / ".cache" / "trl029"
# Set in the child's environment to the directory it must import TRL from: guards against re-executing twice.
CHILD_ENV = "JAXALIGN_TRL_PPO_TARGET"
TIMING_KEYS = ("generate_s", "score_s", "train_s", "other_s", "total_s")
COUNT_KEYS = ("prompt_tokens", "response_tokens", "rows_with_eos")


def _installed_version(target: Path) -> str | None:
    """The version of the ``trl`` distribution installed in ``target`` (None when there is none)."""
    versions = [p.name.removeprefix("trl-").removesuffix(".dist-info") for p in target.glob("trl-*.dist-info")]
    if len(versions) == 1 and (target / "trl" / "experimental" / "ppo" / "ppo_trainer.py").is_file():
        return versions[0]
    return None


def ensure_trl_ppo(target: Path = DEFAULT_TARGET, requirement: str = f"trl=={TRL_VERSION}") -> Path:
    """Make sure TRL 0.29.1 is installed in ``target`` (``pip install --no-deps --target``); return ``target``.

    Its dependencies (transformers, accelerate, datasets, pandas, torch) are the environment's own; only the
    ``trl`` package goes into ``target``, to be put first on ``PYTHONPATH`` so that it shadows the installed
    TRL 1.x. Uses the current interpreter's pip; pip's output goes to stderr.

    Args:
        target: the directory (created when missing).
        requirement: what to install: a PyPI requirement or a wheel file.

    Returns:
        ``target``.

    Raises:
        RuntimeError: pip failed, or left no ``trl`` 0.29.1 with ``trl.experimental.ppo`` in ``target``.
    """
    target = Path(target)
    if _installed_version(target) == TRL_VERSION:
        return target
    print(f"installing {requirement} (no dependencies) into {target}", file=sys.stderr)
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--target", str(target), requirement]
    status = subprocess.run(command, stdout=sys.stderr, check=False).returncode
    found = _installed_version(target)
    if status != 0 or found != TRL_VERSION:
        raise RuntimeError(f"`{' '.join(command)}` exited with status {status} and left trl {found} in {target}; "
                           f"expected trl {TRL_VERSION} with trl/experimental/ppo")
    return target


def subprocess_command(args: list[str], target: Path = DEFAULT_TARGET) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run this script with TRL 0.29.1 importable (installing it when missing).

    Args:
        args: the script's command-line arguments (``--checkpoint DIR --prompts FILE --out FILE ...``).
        target: where TRL 0.29.1 is installed (see :func:`ensure_trl_ppo`).

    Returns:
        ``(argv, env)`` for ``subprocess.run(argv, env=env)``: this interpreter running this file, and the
        current environment with ``target`` first on ``PYTHONPATH``.
    """
    target = ensure_trl_ppo(Path(target)).resolve()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), *filter(None, [env.get("PYTHONPATH")])])
    env[CHILD_ENV] = str(target)
    env["TRL_EXPERIMENTAL_SILENCE"] = "1"  # the "trl.experimental is unstable" notice: known, and not ours
    return [sys.executable, str(Path(__file__).resolve()), *map(str, args)], env


def read_prompts(path: str | Path) -> list[str]:
    """The user messages of a JSONL file of ``{"prompt": "..."}`` records (blank lines are no records).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line is no JSON object, or its ``prompt`` is missing, not a string or empty; or the file
            holds no record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}, line {number}: field 'prompt' must be a non-empty string, got {prompt!r}")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"prompts file {path} holds no records")
    return prompts


class _PhaseClock:
    """Wall-clock marks of one PPO iteration, set by the wrappers around what TRL's ``train()`` calls."""

    def __init__(self) -> None:
        self.iterations: list[dict] = []
        self.start = self.generate_start = self.generate_end = self.train_start = self.train_end = None
        self.counts: dict[str, int] = {}

    def begin(self) -> None:
        self.start = time.perf_counter()
        self.generate_start = self.generate_end = self.train_start = self.train_end = None
        self.counts = {}

    def end(self) -> dict:
        """Close the iteration (at ``on_step_end``) and open the next one; return its record."""
        now = time.perf_counter()
        marks = (self.start, self.generate_start, self.generate_end, self.train_start, self.train_end)
        if any(mark is None for mark in marks):
            raise RuntimeError("a PPO iteration ended without a generation, a training forward pass and an "
                               "optimizer step: TRL's train() loop is not the one this benchmark wraps")
        record = {
            "generate_s": self.generate_end - self.generate_start,
            "score_s": self.train_start - self.generate_end,
            "train_s": self.train_end - self.train_start,
            "total_s": now - self.start,
        }
        record["other_s"] = record["total_s"] - record["generate_s"] - record["score_s"] - record["train_s"]
        record.update(self.counts)
        self.iterations.append(record)
        self.begin()
        return record


@contextlib.contextmanager
def _timed_trainer_functions(module, clock: _PhaseClock, trained_model, eos_token_id: int):
    """Wrap ``batch_generation`` and ``forward`` of TRL's ``ppo_trainer`` module to mark the phases; undo after.

    ``trained_model`` is the trainer's (prepared) policy-and-value wrapper: a ``forward`` call on it, not on
    the reference model, is a training forward pass.
    """
    original_generation, original_forward = module.batch_generation, module.forward

    def batch_generation(model, queries, *args, **kwargs):
        clock.generate_start = time.perf_counter()
        query_responses, logits = original_generation(model, queries, *args, **kwargs)
        clock.generate_end = time.perf_counter()
        responses = query_responses[:, queries.shape[1]:]
        clock.counts = {"prompt_tokens": int(queries.shape[1]), "response_tokens": int(responses.shape[1]),
                        "rows_with_eos": int((responses == eos_token_id).any(dim=1).sum())}
        return query_responses, logits

    def forward(model, *args, **kwargs):
        if model is trained_model and clock.train_start is None:
            clock.train_start = time.perf_counter()
        return original_forward(model, *args, **kwargs)

    module.batch_generation, module.forward = batch_generation, forward
    try:
        yield
    finally:
        module.batch_generation, module.forward = original_generation, original_forward


def _render(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt as a user message, chat template and generation prompt applied."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    # The template writes the special tokens itself: the tokenizer must not add a BOS of its own.
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def run_trl_ppo(
    checkpoint: str | Path,
    prompts: list[str],
    *,
    batch_size: int = 16,
    new_tokens: int = 48,
    iterations: int = 3,
    warmup: int = 1,
    temperature: float = 1.0,
    learning_rate: float = 1e-6,
    seed: int = 0,
) -> dict:
    """Run ``warmup + iterations`` PPO iterations of TRL 0.29.1's ``PPOTrainer``; time each one's phases.

    Must run where ``trl`` is 0.29.1 (see :func:`subprocess_command`).

    Args:
        checkpoint: transformers checkpoint directory with its tokenizer (and chat template).
        prompts: user messages; each iteration draws ``batch_size`` of them (TRL's shuffled data loader).
        batch_size: prompts per iteration (one rollout batch, one mini-batch, one optimizer step).
        new_tokens: maximum response length (``response_length``).
        iterations: timed iterations.
        warmup: iterations run first and dropped.
        temperature: sampling temperature (TRL also divides the scoring and training logits by it).
        learning_rate: AdamW learning rate (constant).
        seed: seed of TRL's data order, the sampling and the random score heads.

    Returns:
        ``{"trl_version", "iterations": [{"generate_s", "score_s", "train_s", "other_s", "total_s",
        "prompt_tokens", "response_tokens", "rows_with_eos"}, ...], "warmup_iterations": [...],
        "median": {...}, "config": {...}, "notes": [...]}`` (see the module docstring).

    Raises:
        FileNotFoundError: ``checkpoint`` is no directory.
        ValueError: fewer prompts than ``batch_size``, or a non-positive size.
        RuntimeError: the importable ``trl`` is not 0.29.1.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint directory {checkpoint} does not exist")
    for name, value in (("batch_size", batch_size), ("new_tokens", new_tokens), ("iterations", iterations)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if warmup < 0:
        raise ValueError(f"warmup must be at least 0, got {warmup}")
    if len(prompts) < batch_size:
        raise ValueError(f"{len(prompts)} prompts for a batch of {batch_size}: TRL's data loader drops "
                         "incomplete batches, so it needs at least one full batch")

    import trl
    if trl.__version__ != TRL_VERSION:
        raise RuntimeError(f"trl {trl.__version__} is importable (from {Path(trl.__file__).parent}); this needs "
                           f"trl {TRL_VERSION}: run through subprocess_command() or the script itself")
    import datasets
    import torch
    import transformers
    from tqdm.auto import tqdm
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    notes = []
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer in {checkpoint} has no chat template to render the prompts with")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        notes.append(f"the tokenizer's pad token ({tokenizer.pad_token!r}) is missing or equals EOS: added a new "
                     f"'[PAD]' token as TRL's PPO example does (TRL masks padding by id)")
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    dataset = datasets.Dataset.from_dict({"input_ids": _render(tokenizer, prompts)})

    load = dict(dtype=torch.float32)
    policy = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, **load)
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, **load)
    value_model = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=1, **load)
    reward_model = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=1, **load)

    total = warmup + iterations
    with tempfile.TemporaryDirectory(prefix="trl_ppo_") as output_dir:
        config = PPOConfig(
            output_dir=output_dir, seed=seed,
            per_device_train_batch_size=batch_size, local_rollout_forward_batch_size=batch_size,
            gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1,
            total_episodes=total * batch_size, response_length=new_tokens, temperature=temperature,
            stop_token="eos", missing_eos_penalty=None,
            learning_rate=learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            bf16=False, fp16=False, gradient_checkpointing=False,
            num_sample_generations=0, eval_strategy="no", save_strategy="no", logging_strategy="no",
            report_to="none", disable_tqdm=True, push_to_hub=False, dataloader_num_workers=0,
        )
        trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                             reward_model=reward_model, value_model=value_model, train_dataset=dataset)
        clock = _PhaseClock()
        optimizer_step = trainer.optimizer.step

        def timed_step(*args, **kwargs):
            result = optimizer_step(*args, **kwargs)
            clock.train_end = time.perf_counter()
            return result

        trainer.optimizer.step = timed_step
        bar = tqdm(total=total, unit="iter", desc="TRL PPO iterations", file=sys.stderr, dynamic_ncols=True)

        class Timer(transformers.TrainerCallback):
            """Iteration boundaries (``on_step_end``) and the progress bar."""

            def on_train_begin(self, args, state, control, **kwargs):
                clock.begin()

            def on_step_end(self, args, state, control, **kwargs):
                record = clock.end()
                bar.set_postfix({key.removesuffix("_s"): f"{record[key]:.2f}s" for key in TIMING_KEYS[:3]})
                bar.update()

        # TRL's own progress bar / printer would print every iteration's metrics dict: ours replaces them.
        for callback in (transformers.PrinterCallback, transformers.trainer_callback.ProgressCallback):
            trainer.remove_callback(callback)
        trainer.add_callback(Timer())
        with _timed_trainer_functions(ppo_module, clock, trainer.model, tokenizer.eos_token_id):
            trainer.train()
        bar.close()

    if len(clock.iterations) != total:
        raise RuntimeError(f"TRL ran {len(clock.iterations)} PPO iterations, expected {total}")
    timed = clock.iterations[warmup:]
    notes += [
        "generate_s: ppo_trainer.batch_generation (HF generate with output_scores; TRL takes the rollout "
        "log-probabilities from the generation logits, so scoring runs no policy forward pass)",
        "score_s: end of generation to the first training forward: log-softmax of the generation logits, "
        "reference, value and reward model forward passes, EOS truncation, KL rewards and GAE",
        "train_s: first training forward to the end of the last optimizer.step(): PPO loss, backward and AdamW "
        "step of the policy and the value model (both full backbones; TRL's PPO clips no gradient norm)",
        "other_s = total_s - the three phases: batch fetch and collation, TRL's metrics and log call, gc.collect()",
        f"median over {iterations} iterations after {warmup} dropped; iterations run strictly one after another",
    ]
    return {
        "trl_version": trl.__version__,
        "iterations": timed,
        "warmup_iterations": clock.iterations[:warmup],
        "median": {key: statistics.median(r[key] for r in timed) for key in (*TIMING_KEYS, *COUNT_KEYS)},
        "config": {
            "checkpoint": str(checkpoint), "batch_size": batch_size, "new_tokens": new_tokens,
            "iterations": iterations, "warmup": warmup, "temperature": temperature,
            "learning_rate": learning_rate, "seed": seed, "prompts": len(prompts),
            "num_ppo_epochs": 1, "num_mini_batches": 1, "gradient_accumulation_steps": 1,
            "stop_token": "eos", "kl_coef": config.kl_coef, "vf_coef": config.vf_coef,
            "optim": getattr(config.optim, "value", str(config.optim)), "dtype": "float32",
            "device": str(trainer.accelerator.device), "torch_threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in policy.parameters()),
            "trl_path": str(Path(trl.__file__).parent), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
        },
        "notes": notes,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="transformers checkpoint dir with tokenizer")
    parser.add_argument("--prompts", type=Path, required=True, help='JSONL of {"prompt": "user message"}')
    parser.add_argument("--out", type=Path, required=True, help="where to write the result JSON")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-target", type=Path, default=DEFAULT_TARGET,
                        help="directory holding (or to receive) the --no-deps install of trl 0.29.1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if CHILD_ENV not in os.environ:  # the parent: start the child that imports trl 0.29.1
        command, env = subprocess_command(argv, args.trl_target)
        sys.exit(subprocess.run(command, env=env, check=False).returncode)
    result = run_trl_ppo(args.checkpoint, read_prompts(args.prompts), batch_size=args.batch_size,
                         new_tokens=args.new_tokens, iterations=args.iterations, warmup=args.warmup,
                         temperature=args.temperature, learning_rate=args.learning_rate, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    median = result["median"]
    print(f"TRL {result['trl_version']} PPO, median of {args.iterations}: "
          + ", ".join(f"{key} {median[key]:.2f}" for key in TIMING_KEYS) + f"; wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
