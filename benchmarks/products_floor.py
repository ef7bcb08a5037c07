"""The floor under a training step on this machine: its weight products alone, in XLA, at the step's shapes.

A Llama training step multiplies activations by every weight matrix three times per pass over the policy (the
forward product ``x·W``, the input's gradient ``dy·Wᵀ``, the weight's gradient ``xᵀ·dy``) and once more per
frozen forward pass (DPO's reference). :func:`training_products_floor` times exactly those products, with the
rows the step runs (``trunk_rows`` through every layer's projections, ``head_positions`` through the LM head's
``d × V`` matrix), every layer's own weights (so they stream from memory as in the step), in the data-flow order
of a step (XLA schedules them; nothing else is computed but a max of each result nobody reads, so that none is
dropped). No attention (neither its products, ``4·L·H·Dh`` FLOPs a visible query-key pair, about 2 % of the
benchmark's steps, nor its softmax), norms, activation functions, log-softmax, embedding gradient, optimizer
update or layer-loop bookkeeping: what a step of the same shapes would take if everything else were free, so
``TRL step / floor`` is how far ahead of TRL such a step could be here. (The sampling benchmark's ``matmul_bound``
is the same idea for decoding.)

Each product's input is the previous product's output, as in a forward pass, so that it is fresh in the caches;
the backward reads the forward's saved inputs. Products fed each their own random input, read from memory, take
1.89-1.95 s for the benchmark's SFT shapes on 2 Xeon cores, about as long as the whole SFT step (2.0 s), against
1.43-1.49 s chained. So this is a measurement of the products as a step meets them, not a proof that no step
could be faster. It assumes a remat policy that saves the products' outputs (jaxalign
train's ``dots_no_batch``): a policy that recomputes products runs more of them than are timed here. The benchmark
times it after the steps, so on a machine whose speed drifts its share of the step is approximate.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import side_order  # benchmarks/side_order.py: run as `python benchmarks/...`


def training_products_floor(config, *, trunk_rows: int, head_positions: int, frozen_forwards: int, dtype,
                            repeats: int = 3, seed: int = 0) -> dict:
    """Seconds of one step's weight products alone (module docstring), the median of ``repeats`` calls.

    ``frozen_forwards``: forward passes of a frozen model over the same rows (1 for DPO's reference, else 0).
    """
    d, f, vocab = config.d_model, config.intermediate_size, config.vocab_size
    q_width, kv_width = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"q": (d, q_width), "k": (d, kv_width), "v": (d, kv_width), "o": (q_width, d), "gate": (d, f),
              "up": (d, f), "down": (f, d)}
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 8 * config.n_layers + 8))

    def normal(*shape, scale=1.0):
        return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    # Variance-preserving weights, so that 30 layers of products neither overflow nor reach subnormal numbers.
    layers = [{name: normal(*shape, scale=shape[0] ** -0.5) for name, shape in shapes.items()}
              for _ in range(config.n_layers)]
    embedding = normal(vocab, d, scale=d ** -0.5)
    first_inputs = [normal(trunk_rows, d) for _ in range(1 + frozen_forwards)]

    def products(layers, embedding, first_inputs):
        maxima = []

        def kept(x):  # a result nothing else reads: its max keeps it from being dropped
            maxima.append(jnp.max(x).astype(jnp.float32))
            return x

        def forward(h):
            saved = []
            for w in layers:  # each product's input is the one before's output, fresh in the caches as in a step
                # Every product's result is kept as well as multiplied on: a result with a single product as its
                # user could otherwise be folded into it ((h·Wq)·Wo as h·(Wq·Wo)) by an XLA that reassociates.
                q, k, v = kept(h @ w["q"]), kept(h @ w["k"]), kept(h @ w["v"])
                o = kept(q @ w["o"])
                gate, up = kept(o @ w["gate"]), kept(o @ w["up"])
                saved.append({"q": h, "k": k, "v": v, "o": q, "gate": o, "up": up, "down": gate})
                h = kept(gate @ w["down"])
            head_input = h[:head_positions]
            return h, head_input, kept(head_input @ embedding.T), saved

        last_hidden, head_input, logits, saved = forward(first_inputs[0])
        for frozen_input in first_inputs[1:]:
            forward(frozen_input)
        # The backward, from the head down: the input's and the weight's gradient of every product. The output
        # gradients of the products whose inputs' gradients feed no further product (k, v, up) stand in as the
        # forward's outputs of the same shape.
        kept(logits @ embedding)
        kept(logits.T @ head_input)  # the tied embedding's gradient [V, d]
        grad = last_hidden  # any [rows, d] array stands in for the last layer's output gradient
        for w, inputs in zip(reversed(layers), reversed(saved), strict=True):
            grad_down_input = grad @ w["down"].T
            kept(inputs["down"].T @ grad)
            grad_o_out = grad_down_input @ w["gate"].T
            kept(inputs["gate"].T @ grad_down_input)
            kept(inputs["up"] @ w["up"].T)
            kept(inputs["gate"].T @ inputs["up"])
            grad_q = grad_o_out @ w["o"].T
            kept(inputs["o"].T @ grad_o_out)
            grad = grad_q @ w["q"].T
            kept(inputs["q"].T @ grad_q)
            for name in ("k", "v"):
                kept(inputs[name] @ w[name].T)
                kept(inputs["q"].T @ inputs[name])
        return sum(maxima) + jnp.max(grad).astype(jnp.float32)

    arguments = (layers, embedding, first_inputs)
    program = jax.jit(products).lower(*arguments).compile()
    cost = program.cost_analysis()  # a dict (JAX >= 0.7, as pyproject.toml requires); empty where not counted
    jax.block_until_ready(program(*arguments))  # fault every buffer in
    seconds = statistics.median(side_order.timed(lambda: jax.block_until_ready(program(*arguments)))
                                for _ in range(repeats))
    per_row = sum(2 * d_in * d_out for d_in, d_out in shapes.values()) * config.n_layers
    forward_flops = per_row * trunk_rows + 2 * d * vocab * head_positions
    flops = (3 + frozen_forwards) * forward_flops
    return {"seconds": seconds, "flops": float(flops), "flop_per_s": flops / seconds, "trunk_rows": trunk_rows,
            "head_positions": head_positions, "frozen_forwards": frozen_forwards, "repeats": repeats,
            "products": (3 + frozen_forwards) * (len(shapes) * config.n_layers + 1),
            # XLA's own count for the compiled program (the products and the maxima): a product it dropped or
            # merged would show here.
            "compiled_flops": float(cost["flops"]) if cost and "flops" in cost else None}
