"""A GRPO group's prompt run once: the ``G`` responses to a prompt as branches of one row.

An online iteration samples ``G`` responses to each prompt; rows ``b·G .. b·G+G−1`` of the rollout hold the
same prompt, left-padded to ``P`` (:class:`~jaxalign.rollout.Rollout`: the sampler repeats each prompt ``G``
times), each followed by its ``N`` response slots. Laid out as one row ``[prompt, response 1, ..., response
G]`` with ``branch_ids`` 0 / 1 .. G (:mod:`jaxalign.models.masks`: a response sees the prompt and itself, never
another response) and every slot keeping its own row's position, the prompt's ``P`` slots run through the model
once per group instead of ``G`` times, and every response token's hidden state, log-prob and gradient equal
those of its own row (tested). The row is ``P + G·N`` slots long, so the attention scores cover
``(P + G·N)²`` query-key pairs where the rows had ``G·(P + N)²`` (the extra pairs are masked): the saving is
the prompt's ``(G − 1)·P`` token passes through the layers' products, less that attention. Long responses
turn it into a loss (``G = 16`` responses of 1024 tokens: a 16k-slot row whose scores cost several times what
the products save), so :func:`saves_work` decides per shape.

Pairs of DPO and the reward models share their prompt the same way from the data loader
(:mod:`jaxalign.data.layouts`); a rollout is laid out here, on the device, from the rows the sampler wrote.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxalign.models import GPT2Config
from jaxalign.models.scoring import slot_logps, slot_targets

ROW_KEYS = ("input_ids", "attention_mask", "positions")


def group_rows(inputs: dict[str, Array], *, prompt_length: int, group: int) -> dict[str, Array]:
    """``[B·G, P + N]`` rollout rows (``input_ids``, ``attention_mask``, ``positions``) as ``[B, P + G·N]``
    group rows, with their ``branch_ids``, and per response token ``[B, G·N]`` its slot (``target_slots``) and
    the slot whose hidden state predicts it (``source_slots``: the prompt's last slot for a response's first
    token). Response ``j``'s token ``t`` sits at slot ``P + j·N + t``, so ``[B·G, N]`` per-token arrays reshape
    to ``[B, G·N]`` in the same order (:func:`ungroup` reverses it)."""
    rows, length = inputs["input_ids"].shape
    if group < 1 or rows % group:
        raise ValueError(f"group_rows: {rows} rows are not groups of {group}")
    if not 0 < prompt_length < length:
        raise ValueError(f"group_rows: prompt length {prompt_length} must leave prompt and response slots in "
                         f"rows of {length}")
    groups, responses = rows // group, length - prompt_length
    width = group * responses

    def merged(x):
        return jnp.concatenate([x[::group, :prompt_length], x[:, prompt_length:].reshape(groups, width)], axis=1)

    out = {name: merged(inputs[name]) for name in ROW_KEYS}
    step = jnp.arange(width, dtype=jnp.int32)
    branch = jnp.concatenate([jnp.zeros(prompt_length, jnp.int32), 1 + step // responses])
    target = prompt_length + step
    source = jnp.where(step % responses == 0, prompt_length - 1, target - 1)
    out["branch_ids"] = jnp.broadcast_to(branch, (groups, prompt_length + width))
    out["target_slots"] = jnp.broadcast_to(target, (groups, width))
    out["source_slots"] = jnp.broadcast_to(source, (groups, width))
    return out


def forward_flops(config, length: int) -> int:
    """Forward FLOPs of one row of ``length`` slots through the trunk, counting every slot: ``2·W`` a token for
    the layers' products (``W`` their weights: q, k, v, o and the MLP's matrices, three in a gated MLP, two in
    GPT-2's) and ``4·L·H·Dh`` a query-key pair, all ``length²`` pairs (the masked ones are computed too)."""
    d, heads, kv_heads, head_dim = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    mlp_matrices = 2 if isinstance(config, GPT2Config) else 3
    weights = config.n_layers * (2 * d * heads * head_dim + 2 * d * kv_heads * head_dim
                                 + mlp_matrices * d * config.intermediate_size)
    per_pair = 4 * config.n_layers * heads * head_dim
    return 2 * weights * length + per_pair * length * length


def saves_work(config, *, prompt_length: int, response_length: int, group: int) -> bool:
    """Whether group rows take fewer FLOPs than the plain rows over the padded shapes (:func:`forward_flops`)."""
    return (forward_flops(config, prompt_length + group * response_length)
            < group * forward_flops(config, prompt_length + response_length))


def grouped(x: Array, group: int) -> Array:
    """``[B·G, N, ...]`` per response -> ``[B, G·N, ...]`` per group row (the order of :func:`group_rows`)."""
    return x.reshape(x.shape[0] // group, group * x.shape[1], *x.shape[2:])


def ungroup(x: Array, group: int) -> Array:
    """``[B, G·N, ...]`` -> ``[B·G, N, ...]``: one row per response again."""
    return x.reshape(x.shape[0] * group, x.shape[1] // group, *x.shape[2:])


def group_logps(model, rows: dict[str, Array], *, group: int, temperature: float = 1.0,
                chunk_size: int | None, with_entropy: bool = False,
                ) -> Float[Array, "R N"] | tuple[Float[Array, "R N"], Float[Array, "R N"]]:
    """``[B·G, N]`` log-probs (and entropies) of the response tokens from :func:`group_rows`' rows: the trunk
    once per group, the LM head at the ``G·N`` response slots only.

    ``chunk_size`` counts positions per response, as for plain rows: a group row's LM-head chunks cover
    ``G·chunk_size`` of its slots, as many logits as ``G`` plain rows' chunks hold.
    """
    hidden, _ = model.hidden_states(rows["input_ids"], positions=rows["positions"],
                                    attention_mask=rows["attention_mask"], branch_ids=rows["branch_ids"])
    targets: Int[Array, "B K"] = slot_targets(rows["input_ids"], rows["target_slots"])
    out = slot_logps(model, hidden, rows["source_slots"], targets, temperature=temperature,
                     chunk_size=None if chunk_size is None else chunk_size * group, with_entropy=with_entropy)
    return jax.tree.map(lambda x: ungroup(x, group), out)
