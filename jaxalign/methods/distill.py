"""Token-level knowledge distillation (TRL's GKDTrainer with ``lmbda = 0``): a student trained to match a frozen
teacher's full next-token distribution at every completion token of SFT data.

Where SFT on a teacher's sampled texts (sequence-level distillation) sees one sampled token per position, this
objective sees the teacher's whole distribution there: per completion position ``t``
``ℓ_t = JSD_β(π_student(·|y_<t) ‖ π_teacher(·|y_<t))`` (:func:`jaxalign.losses.generalized_jsd_loss`: β = 0
forward KL, β = 1 reverse KL), averaged over the completion tokens of the batch.

::

    jaxalign train distill --config hh_rlhf data.source=hh/train.jsonl.gz model.path=small/ teacher=big/ loss.beta=0.5
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jaxalign import losses
from jaxalign.methods.common import F32, evaluate_objective, frozen_model_spec, load_pretrained, with_lora
from jaxalign.methods.recipe import RunConfig
from jaxalign.methods.sft import chosen_as_sft, sft_objective
from jaxalign.models.scoring import DEFAULT_CHUNK, map_position_chunks, slot_targets

EMBEDDED = "the embedded SmolLM2-135M-Instruct"


def completion_states(model, batch: dict) -> Float[Array, "B K D"]:
    """The hidden states whose next-token distributions the loss reads, ``[B, K, D]``: with target slots those
    at ``source_slots`` (the token before each completion target), else every position but the last."""
    tokens = batch["input_ids"]
    if tokens.ndim != 2:
        raise ValueError(f"distill: expected [B, T] sequence batches (SFT records, or the chosen side of pairs), "
                         f"got input_ids of shape {tokens.shape}")
    if "target_slots" in batch:
        hidden, _ = model.hidden_states(tokens, positions=batch["positions"], attention_mask=batch["attention_mask"])
        return jnp.take_along_axis(hidden, batch["source_slots"][..., None].astype(jnp.int32), axis=1)
    hidden, _ = model.hidden_states(tokens, positions=batch["positions"], attention_mask=batch["attention_mask"],
                                    segment_ids=batch.get("segment_ids"))
    return hidden[:, :-1]


def completion_targets(batch: dict) -> tuple[Int[Array, "B K"], Bool[Array, "B K"]]:
    """``(targets, mask)`` aligned with :func:`completion_states`: the completion tokens and where they are real
    (the batch's ``loss_mask`` and ``example_mask``)."""
    tokens = batch["input_ids"]
    if "target_slots" in batch:
        targets, mask = slot_targets(tokens, batch["target_slots"]), batch["target_slots"] > 0
    else:
        targets, mask = tokens[:, 1:], batch["loss_mask"][:, 1:].astype(bool)
    return targets, mask & batch["example_mask"].astype(bool)[:, None]


def distill_positions(student, teacher, student_hidden: Float[Array, "B K D"], teacher_hidden: Float[Array, "B K E"],
                      targets: Int[Array, "B K"], mask: Bool[Array, "B K"], *, beta: float, temperature: float,
                      chunk_size: int | None = DEFAULT_CHUNK) -> dict[str, Float[Array, "B K"]]:
    """Per position: the generalized JSD (``jsd``), the student's NLL of the target (``nll``, temperature 1) and
    whether the two arg-max tokens agree (``agree``), from the two models' hidden states at those positions.

    Both LM heads and the loss run on ``chunk_size`` positions at a time, rematerialised in the backward pass
    (:func:`jaxalign.models.scoring.map_position_chunks`), so one chunk's ``[B, c, V]`` logits of each model
    are alive at once, never the full ``[B, K, V]`` of either. The teacher's part is recomputed in the
    backward pass too (its logits are the loss's constant target): one extra teacher head per position, for
    memory that does not grow with ``K``.
    """
    student_graph, student_state = nnx.split(student)
    teacher_graph, teacher_state = nnx.split(teacher)

    def chunk(states, student_chunk, teacher_chunk, target_chunk, mask_chunk):
        student_logits = nnx.merge(student_graph, states[0]).logits(student_chunk)
        teacher_logits = jax.lax.stop_gradient(nnx.merge(teacher_graph, states[1]).logits(teacher_chunk))
        jsd, _ = losses.generalized_jsd_loss(student_logits, teacher_logits, mask_chunk, beta=beta,
                                             temperature=temperature)
        nll = -losses.token_logps(student_logits, target_chunk, mask_chunk)
        agree = jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)
        return {"jsd": jsd, "nll": nll, "agree": agree.astype(F32)}

    return map_position_chunks(chunk, (student_state, teacher_state),
                               (student_hidden, jax.lax.stop_gradient(teacher_hidden), targets, mask),
                               chunk_size=chunk_size)


