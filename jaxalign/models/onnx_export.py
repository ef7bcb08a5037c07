"""ONNX export of causal LMs (with past key/values, for a decode loop in ONNX Runtime) and reward models.

The graph is jaxalign's own forward pass converted by jax2onnx (JAX's operations to ONNX operators, weights as
initializers): the export function below calls the model's modules (embeddings, norms, the attention's
projections and RoPE, :func:`~jaxalign.models.llama.grouped_attention`, the MLP, the LM head) layer by layer on
unstacked layers, with the cache laid out as ONNX runtimes expect it: the past keys and values come in, the
present ones (past + new) go out.

Causal LM (opset :data:`ONNX_OPSET`; ``batch``, ``sequence`` and ``past_sequence`` are dynamic):

==================================  ================================================  ==================================
input / output                      shape                                             meaning
==================================  ================================================  ==================================
``input_ids``                       int64 ``[batch, sequence]``                       the new tokens
``attention_mask``                  int64 ``[batch, past_sequence + sequence]``       1 for real tokens, 0 for padding,
                                                                                      over the past and the new tokens
``position_ids``                    int64 ``[batch, sequence]``                       the new tokens' positions
``past_key_values.{i}.key``         float32 ``[batch, kv_heads, past, head_dim]``     layer ``i``'s keys (values) so
/ ``.value``                                                                          far; ``past`` = ``past_sequence``,
                                                                                      0 on the first call
``logits``                          float32 ``[batch, sequence, vocab]``              next-token logits
``present.{i}.key`` / ``.value``    ``[batch, kv_heads, past + sequence, head_dim]``  the cache to pass back as
                                                                                      ``past_key_values``
==================================  ================================================  ==================================

These are the names and layouts of Hugging Face Optimum's decoder exports (``*-with-past``). Keys are stored
after RoPE, as transformers caches them.

Reward model: ``input_ids`` and ``attention_mask`` ``[batch, sequence]`` in; ``rewards`` (the head's output,
``[batch]`` or ``[batch, objectives]``, what :class:`~jaxalign.models.RewardModel` returns) and
``normalized_rewards`` (``gain·reward + bias`` from ``reward_model.json``, what ``jaxalign eval`` reports) out.

``int8``: onnxruntime's dynamic quantisation (int8 weights of the matrix products and of the embedding lookup,
activations quantised per call, one scale per tensor), after the fully connected layers are rewritten from
``Gemm`` to ``MatMul`` (which onnxruntime's dynamic quantiser handles). The MLP's down projection stays float32:
its input, ``act(gate)·up``, has outliers that one int8 scale per activation tensor cannot hold, and quantising it
nearly doubled SmolLM2's perplexity (13.7 → 25.6); kept float, the int8 file's perplexity is within 10 % of
float32's at 40 % of its size (benchmarks/export_formats.py). Per-channel weight scales did not help (with
onnxruntime's int8 kernels on AVX2 they saturated). The file records the MLP width (``jaxalign.mlp_width``) so
:func:`quantize_onnx` finds those products from the file alone.

Needs the ``export`` extra (onnx, onnxruntime) and jax2onnx (see docs/export.md for why it is installed
without its dependencies).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxalign.models.gguf_export import atomic_output
from jaxalign.models.gpt2 import GPT2LMHeadModel
from jaxalign.models.heads import RewardModel
from jaxalign.models.llama import LlamaForCausalLM
from jaxalign.models.quantize import merge_for_export
from jaxalign.models.rope import apply_rope, inverse_frequencies, rope_tables
from jaxalign.models.stack import per_token, unstack_layers

ONNX_OPSET = 21
MLP_WIDTH_KEY = "jaxalign.mlp_width"  # metadata: the down projections' input width (kept float32 by int8)
# protobuf caps one file at 2 GiB: larger weights go to a `<file>.data` beside it (ONNX external data).
_EXTERNAL_DATA_BYTES = 1_500_000_000
_INT_INPUTS = ("input_ids", "attention_mask", "position_ids")


def check_onnx_available() -> None:
    """Raise an ImportError naming what to install when onnx, onnxruntime or jax2onnx is missing."""
    missing = [name for name in ("onnx", "onnxruntime", "jax2onnx") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install 'jaxalign[export]' and then "
                          "pip install --no-deps jax2onnx==0.17.1 (docs/export.md says why --no-deps)")


def _float32(model) -> None:
    config = model.config
    if config.param_dtype != "float32" or config.compute_dtype != "float32":
        raise ValueError(f"ONNX export writes float32 graphs: load the model with param_dtype and compute_dtype "
                         f"float32 (it has {config.param_dtype} / {config.compute_dtype})")


def _visible(attention_mask, sequence: int, *, window: int | None, groups: int):
    """``[B, 1, T·G, S]`` mask: key ``s`` is real and not after query ``t`` (slot ``S − T + t``), within the window,
    each query's row repeated for the ``G`` query heads of a kv head (built once, for every layer)."""
    total = attention_mask.shape[1]
    query = jax.lax.broadcasted_iota(jnp.int32, (sequence, total), 0) + (total - sequence)
    key = jax.lax.broadcasted_iota(jnp.int32, (sequence, total), 1)
    allowed = key <= query
    if window is not None:
        allowed = allowed & (key > query - window)
    visible = allowed[None] & (attention_mask[:, None, :] > 0)
    return jnp.repeat(visible, groups, axis=1)[:, None]


