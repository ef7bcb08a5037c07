"""Every ```python block of README.md and docs/*.md runs, one test each, so no example can go stale.

A page's blocks run top to bottom in one namespace (a later block continues an earlier one, as a reader reads
them), in a temporary working directory holding, under the names the blocks use, a tiny Llama standing in for the
embedded SmolLM2 (a GGUF written from a random tiny model with a ChatML byte-level BPE tokenizer;
``models.default_model_path()`` points at it), its Hugging Face exports, a reward model, doctors and small data
files. What a fragment takes from the prose around it (``logits``, ``batch``, ...) is given per block in
``CONTEXT``, and a block whose run would take minutes at its real size runs smaller (``SMALLER``: the same calls
with fewer steps). A block that cannot run here is marked in its page by ``<!-- not run: REASON -->`` on the line
above it: it is skipped with that reason, and ``NOT_RUN`` lists every such block, so a new one is a decision.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```\s*$", re.S | re.M)
NOT_RUN_MARK = re.compile(r"^<!-- not run: (.+?) -->\s*$")
# page#index (its place among the page's python blocks) of each block marked ``not run``, with its reason.
NOT_RUN = {
    # tests/eval/test_toxicity.py scores with alt-profanity-check and a Detoxify-format checkpoint it writes
    "docs/eval.md#1": "needs a Detoxify checkpoint",
    # tests/eval/test_llm_judge.py runs judged_win_rate against a judge server on 127.0.0.1
    "docs/eval.md#2": "needs a judge endpoint",
    # tests/rollout/test_sharded.py runs a sharded sampler on 8 emulated CPU devices
    "docs/rollout.md#3": "needs 8 devices",
    # tests/serve/test_server.py drives a server with the openai client
    "docs/serving.md#0": "needs a running server",
}


@dataclasses.dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    index: int  # its place among the page's python blocks
    line: int  # the fence's line
    code: str
    not_run: str | None

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def blocks() -> list[Block]:
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for index, match in enumerate(FENCE.finditer(text)):
            line = text[:match.start()].count("\n") + 1
            above = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            mark = NOT_RUN_MARK.match(above)
            out.append(Block(str(page.relative_to(ROOT)), index, line, match.group(1),
                             mark.group(1) if mark else None))
    return out


BLOCKS = blocks()


# ------------------------------------------------------------------------------------------ the files blocks use


def tiny_hf_llama():
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def hh_text(human: str, assistant: str) -> str:
    return f"\n\nHuman: {human}\n\nAssistant: {assistant}"


def write_jsonl(path: Path, rows: list[dict], *, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    path.write_bytes(gzip.compress(text.encode())) if gz else path.write_text(text)


QUESTIONS = ["is the sky blue", "what is a bird", "how big is a cat", "why do fish swim", "where do owls sleep",
             "when is lunch", "who likes tea", "is it cold out"]


@pytest.fixture(scope="session")
def docroot(tmp_path_factory) -> Path:
    """A working directory with every file the blocks name."""
    from flax import nnx

    from jaxalign import models
    from tests.models.gguf_files import write_llama_gguf

    root = tmp_path_factory.mktemp("docs")
    gguf_path = write_llama_gguf(tiny_hf_llama(), root / "tiny_default.gguf")
    lm, tokenizer = models.load_gguf(gguf_path)
    for name in ("ppo_ckpt", "path/to/hf_checkpoint", "path/to/checkpoint", "runs/sentiment/dpo/export"):
        models.save_hf(lm, lm.config, root / name, tokenizer)
    for name in ("rm_ckpt", "runs/sentiment/reward"):
        reward_model = models.RewardModel(lm.model, rngs=nnx.Rngs(0))
        models.save_reward_model(root / name, reward_model, models.load_hf(root / "ppo_ckpt"), tokenizer,
                                 gain=2.0, bias=0.5)
    for dimension in ("helpfulness", "safety"):
        doctor = models.CausalLMWithValueHead(models.load_hf(root / "ppo_ckpt"), rngs=nnx.Rngs(1))
        models.save_doctor(root / "doctors" / dimension, doctor, tokenizer, dimension=dimension, metadata={})
    hh = [{"chosen": hh_text(q, "it is a fine day"), "rejected": hh_text(q, "go away")} for q in QUESTIONS]
    for name in ("hh_rlhf.jsonl.gz", "hh/train.jsonl.gz", "hh_rlhf/train.jsonl.gz"):
        write_jsonl(root / name, hh * 2, gz=True)
    write_jsonl(root / "pku.jsonl", [{"prompt": q, "response_0": "a kind answer", "response_1": "a rude one",
                                      "better_response_id": i % 2, "safer_response_id": (i + 1) % 2}
                                     for i, q in enumerate(QUESTIONS)])
    for split in ("train", "eval"):
        write_jsonl(root / "runs/sentiment_grpo" / f"prompts_{split}.jsonl", [{"prompt": q} for q in QUESTIONS])
    write_jsonl(root / "pairs_eval.jsonl", [{"prompt": [{"role": "user", "content": q}],
                                            "chosen": [{"role": "assistant", "content": "a fine day"}],
                                            "rejected": [{"role": "assistant", "content": "go away"}],
                                            "margin": 1.0 + i % 2} for i, q in enumerate(QUESTIONS)])
    write_jsonl(root / "sft_eval.jsonl", [{"prompt": [{"role": "user", "content": q}],
                                          "completion": [{"role": "assistant", "content": "a fine day"}]}
                                         for q in QUESTIONS])
    return root


@pytest.fixture
def environment(docroot, monkeypatch):
    """The blocks' working directory, the tiny model as the embedded default, and a command line of its own."""
    from jaxalign import models
    from jaxalign.models import gguf_io, pretrained

    default = lambda: docroot / "tiny_default.gguf"  # noqa: E731
    for module in (models, gguf_io, pretrained):
        monkeypatch.setattr(module, "default_model_path", default)
    monkeypatch.chdir(docroot)
    monkeypatch.setattr(sys, "argv", ["example.py"])
    return docroot


