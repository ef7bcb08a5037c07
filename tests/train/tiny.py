"""A tiny Llama, a deterministic resumable batch iterator and an SFT objective, shared by the train tests
and the scripts they run in subprocesses (which cannot import a conftest)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import losses
from jaxalign.models import LlamaForCausalLM, ModelConfig
from jaxalign.train import OptimizerConfig

V, T = 97, 7
BATCH = 8

# Tests share one optimizer and batch size where they can: the same program is then compiled once per
# session (see conftest's compilation cache). SGD with momentum keeps comparisons linear in the gradient
# (Adam's normalisation would amplify rounding in near-zero gradient entries).
SGD = OptimizerConfig(name="sgd", learning_rate=0.5, momentum=0.9, max_grad_norm=None)

TINY = ModelConfig(architecture="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=8, intermediate_size=64)


def tiny_model(seed: int = 0, config: ModelConfig = TINY) -> LlamaForCausalLM:
    return LlamaForCausalLM(config, rngs=nnx.Rngs(seed))


def make_batch(rng: np.random.Generator, batch_size: int, length: int = T) -> dict[str, np.ndarray]:
    """Right-padded rows of random lengths 2..T; the loss covers every real next-token target."""
    tokens = rng.integers(0, V, size=(batch_size, length), dtype=np.int32)
    lengths = rng.integers(2, length + 1, size=batch_size)
    attention_mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    return {"tokens": tokens * attention_mask, "attention_mask": attention_mask}


class TinyBatches:
    """An endless iterator of random global batches of ``batch_size`` rows, of which this process takes
    shard ``shard_index`` of ``shard_count``; its position is ``state_dict()``. This is the protocol of
    jaxalign.data's iterators (any object with ``state_dict``/``load_state_dict``).
    """

    def __init__(self, batch_size: int, *, seed: int = 0, shard_index: int = 0, shard_count: int = 1):
        self.batch_size, self.seed = batch_size, seed
        self.shard_index, self.shard_count = shard_index, shard_count
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = make_batch(np.random.default_rng([self.seed, self.position]), self.batch_size)
        self.position += 1
        rows = self.batch_size // self.shard_count
        return {name: array[self.shard_index * rows:(self.shard_index + 1) * rows] for name, array in batch.items()}

    def state_dict(self) -> dict:
        return {"position": self.position, "shard_index": self.shard_index}

    def load_state_dict(self, state: dict) -> None:
        if state["shard_index"] != self.shard_index:
            raise ValueError(f"position of shard {state['shard_index']} loaded into shard {self.shard_index}")
        self.position = state["position"]


def sft_objective(model, batch, *, key):
    """Token-mean next-token NLL over the real tokens."""
    logits, _ = model(batch["tokens"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"][:, 1:]
    per_token, metrics = losses.sft_loss(logits[:, :-1], batch["tokens"][:, 1:], mask)
    return losses.aggregate(per_token, mask), metrics


def keyed_sft_objective(model, batch, *, key):
    """SFT with a random 20% of the loss tokens dropped, drawn from ``key``: a run is reproduced only if
    the RNG key is."""
    logits, _ = model(batch["tokens"], attention_mask=batch["attention_mask"])
    keep = jax.random.bernoulli(key, 0.8, batch["attention_mask"][:, 1:].shape)
    mask = jnp.logical_and(batch["attention_mask"][:, 1:], keep)
    per_token, metrics = losses.sft_loss(logits[:, :-1], batch["tokens"][:, 1:], mask)
    return losses.aggregate(per_token, mask), metrics


def host_params(state) -> dict[str, np.ndarray]:
    """A train state's parameters as {"model/layers/...": array} on the host."""
    return {"/".join(map(str, path)): np.asarray(jax.device_get(variable.get_value()))
            for path, variable in nnx.to_flat_state(state.params)}