def _attention(q, keys, values, visible, *, scale: float):
    """:func:`~jaxalign.models.llama.grouped_attention`'s numbers on the cache's layout: queries ``[B, T, H, Dh]``,
    keys and values ``[B, K, S, Dh]``, ``visible`` from :func:`_visible`; heads concatenated ``[B, T, H·Dh]``."""
    batch, sequence, heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    queries = q.reshape(batch, sequence, kv_heads, groups, head_dim).transpose(0, 2, 1, 3, 4)
    queries = queries.reshape(batch, kv_heads, sequence * groups, head_dim)
    scores = jnp.einsum("bkqd,bksd->bkqs", queries, keys, preferred_element_type=jnp.float32) * jnp.float32(scale)
    scores = jnp.where(visible, scores, jnp.float32(-0.7 * jnp.finfo(jnp.float32).max))
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, values)
    out = out.reshape(batch, kv_heads, sequence, groups, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, sequence, heads * head_dim)


def _dense(linear, x):
    """``linear`` (an ``nnx.Linear``) on ``[B, T, D]`` as one product: jax2onnx lowers the module itself by
    flattening the tokens and restoring a symbolic ``[B, T]`` around a ``Gemm``, a dozen nodes per call."""
    out = x @ linear.kernel[...]
    return out if linear.bias is None else out + linear.bias[...]


def _with_past(past, new):
    """``[B, K, P, Dh]`` past and ``[B, T, K, Dh]`` new -> ``[B, K, P + T, Dh]``.

    ``lax.concatenate``, not ``jnp.concatenate``: jax2onnx 0.17's ``jnp.concatenate`` gives a symbolic ``P + T``
    axis the size of its first operand."""
    return jax.lax.concatenate([past, new.transpose(0, 2, 1, 3)], 2)


def _heads(x, heads: int, head_dim: int):
    """``[B, T, heads · head_dim]`` -> ``[B, T, heads, head_dim]``."""
    return x.reshape(*x.shape[:-1], heads, head_dim)


# The layers below spell the model's layers with the model's own modules (norms, RoPE, weights) in the shapes
# an ONNX graph runs fastest: products on [B, T, D] (the model flattens the tokens first, stack.per_token, a
# layout for XLA's backward on CPU) and the attention on the cache's layout. Restoring a symbolic [B, T] costs
# ONNX about ten shape nodes per product, and these dominated a decode step (tests hold the logits to jaxalign's).
def _llama_layers(model: LlamaForCausalLM):
    config = model.config
    inv_freq = inverse_frequencies(config)
    scale = config.head_dim**-0.5

    def embed(input_ids, position_ids):
        cos, sin = rope_tables(position_ids, inv_freq, jnp.float32)
        return model.model.embed_tokens(input_ids), (cos, sin)

    def layer(block, hidden, rope, past_k, past_v, visible):
        attn, mlp = block.self_attn, block.mlp
        x = block.input_layernorm(hidden)
        q = apply_rope(_heads(_dense(attn.q_proj, x), config.n_heads, config.head_dim), *rope)
        k = apply_rope(_heads(_dense(attn.k_proj, x), config.n_kv_heads, config.head_dim), *rope)
        v = _heads(_dense(attn.v_proj, x), config.n_kv_heads, config.head_dim)
        keys, values = _with_past(past_k, k), _with_past(past_v, v)
        hidden = hidden + _dense(attn.o_proj, _attention(q, keys, values, visible, scale=scale))
        x = block.post_attention_layernorm(hidden)
        return hidden + _dense(mlp.down_proj, jax.nn.silu(_dense(mlp.gate_proj, x)) * _dense(mlp.up_proj, x)), \
            keys, values

    return embed, list(model.model.layers.layers), layer, model.model.norm