# ------------------------------------------------------------------------------------------ what fragments take


def tiny_lm():
    from jaxalign import models

    return models.load_gguf(models.default_model_path())[0]


def chat_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True)["input_ids"]


def _tokens_and_mask(ns):
    ns.update(tokens=jnp.asarray([[5, 6, 7, 8], [0, 9, 10, 11]]), mask=jnp.asarray([[1, 1, 1, 1], [0, 1, 1, 1]]))


def _model_page(ns):
    _tokens_and_mask(ns)
    B, P, N = 2, 4, 3
    ns.update(B=B, P=P, N=N, prompt=jnp.asarray([[0, 5, 6, 7], [8, 9, 10, 11]]),
              prompt_mask=jnp.asarray([[0, 1, 1, 1], [1, 1, 1, 1]]))


def _lora_fragment(ns):
    import optax

    def loss_fn(model):
        logits, _ = model(jnp.asarray([[5, 6, 7, 8]]))
        return jnp.mean(logits**2)

    ns.update(loss_fn=loss_fn, optax=optax)


def _data_batches(ns, *, kind: str):
    from jaxalign import data

    source = {"pairs": "pairs_eval.jsonl", "sft": "sft_eval.jsonl"}[kind]
    config = data.DataConfig(source, batch_size=4, num_epochs=1, shuffle=False)
    return list(data.build_batches(config, data.load_tokenizer("ppo_ckpt")))


def _data_fragment(ns):
    from jaxalign import losses

    batch = _data_batches(ns, kind="sft")[0]
    pairs = _data_batches(ns, kind="pairs")[0]
    B, _, T = pairs["input_ids"].shape
    ns.update(losses=losses, model=tiny_lm(), batch=batch, pair_batch=pairs, B=B, T=T,
              ref=jnp.asarray(np.random.default_rng(0).normal(size=(B, 2)) - 20, jnp.float32))


def _ppo_fragment(ns):
    from jaxalign import losses

    rng = np.random.default_rng(0)
    B, T = 3, 6
    mask = jnp.asarray(np.arange(T)[None] < np.array([[6], [4], [5]]), jnp.float32)
    ns.update({name: getattr(losses, name) for name in (
        "adaptive_kl_init", "shape_rewards", "gae", "whiten", "ppo_policy_loss", "ppo_value_loss", "aggregate",
        "adaptive_kl_update", "sequence_logps")})
    ns.update(B=B, mask=mask, score=jnp.asarray(rng.normal(size=B), jnp.float32), vf_coef=0.1,
              **{name: jnp.asarray(rng.normal(size=(B, T)) - 2, jnp.float32)
                 for name in ("logps_old", "ref_logps", "logps")},
              **{name: jnp.asarray(rng.normal(size=(B, T)), jnp.float32) for name in ("values_old", "values")})


def _rollout_page(ns):
    from jaxalign import data

    lm = tiny_lm()
    tokenizer = data.load_tokenizer("ppo_ckpt")
    prompts = data.tokenize([data.PromptRecord([{"role": "user", "content": q}]) for q in QUESTIONS[:2]], tokenizer)
    batch = data.collate(prompts, [0, 1], 32)
    ns.update(batch=batch, key=jax.random.key(1), patient=lm, doctor=tiny_lm(), new_model=tiny_lm())


def _rollout_logps(ns):
    from jaxalign import losses

    tokens, _ = ns["out"].sequences()
    ns.update(losses=losses, P=tokens.shape[1] - ns["out"].tokens.shape[1])