def distill_objective(*, beta: float = 0.5, temperature: float = 1.0, chunk_size: int | None = DEFAULT_CHUNK):
    """Token-level distillation on ``[B, T]`` SFT batches: the token mean of GKD's generalized JSD between the
    student (the trained model) and a frozen ``teacher`` over every completion token.

    Formula (``M`` the completion tokens of the batch, ``loss_mask`` and ``example_mask``)::

        L = (1 / |M|) Σ_{(b,t) ∈ M} JSD_β(softmax(z_s[b,t] / τ) ‖ softmax(z_t[b,t] / τ))

    returned as ``(Σ, |M|)`` so gradient accumulation and sharding give the full batch's token mean exactly.
    The teacher arrives as a reference model: ``TrainStep(..., references={"teacher": teacher})``.

    Batches with target slots (``dataset.batched_as(compact_targets=True)``, which :func:`build` asks for) run
    both trunks over the whole rows and both LM heads only at the completion positions; packed rows (no target
    slots) run the heads at every position and mask. Either way the heads run in chunks
    (:func:`distill_positions`).

    Metrics: ``nll`` (the student's token-mean NLL of the completions), ``top1_agreement`` (the two models'
    arg-max tokens agree), ``distill_tokens`` (``|M|``).

    Args:
        beta: β in ``[0, 1]`` (:func:`jaxalign.losses.generalized_jsd_loss`).
        temperature: τ > 0 dividing both models' logits in the loss.
        chunk_size: completion positions per chunk of the two LM heads; None: all at once.

    References:
        Agarwal et al. 2024 (GKD, arXiv 2306.13649), Eq. (1) and Algorithm 1 with λ = 0 (supervised KD when
        β = 0: Hinton et al. 2015, arXiv 1503.02531); TRL ``GKDTrainer.compute_loss``.

    Notes:
        Deviations from TRL's GKDTrainer:

        - Only ``lmbda = 0``: no on-policy batches (the student's own samples, GKD's λ > 0) and no ``seq_kd``
          (the teacher's samples); :class:`~jaxalign.methods.specs.DistillSpec` refuses other values. For
          sequence-level distillation train ``sft`` on the teacher's sampled completions.
        - ``temperature`` here is the loss's τ; TRL's trainer calls the loss at τ = 1 and uses its
          ``GKDConfig.temperature`` (default 0.9) for on-policy sampling only. The default τ = 1 is TRL's loss.
        - The LM heads run only at completion positions and in chunks; TRL computes both models' logits at every
          position and masks. The loss is the same.
        - TRL normalises by ``num_items_in_batch`` (every label that is not -100, the EOS included) over the
          accumulated batch; here ``|M|`` counts the completion targets of the ``loss_mask`` (the completion and
          its EOS), summed over micro-batches: the same quantity.
    """
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"distill_objective: beta must be in [0, 1], got {beta!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"distill_objective: temperature must be a finite number > 0, got {temperature!r}")

    def objective(model, batch, *, key, teacher=None):
        del key
        if teacher is None:
            raise ValueError("distill_objective needs the frozen teacher: "
                             "TrainStep(..., references={'teacher': teacher_model})")
        targets, mask = completion_targets(batch)
        student_hidden = completion_states(model, batch)
        teacher_hidden = completion_states(teacher, batch)
        per = distill_positions(model, teacher, student_hidden, teacher_hidden, targets, mask, beta=beta,
                                temperature=temperature, chunk_size=chunk_size)
        total, count = losses.aggregate(per["jsd"], mask, mode="token_mean")
        metrics = {"nll": losses.masked_mean(per["nll"], mask),
                   "top1_agreement": losses.masked_mean(per["agree"], mask), "distill_tokens": count}
        return (total, count), metrics

    return objective