def _gpt2_layers(model: GPT2LMHeadModel):
    config = model.config
    trunk = model.transformer
    scale = config.head_dim**-0.5

    def embed(input_ids, position_ids):
        return trunk.wte(input_ids) + trunk.wpe(position_ids), None

    def layer(block, hidden, rope, past_k, past_v, visible):
        attn, mlp = block.attn, block.mlp
        qkv = _heads(_dense(attn.c_attn, block.ln_1(hidden)), 3 * config.n_heads, config.head_dim)
        q, k, v = jnp.split(qkv, 3, axis=2)
        keys, values = _with_past(past_k, k), _with_past(past_v, v)
        hidden = hidden + _dense(attn.c_proj, _attention(q, keys, values, visible, scale=scale))
        x = jax.nn.gelu(_dense(mlp.c_fc, block.ln_2(hidden)), approximate=mlp.approximate)
        return hidden + _dense(mlp.c_proj, x), keys, values

    return embed, list(trunk.h.layers), layer, trunk.ln_f


def _parts(model):
    model = unstack_layers(model)
    if isinstance(model, LlamaForCausalLM):
        return model, _llama_layers(model)
    if isinstance(model, GPT2LMHeadModel):
        return model, _gpt2_layers(model)
    raise ValueError(f"ONNX export takes a Llama-family or GPT-2 causal LM (or a reward model), not "
                     f"{type(model).__name__}")


def _head(model, hidden):
    """The LM head as one product with a constant ``[D, V]`` weight (a tied embedding transposed once), which
    onnxruntime's int8 quantiser takes (it leaves an ``Einsum`` in float32)."""
    weight = model.tied_embedding().T if model.lm_head is None else model.lm_head.kernel[...]
    return per_token(lambda rows: rows @ weight, hidden)


def _decoder_function(model):
    model, (embed, blocks, layer, norm) = _parts(model)
    window = model.config.sliding_window
    groups = model.config.n_heads // model.config.n_kv_heads

    def forward(input_ids, attention_mask, position_ids, *past):
        hidden, rope = embed(input_ids, position_ids)
        visible = _visible(attention_mask, input_ids.shape[1], window=window, groups=groups)
        presents = []
        for index, block in enumerate(blocks):
            hidden, keys, values = layer(block, hidden, rope, past[2 * index], past[2 * index + 1], visible)
            presents += [keys, values]
        return (_head(model, norm(hidden)), *presents)

    return forward


def _reward_function(reward_model: RewardModel, gain, bias):
    backbone = reward_model.backbone
    lm = _LMProxy(backbone)
    _, (embed, blocks, layer, norm) = _parts(lm)
    head = reward_model.reward_head
    gain, bias = jnp.asarray(gain, jnp.float32), jnp.asarray(bias, jnp.float32)

    def forward(input_ids, attention_mask):
        mask_int = (attention_mask > 0).astype(jnp.int32)
        positions = jnp.maximum(jnp.cumsum(mask_int, axis=1) - 1, 0)
        hidden, rope = embed(input_ids, positions)
        visible = _visible(attention_mask, input_ids.shape[1], window=backbone.config.sliding_window,
                           groups=lm.config.n_heads // lm.config.n_kv_heads)
        shape = (input_ids.shape[0], lm.config.n_kv_heads, 0, lm.config.head_dim)
        empty = jnp.zeros(shape, jnp.float32)
        for block in blocks:
            hidden, _, _ = layer(block, hidden, rope, empty, empty, visible)
        hidden = norm(hidden)
        if head.pooling == "mean":
            weights = mask_int.astype(jnp.float32)
            total = jnp.sum(hidden * weights[..., None], axis=1)
            features = total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)[:, None]
        else:
            slots = jax.lax.broadcasted_iota(jnp.int32, mask_int.shape, 1)
            last = jnp.max(jnp.where(mask_int > 0, slots, 0), axis=1)
            chosen = (slots == last[:, None]).astype(jnp.float32)  # a one-hot sum: a gather jax2onnx sizes fine
            features = jnp.sum(hidden * chosen[..., None], axis=1)
        rewards = head.project(features)
        return rewards, gain * rewards + bias

    return forward