def _rollout_params(ns):
    from jaxalign.rollout import SamplingParams

    ns["SamplingParams"] = SamplingParams


def _onnx_file(ns):
    """``dpo.onnx``, as ``jaxalign export runs/sentiment/dpo --format onnx --output dpo.onnx`` writes it."""
    from jaxalign import models
    from jaxalign.models.onnx_export import save_onnx

    if not Path("dpo.onnx").is_file():
        save_onnx(models.load_hf("runs/sentiment/dpo/export"), "dpo.onnx", progress=False)


def _guided_page(ns):
    ns.update(helpful_lm=tiny_lm(), safe_lm=tiny_lm())


def _training_core(ns):
    from jaxalign import data

    config = data.DataConfig("sft_eval.jsonl", batch_size=4, seed=0)
    ns["batches"] = data.build_batches(config, data.load_tokenizer("ppo_ckpt"))


def _train_step(ns):
    ns["batches"] = _data_batches(ns, kind="sft")
    ns["model"] = tiny_lm()


CONTEXT: dict[str, Callable[[dict], None]] = {
    "docs/data.md#0": lambda ns: ns.update(checkpoint={}),  # "your checkpoint's JSON-able state"
    "docs/data.md#2": _data_fragment,
    "docs/export.md#0": _onnx_file,
    "docs/losses.md#0": _ppo_fragment,
    "docs/models.md#0": _model_page,
    "docs/models.md#1": _lora_fragment,
    "docs/rollout.md#0": _rollout_page,
    "docs/rollout.md#1": _rollout_params,
    "docs/rollout.md#2": _rollout_logps,
    "docs/rollout.md#4": _guided_page,
    "docs/training-core.md#0": _training_core,
    "docs/training-core.md#1": _train_step,
}


def _fewer_steps(monkeypatch, steps: int):
    """``recipe.load_run_config`` with the run cut to ``steps`` training steps (appended overrides win)."""
    from jaxalign.methods import recipe

    real = recipe.load_run_config

    def load(config, overrides=(), **kwargs):
        return real(config, [*overrides, f"train.total_steps={steps}", "train.checkpoint.save_every_steps=1000"],
                    **kwargs)

    monkeypatch.setattr(recipe, "load_run_config", load)


def _short_train_configs(monkeypatch, steps: int):
    """``jaxalign.train.TrainConfig`` built with ``total_steps=steps`` whatever a block asks for."""
    import jaxalign.train

    real = jaxalign.train.TrainConfig
    monkeypatch.setattr(jaxalign.train, "TrainConfig",
                        lambda **kwargs: real(**{**kwargs, "total_steps": min(kwargs["total_steps"], steps)}))


SMALLER: dict[str, Callable] = {
    "docs/offline-trainers.md#0": functools.partial(_fewer_steps, steps=2),
    "docs/online-rl.md#0": functools.partial(_fewer_steps, steps=2),
    "docs/online-rl.md#1": functools.partial(_short_train_configs, steps=2),
    "docs/training-core.md#0": functools.partial(_short_train_configs, steps=3),
}


# ------------------------------------------------------------------------------------------ running the pages


_NAMESPACES: dict[str, tuple[dict, list[int]]] = {}  # page -> (namespace, indices of the blocks run in it)


def _execute(block: Block, namespace: dict, monkeypatch) -> None:
    key = f"{block.page}#{block.index}"
    if key in CONTEXT:
        CONTEXT[key](namespace)
    with monkeypatch.context() as patch:
        if key in SMALLER:
            SMALLER[key](patch)
        exec(compile(block.code, block.name, "exec"), namespace)  # noqa: S102 (the docs' own examples)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_the_block_runs(block: Block, environment, monkeypatch):
    if block.not_run is not None:
        pytest.skip(f"not run: {block.not_run}")
    namespace, done = _NAMESPACES.setdefault(block.page, ({"__name__": "__docs__"}, []))
    for earlier in BLOCKS:  # the page's earlier blocks, if their tests did not run them (-k, a failure)
        if earlier.page == block.page and earlier.index < block.index and earlier.index not in done \
                and earlier.not_run is None:
            done.append(earlier.index)
            try:
                _execute(earlier, namespace, monkeypatch)
            except Exception:  # noqa: BLE001, S110 (its own test reports it)
                pass
    done.append(block.index)
    _execute(block, namespace, monkeypatch)


def test_the_blocks_not_run_are_the_listed_ones():
    marked = {f"{b.page}#{b.index}": b.not_run for b in BLOCKS if b.not_run is not None}
    assert marked == NOT_RUN
    assert len(BLOCKS) >= 20 and {b.page for b in BLOCKS} >= {"README.md", "docs/eval.md"}


def test_every_context_names_a_block():
    names = {f"{b.page}#{b.index}" for b in BLOCKS}
    assert set(CONTEXT) <= names and set(SMALLER) <= names