def check_teacher(student, teacher, student_tokenizer, teacher_tokenizer, *, student_name: str,
                  teacher_name: str) -> None:
    """Refuse a teacher whose next-token distribution is not over the student's tokens.

    Raises:
        ValueError: the vocabulary sizes differ (both named, as TRL refuses), or a token both tokenizers know
            has a different id in each.
    """
    student_size, teacher_size = student.config.vocab_size, teacher.config.vocab_size
    if student_size != teacher_size:
        raise ValueError(f"distill: the teacher ({teacher_name}) has vocab_size {teacher_size} but the student "
                         f"({student_name}) has vocab_size {student_size}: distillation compares the two next-token "
                         "distributions token id by token id, which needs one vocabulary (use a teacher of the "
                         "student's family and tokenizer)")
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    clashes = sorted(token for token, index in student_vocab.items()
                     if token in teacher_vocab and teacher_vocab[token] != index)
    if clashes:
        shown = ", ".join(f"{token!r} is {student_vocab[token]} vs {teacher_vocab[token]}" for token in clashes[:3])
        raise ValueError(f"distill: the student ({student_name}) and the teacher ({teacher_name}) tokenize "
                         f"differently ({len(clashes)} token(s) with other ids: {shown}): their distributions "
                         "cannot be compared id by id")


def load_teacher(config: RunConfig, student, tokenizer):
    """The frozen teacher of ``config.teacher`` (None: the embedded default), with the student's dtypes and
    remat policy, checked against the student (:func:`check_teacher`)."""
    teacher, teacher_tokenizer = load_pretrained(frozen_model_spec(config.model, config.teacher),
                                                 source="teacher")
    check_teacher(student, teacher, tokenizer, teacher_tokenizer, student_name=config.model.path or EMBEDDED,
                  teacher_name=config.teacher or EMBEDDED)
    return teacher


def heldout_nll(model, batches, *, mesh=None) -> dict[str, float]:
    """The student's token-mean NLL of the held-out completions (exact over the whole set, not a mean of batch
    means) and its perplexity; on ``mesh`` as :func:`~jaxalign.methods.common.evaluate_objective` runs."""
    metrics = evaluate_objective(sft_objective(), model, batches, mesh=mesh)
    if not metrics:
        return {}
    return {"nll": metrics["loss"], "perplexity": math.exp(min(metrics["loss"], 700.0))}


def build(config: RunConfig, lm, tokenizer, dataset):
    """``(student, objective, {"teacher": teacher}, dataset, extra)`` for the pipeline: SFT data (pairs: their
    chosen side) batched with target slots, the teacher loaded and checked against the student."""
    if dataset.kind == "preference":
        dataset = chosen_as_sft(dataset)
    if dataset.kind != "sft":
        raise ValueError(f"method distill needs SFT data (prompt/completion, messages, text, scored conversations) "
                         f"or preference pairs (their chosen side); {config.data.name} holds {dataset.kind!r} "
                         "records")
    teacher = load_teacher(config, lm, tokenizer)
    objective = distill_objective(**config.loss.objective_options())
    extra = {"teacher": config.teacher or EMBEDDED}
    # Both LM heads only at completion tokens (packed rows, which carry no target slots, run them everywhere).
    return with_lora(lm, config), objective, {"teacher": teacher}, dataset.batched_as(compact_targets=True), extra