class _LMProxy:
    """A reward model's backbone seen as the causal LM it was built from (the layers and trunk, no LM head)."""

    def __new__(cls, backbone):
        from flax import nnx

        from jaxalign.models.gpt2 import GPT2Model
        from jaxalign.models.llama import LlamaModel

        config = backbone.config
        if isinstance(backbone, LlamaModel):
            lm = nnx.eval_shape(lambda: LlamaForCausalLM(config.with_policy(), rngs=nnx.Rngs(0)))
            lm.model = backbone
        elif isinstance(backbone, GPT2Model):
            lm = nnx.eval_shape(lambda: GPT2LMHeadModel(config.with_policy(), rngs=nnx.Rngs(0)))
            lm.transformer = backbone
        else:
            raise ValueError(f"ONNX export: a reward model on a {type(backbone).__name__} is not supported")
        return lm


def _int64_inputs(graph, names: Sequence[str]) -> None:
    """Declare ``names`` int64 (as tokenizers and ONNX runtimes give ids) and cast them to the graph's int32."""
    import onnx
    from onnx import helper

    casts = []
    for value in graph.input:
        if value.name in names:
            inner = f"{value.name}__int32"
            for node in graph.node:
                node.input[:] = [inner if name == value.name else name for name in node.input]
            value.type.tensor_type.elem_type = onnx.TensorProto.INT64
            casts.append(helper.make_node("Cast", [value.name], [inner], to=onnx.TensorProto.INT32,
                                          name=f"cast_{value.name}"))
    for cast in reversed(casts):
        graph.node.insert(0, cast)


def _name_dims(values, dims: dict[str, Sequence[str | int]]) -> None:
    """Give graph inputs/outputs their documented dimension names (jax2onnx names derived axes itself)."""
    for value in values:
        if value.name not in dims:
            continue
        for dim, wanted in zip(value.type.tensor_type.shape.dim, dims[value.name]):
            if isinstance(wanted, str):
                dim.dim_param = wanted
            else:
                dim.dim_value = wanted


def _gemm_to_matmul(graph) -> None:
    """``Gemm(A, B, C)`` with a constant ``B`` -> ``MatMul(A, B) + C``: onnxruntime's dynamic int8 quantiser
    quantises MatMul weights, not Gemm's."""
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    nodes = []
    for node in graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        beta = attributes.get("beta", 1.0)
        has_bias = len(node.input) > 2 and bool(node.input[2]) and beta != 0.0  # beta 0: the bias is unused
        plain = attributes.get("alpha", 1.0) == 1.0 and not attributes.get("transA", 0) and beta in (0.0, 1.0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in initializers:
            nodes.append(node)
            continue
        weight = node.input[1]
        if attributes.get("transB", 0):
            transposed = numpy_helper.from_array(numpy_helper.to_array(initializers[weight]).T.copy(),
                                                 f"{weight}__transposed")
            graph.initializer.append(transposed)
            weight = transposed.name
        product = f"{node.output[0]}__product" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}_matmul"))
        if product != node.output[0]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_add"))
    del graph.node[:]
    graph.node.extend(nodes)


def _einsum_to_matmul(graph) -> None:
    """``Einsum("...k,kn->...n", x, W)`` with a 2-D constant ``W`` -> ``MatMul(x, W)``: a linear layer on
    ``[B, T, D]`` (jax2onnx lowers a product over the last axis of a 3-D operand to Einsum), which onnxruntime runs
    and quantises as the matrix product it is."""
    from onnx import helper

    matrices = {init.name for init in graph.initializer if len(init.dims) == 2}
    for index, node in enumerate(graph.node):
        if node.op_type != "Einsum" or len(node.input) != 2 or node.input[1] not in matrices:
            continue
        equation = helper.get_attribute_value(node.attribute[0]).decode().replace(" ", "")
        operands, _, out = equation.partition("->")
        left, _, right = operands.partition(",")
        if "." in equation or len(right) != 2 or not left or len(set(left + right)) != len(left) + 1:
            continue
        if left[-1] == right[0] and out == left[:-1] + right[1]:
            graph.node[index].CopyFrom(helper.make_node("MatMul", list(node.input), list(node.output),
                                                        name=f"{node.name}_matmul"))


def _shape_elements(name: str, producers, constants, ranks) -> list | None:
    """The elements of a computed 1-D shape tensor: ``("const", value)``, ``("dim", tensor, axis)`` (``Shape(tensor)``
    at ``axis``, through the Shape/Slice/Gather/Squeeze/Unsqueeze/Concat chains jax2onnx builds) or ``None``
    (anything else); None as a whole when the tensor's length is unknown."""
    from onnx import helper

    if name in constants:
        return [("const", int(v)) for v in constants[name].reshape(-1)]
    node = producers.get(name)
    attributes = {} if node is None else {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node is not None and node.op_type in ("Squeeze", "Unsqueeze", "Cast", "Identity"):
        inner = _shape_elements(node.input[0], producers, constants, ranks)
        return inner if inner is not None and len(inner) == 1 else None
    if node is not None and node.op_type == "Concat" and attributes.get("axis") in (0, -1):
        parts = [_shape_elements(part, producers, constants, ranks) for part in node.input]
        return None if any(part is None for part in parts) else [e for part in parts for e in part]
    if node is not None and node.op_type == "Shape" and node.input[0] in ranks:
        rank = ranks[node.input[0]]
        start, end = attributes.get("start", 0), attributes.get("end", rank)
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else min(end, rank))
        return [("dim", node.input[0], axis) for axis in range(start, end)]
    if node is not None and node.op_type in ("Gather", "Slice"):
        source = _shape_elements(node.input[0], producers, constants, ranks)
        bounds = [constants.get(i) for i in node.input[1:]]
        if source is not None and all(b is not None and b.size == 1 for b in bounds):
            bounds = [int(b.reshape(-1)[0]) for b in bounds]
            if node.op_type == "Gather" and attributes.get("axis", 0) == 0 and 0 <= bounds[0] < len(source):
                return [source[bounds[0]]]
            # Slice(data, starts, ends[, axes[, steps]]) on axis 0, step 1
            if (node.op_type == "Slice" and bounds[2:3] in ([], [0]) and bounds[3:4] in ([], [1])
                    and 0 <= bounds[0] <= bounds[1] <= len(source)):
                return source[bounds[0]:bounds[1]]
    length = ranks.get(f"{name}#length")
    return None if length is None else [None] * length


def _static_reshapes(graph) -> None:
    """A ``Reshape`` whose target shape jax2onnx computes from ``Shape`` nodes gets a constant one where ONNX's
    spelling allows: ``0`` where the element is the input's own dimension at that position, ``-1`` for at most one
    element that is neither (the rest of the size). Each symbolic reshape otherwise costs about nine small nodes on
    every call. Exact: the constant describes the same shape for every input size."""
    import onnx
    from onnx import helper, numpy_helper

    producers = {output: node for node in graph.node for output in node.output}
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer
                 if init.data_type == onnx.TensorProto.INT64 and len(init.dims) <= 1 and np.prod(init.dims) <= 8}
    # The rank of every tensor whose shape the graph states, and ("<name>#length") the length of 1-D ones.
    ranks = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            ranks[value.name] = len(dims)
            if len(dims) == 1 and dims[0].HasField("dim_value"):
                ranks[f"{value.name}#length"] = dims[0].dim_value
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] in constants or any(
                a.name == "allowzero" and helper.get_attribute_value(a) for a in node.attribute):
            continue
        elements = _shape_elements(node.input[1], producers, constants, ranks)
        if elements is None:
            continue
        target = []
        for position, element in enumerate(elements):
            if element is not None and element[0] == "const":
                target.append(element[1])
            elif element is not None and element[1] == node.input[0] and element[2] == position:
                target.append(0)
            else:
                target.append(-1)
        if target.count(-1) > 1:
            continue
        name = f"{node.output[0]}__static_shape"
        graph.initializer.append(numpy_helper.from_array(np.asarray(target, np.int64), name))
        constants[name] = np.asarray(target, np.int64)
        node.input[1] = name


def _prune(graph) -> None:
    """Remove the nodes (and initializers) nothing uses any more."""
    used = {output.name for output in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(output in used for output in node.output):
            kept.append(node)
            used.update(name for name in node.input if name)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    described = [value for value in graph.value_info if value.name in used]
    del graph.value_info[:]
    graph.value_info.extend(described)


def _save(proto, path: Path, *, external: bool, data_name: str) -> None:
    import onnx

    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def _convert(function, specs, input_names, output_names, *, name: str, int8: bool, path: Path,
             metadata: dict[str, str], progress: bool, dims: dict[str, Sequence[str | int]]) -> Path:
    check_onnx_available()
    import logging

    import onnx
    from jax2onnx import to_onnx

    steps = ["converting with jax2onnx", "rewriting for onnxruntime", "saving"]
    steps += ["int8 quantisation"] if int8 else []
    with tqdm(total=len(steps), desc=f"writing {path.name}", unit="step", disable=not progress) as bar:
        bar.set_postfix_str(steps[0])
        # jax2onnx logs a traceback for each optional plugin whose package (equinox, dm-pix) is absent, and onnx-ir a
        # warning for every shape constant it leaves untyped: neither is about the exported model.
        for name in ("jax2onnx", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.ERROR)
        proto = to_onnx(function, specs, input_names=input_names, output_names=output_names, opset=ONNX_OPSET,
                        model_name=name)
        bar.update()
        bar.set_postfix_str(steps[1])
        _int64_inputs(proto.graph, _INT_INPUTS)
        _gemm_to_matmul(proto.graph)
        _einsum_to_matmul(proto.graph)
        _static_reshapes(proto.graph)
        _prune(proto.graph)
        _name_dims(proto.graph.input, dims)
        _name_dims(proto.graph.output, dims)
        for key, value in metadata.items():
            proto.metadata_props.add(key=key, value=value)
        proto.producer_name = "jaxalign"
        onnx.checker.check_model(proto, full_check=False)
        bar.update()
        bar.set_postfix_str(steps[2])
        external = sum(init.ByteSize() for init in proto.graph.initializer) > _EXTERNAL_DATA_BYTES
        if not int8:
            with _cleaned_data_file(path):
                with atomic_output(path) as temporary:
                    _save(proto, temporary, external=external, data_name=f"{path.name}.data")
            bar.update()
            return path
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
            float_path = Path(scratch) / "float32.onnx"
            _save(proto, float_path, external=external, data_name="float32.onnx.data")
            bar.update()
            bar.set_postfix_str(steps[3])
            quantize_onnx(float_path, path)
            bar.update()
    return path


@contextmanager
def _cleaned_data_file(path: Path):
    """Remove ``path``'s external-data file if writing fails (it is written under its final name)."""
    data_file = path.with_name(f"{path.name}.data")
    existed = data_file.exists()
    try:
        yield
    except BaseException:
        if not existed:
            data_file.unlink(missing_ok=True)
        raise


def _mlp_width(config) -> int:
    """The input width of the MLP's down projection (``down_proj``; GPT-2's ``mlp.c_proj``)."""
    return int(config.intermediate_size)


def down_projections(graph, mlp_width: int) -> list[str]:
    """The ``MatMul`` nodes of the MLPs' down projections: a constant weight of ``mlp_width`` input rows."""
    rows = {init.name: init.dims[0] for init in graph.initializer if len(init.dims) == 2}
    return [node.name for node in graph.node if node.op_type == "MatMul" and rows.get(node.input[1]) == mlp_width]


def quantize_onnx(float_path: str | Path, path: str | Path) -> Path:
    """onnxruntime's dynamic int8 quantisation of a float32 file :func:`save_onnx` or :func:`save_reward_onnx`
    wrote (``MatMul`` weights and the embedding ``Gather``; activations quantised per call; the MLPs' down
    projections kept float32, see the module docstring), written to ``path`` under a temporary name."""
    check_onnx_available()
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float_path, path = Path(float_path), Path(path)
    model = onnx.load(str(float_path), load_external_data=False)
    external = any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    width = {prop.key: prop.value for prop in model.metadata_props}.get(MLP_WIDTH_KEY)
    if width is None:
        raise ValueError(f"{float_path}: no {MLP_WIDTH_KEY} in its metadata; quantize_onnx takes the files "
                         "jaxalign's ONNX export writes")
    kept_float = down_projections(model.graph, int(width))
    with _cleaned_data_file(path), tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        quantized = Path(scratch) / "int8.onnx"
        quantize_dynamic(float_path, quantized, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"],
                         nodes_to_exclude=kept_float, use_external_data_format=external)
        with atomic_output(path) as temporary:
            if external:  # re-saved so the data file is named after the final file, not the scratch one
                _save(onnx.load(str(quantized)), temporary, external=True, data_name=f"{path.name}.data")
            else:
                os.replace(quantized, temporary)
    return path


def save_onnx(model, path: str | Path, *, int8: bool = False, metadata: dict[str, str] | None = None,
              progress: bool = True) -> Path:
    """Write a causal LM's forward pass with past key/values (module docstring) as an ONNX file.

    Args:
        model: a float32 :class:`~jaxalign.models.LlamaForCausalLM` or :class:`~jaxalign.models.GPT2LMHeadModel`;
            LoRA adapters are merged first.
        path: the ``.onnx`` file (written under a temporary name, renamed at the end).
        int8: apply onnxruntime's dynamic int8 quantisation.
        metadata: extra ``metadata_props`` (strings).
        progress: show a bar over the steps.
    """
    if not isinstance(model, (LlamaForCausalLM, GPT2LMHeadModel)):
        raise ValueError(f"save_onnx takes a Llama-family or GPT-2 causal LM, not {type(model).__name__} (a reward "
                         "model goes through save_reward_onnx)")
    _float32(model)
    model = merge_for_export(model)  # quantised kernels dequantised, LoRA adapters merged
    config = model.config
    batch, sequence, past = jax.export.symbolic_shape("batch, sequence, past_sequence")
    ids = jax.ShapeDtypeStruct((batch, sequence), jnp.int32)
    cache = jax.ShapeDtypeStruct((batch, config.n_kv_heads, past, config.head_dim), jnp.float32)
    specs = [ids, jax.ShapeDtypeStruct((batch, past + sequence), jnp.int32), ids] + [cache] * (2 * config.n_layers)
    inputs = list(_INT_INPUTS) + [f"past_key_values.{i}.{kind}" for i in range(config.n_layers)
                                  for kind in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{kind}" for i in range(config.n_layers) for kind in ("key", "value")]
    info = {"jaxalign.kind": "causal_lm", "jaxalign.architecture": config.architecture,
            "jaxalign.num_layers": str(config.n_layers), MLP_WIDTH_KEY: str(_mlp_width(config)), **(metadata or {})}
    cache_dims = ("batch", config.n_kv_heads, "past_sequence", config.head_dim)
    present_dims = ("batch", config.n_kv_heads, "past_sequence + sequence", config.head_dim)
    dims = {"input_ids": ("batch", "sequence"), "position_ids": ("batch", "sequence"),
            "attention_mask": ("batch", "past_sequence + sequence"), "logits": ("batch", "sequence", config.vocab_size),
            **{name: cache_dims for name in inputs[3:]}, **{name: present_dims for name in outputs[1:]}}
    return _convert(_decoder_function(model), specs, inputs, outputs, path=Path(path), int8=int8, metadata=info,
                    progress=progress, name=f"{config.architecture}_with_past", dims=dims)


def save_reward_onnx(reward_model: RewardModel, path: str | Path, *, gain=1.0, bias=0.0, int8: bool = False,
                     metadata: dict[str, str] | None = None, progress: bool = True) -> Path:
    """Write a reward model (trunk, pooling and head) as an ONNX file: ``rewards`` and ``normalized_rewards``.

    Args:
        reward_model: a float32 :class:`~jaxalign.models.RewardModel`.
        gain, bias: ``reward_model.json``'s normalisation (a number, or one per objective).
    """
    _float32(reward_model.backbone)
    reward_model = merge_for_export(reward_model)
    batch, sequence = jax.export.symbolic_shape("batch, sequence")
    ids = jax.ShapeDtypeStruct((batch, sequence), jnp.int32)
    head = reward_model.reward_head
    info = {"jaxalign.kind": "reward_model", "jaxalign.pooling": head.pooling,
            "jaxalign.num_objectives": str(head.num_objectives or 0),
            MLP_WIDTH_KEY: str(_mlp_width(reward_model.backbone.config)), **(metadata or {})}
    function = _reward_function(reward_model, np.asarray(gain, np.float32), np.asarray(bias, np.float32))
    scores = ("batch",) if head.num_objectives is None else ("batch", head.num_objectives)
    dims = {"input_ids": ("batch", "sequence"), "attention_mask": ("batch", "sequence"), "rewards": scores,
            "normalized_rewards": scores}
    return _convert(function, [ids, ids], ["input_ids", "attention_mask"], ["rewards", "normalized_rewards"],
                    path=Path(path), int8=int8, metadata=info, progress=progress, name="reward_model", dims=dims)

