"""LLMDoctor guided decoding: a frozen patient steered token by token by one doctor per preference dimension.

With doctors ``π_1 … π_G``, each trained for one preference dimension (helpfulness, safety, ...), and
preference weights ``w_i`` chosen at inference, the next token is drawn from

    π(y | s) ∝ π_patient(y | s)^α · Π_i π_doctor_i(y | s)^(β · w_i)

i.e. the engine's guided score ``α·log π_patient + Σ_i β_i·log π_doctor_i`` with ``β_i = β · w_i``
(:class:`~jaxalign.rollout.engine.Sampler` with ``guides=doctors``). ``α``, ``β`` and the ``w_i`` are a traced
array inside the compiled loop: changing them between calls never recompiles.

- The weights are a mapping ``{dimension: w}`` that may name only the doctors' dimensions (an unknown name is a
  ``ValueError`` listing the known ones). A dimension it does not name gets ``w = 0`` (that doctor is off);
  no mapping at all (None) gives every doctor ``w = 1``. Weights are finite and ``≥ 0``; they are **not**
  normalised (``{"helpfulness": 0.8, "safety": 0.2}`` with ``β = 0.5`` gives ``β_i = 0.4, 0.1``).
- Defaults are the paper's: ``α = 1``, ``β = 0.5`` (used with top-p 0.9 sampling).

Example::

    guided = GuidedSampler.from_pretrained(None, ["doctors/helpful", "doctors/safe"])   # embedded patient
    out = guided.generate(prompt_ids, key=jax.random.key(0), params=SamplingParams(top_p=0.9),
                          preference_weights={"helpfulness": 0.8, "safety": 0.2})

References:
    Shen et al. 2026, "LLMdoctor: Token-Level Flow-Guided Preference Optimization for Efficient Test-Time
    Alignment of Large Language Models", arXiv 2601.10416 (the patient–doctor decoding rule).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from jaxtyping import Array

from jaxalign import models
from jaxalign.rollout.engine import Rollout, Sampler, StreamFn
from jaxalign.rollout.params import SamplingParams

#: The base (patient) model's exponent α in ``π ∝ π_base^α · Π_i π_guide_i^(β·w_i)``.
DEFAULT_ALPHA = 1.0
#: The guides' (doctors') exponent β in the same product.
DEFAULT_BETA = 0.5

PreferenceWeights = Mapping[str, float]


def check_dimensions(dimensions: Sequence[str], *, names: Sequence[str] | None = None) -> tuple[str, ...]:
    """The doctors' dimensions, checked: at least one, each a non-empty string, no two alike.

    Args:
        dimensions: one preference dimension per doctor, in the doctors' order.
        names: how each doctor is named in errors (e.g. ``--doctor path``); default ``doctor i``.

    Raises:
        ValueError: no doctor, an empty or non-string dimension, or two doctors for one dimension.
    """
    dimensions = tuple(dimensions)
    names = tuple(names) if names is not None else tuple(f"doctor {i}" for i in range(len(dimensions)))
    if not dimensions:
        raise ValueError("guided decoding needs at least one doctor (one per preference dimension)")
    seen: dict[str, str] = {}
    for dimension, name in zip(dimensions, names, strict=True):
        if not isinstance(dimension, str) or not dimension:
            raise ValueError(f"{name}: the preference dimension must be a non-empty string, got {dimension!r}")
        if dimension in seen:
            raise ValueError(f"{seen[dimension]} and {name} are both doctors for the dimension {dimension!r}: "
                             "give each preference dimension one doctor")
        seen[dimension] = name
    return dimensions


def read_dimensions(directories: Sequence[str | Path], *, source: str = "--doctor") -> tuple[str, ...]:
    """The dimensions of doctor directories from their ``doctor.json`` cards, checked as
    :func:`check_dimensions` (cheap: no weights are read, so a command can fail before loading a model).

    Raises:
        FileNotFoundError: a directory is missing or is not a doctor (no ``doctor.json`` / value head).
        ValueError: a bad card, no directories, or two doctors for one dimension.
    """
    cards = [models.read_doctor_card(directory, source=source) for directory in directories]
    return check_dimensions([card["dimension"] for card in cards],
                            names=[f"{source} {directory}" for directory in directories])


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{what} must be finite and >= 0, got {value!r}")
    return number


def resolve_weights(dimensions: Sequence[str], preference_weights: PreferenceWeights | None, *,
                    source: str = "preference_weights") -> dict[str, float]:
    """Every dimension's weight ``w_i``, in the doctors' order.

    Args:
        dimensions: the doctors' dimensions.
        preference_weights: ``{dimension: weight}`` naming some of them (the others get 0), or None (all 1).
        source: what to call the weights in errors (a command-line option, ``/weights``).

    Raises:
        ValueError: not a mapping, a name that is not a dimension (the known ones are listed), or a weight
            that is not a finite number ``>= 0``.
    """
    if preference_weights is None:
        return dict.fromkeys(dimensions, 1.0)
    if not isinstance(preference_weights, Mapping):
        raise ValueError(f"{source}: expected an object mapping preference dimensions to weights, e.g. "
                         f'{{"{dimensions[0]}": 1.0}}, got {preference_weights!r}')
    unknown = [name for name in preference_weights if name not in dimensions]
    if unknown:
        raise ValueError(f"{source}: no doctor for the dimension(s) {', '.join(map(repr, unknown))}; the doctors' "
                         f"dimensions are {', '.join(map(repr, dimensions))}")
    return {dimension: (_number(preference_weights[dimension], f"{source}: the weight of {dimension!r}")
                        if dimension in preference_weights else 0.0) for dimension in dimensions}


def check_scale(alpha: float, beta: float) -> tuple[float, float]:
    """``(alpha, beta)`` as floats, each finite and ``>= 0``.

    Raises:
        ValueError: naming the one that is not.
    """
    return _number(alpha, "alpha (the patient's weight)"), _number(beta, "beta (the doctors' weight)")


def guidance_betas(dimensions: Sequence[str], preference_weights: PreferenceWeights | None, *, alpha: float,
                   beta: float, source: str = "preference_weights") -> tuple[float, ...]:
    """The engine's per-doctor weights ``β_i = β · w_i`` (doctors' order), everything checked.

    Raises:
        ValueError: as :func:`resolve_weights` and :func:`check_scale`; ``alpha`` and every ``β_i`` zero (the
            scores would be flat: every token equally likely).
    """
    alpha, beta = check_scale(alpha, beta)
    betas = tuple(beta * w for w in resolve_weights(dimensions, preference_weights, source=source).values())
    if alpha == 0 and not any(betas):
        raise ValueError("alpha and every doctor's weight beta·w are 0: the scores would be flat (every token "
                         "equally likely); give the patient or some doctor a positive weight")
    return betas


class GuidedSampler:
    """A patient steered by one doctor per preference dimension (LLMDoctor), on one :class:`Sampler`.

    Example::

        guided = GuidedSampler(patient, {"helpfulness": helpful_doctor, "safety": safe_doctor})
        out = guided.generate(prompts, key=key, params=SamplingParams(top_p=0.9),
                              preference_weights={"safety": 1.0})        # helpfulness 0: that doctor is off
        out.guide_logps                                                 # [2, R, N] each doctor's log-probs

    Args:
        patient: the frozen causal LM that is steered (weight ``alpha``).
        doctors: ``{dimension: doctor LM}`` or ``[(dimension, doctor LM), ...]``: guide models sharing the
            patient's vocabulary, one per preference dimension.
        alpha: default weight of the patient's log-probabilities (the paper's 1).
        beta: default guidance strength; doctor ``i`` gets ``beta · w_i`` (the paper's 0.5).
        tokenizer: the patient's tokenizer, kept as ``self.tokenizer`` for callers (not used here).
        doctor_sources: how each doctor is named in errors and records (e.g. its directory).
        **sampler_options: :class:`Sampler`'s ``mesh``, ``pad_token_id``, ``length_buckets``,
            ``batch_buckets``, ``candidates``.

    Raises:
        ValueError: no doctor, duplicate or empty dimensions, ``alpha``/``beta`` not finite and ``>= 0``, or a
            doctor whose vocabulary size differs from the patient's (models with the same size but different
            tokenizers cannot be told apart here: :meth:`from_pretrained` compares the tokenizers).
    """

    def __init__(self, patient: nnx.Module, doctors: Mapping[str, nnx.Module] | Sequence[tuple[str, nnx.Module]], *,
                 alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA, tokenizer=None,
                 doctor_sources: Sequence[str] | None = None, **sampler_options):
        pairs = list(doctors.items()) if isinstance(doctors, Mapping) else [tuple(pair) for pair in doctors]
        names = list(doctor_sources) if doctor_sources is not None else None
        if names is not None and len(names) != len(pairs):
            raise ValueError(f"{len(pairs)} doctors but {len(names)} doctor_sources")
        self.dimensions = check_dimensions([dimension for dimension, _ in pairs], names=names)
        self.doctor_sources = tuple(names) if names is not None else tuple(f"doctor {d!r}" for d in self.dimensions)
        self.alpha, self.beta = check_scale(alpha, beta)
        self.tokenizer = tokenizer
        vocab = patient.config.vocab_size
        for (_, doctor), name in zip(pairs, self.doctor_sources, strict=True):
            if doctor.config.vocab_size != vocab:
                raise ValueError(f"{name} has a vocabulary of {doctor.config.vocab_size} tokens but the patient has "
                                 f"{vocab}: a doctor adds its log-probabilities token by token, so it must use the "
                                 "patient's tokenizer")
        self.sampler = Sampler(patient, guides=[doctor for _, doctor in pairs], **sampler_options)

    @classmethod
    def from_pretrained(cls, patient: str | Path | None, doctors: Sequence[str | Path], *,
                        alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA, patient_source: str = "patient",
                        doctor_source: str = "doctor", policy: Mapping[str, Any] | None = None,
                        **sampler_options) -> GuidedSampler:
        """Load a patient (checkpoint directory, ``.gguf`` file, or None for the embedded SmolLM2-135M-Instruct)
        and doctor directories (``models.save_doctor``'s format; the value head is not needed to decode).

        The doctors' cards are read before any weights, so a directory that is not a doctor, two doctors for
        one dimension or bad ``alpha``/``beta`` fail at once. The patient's pad id is the tokenizer's when it
        has one.

        Args:
            patient_source, doctor_source: how the paths are introduced in errors (e.g. ``--model``,
                ``--doctor``).
            policy: ``param_dtype``, ``compute_dtype``, ``remat`` for every model (see ``models.load_pretrained``).

        Raises:
            FileNotFoundError / ValueError: as :func:`read_dimensions` and ``models.load_pretrained``; a doctor
                whose tokenizer maps some token to another id than the patient's (``models.check_same_tokenizer``).
        """
        dimensions = read_dimensions(doctors, source=doctor_source)
        check_scale(alpha, beta)
        policy = dict(policy or {})
        model, tokenizer = models.load_pretrained(patient, source=patient_source, **policy)
        patient_name = f"{patient_source} {patient}" if patient is not None else "the embedded patient"
        loaded = []
        for directory in doctors:
            doctor, doctor_tokenizer = models.load_pretrained(directory, source=doctor_source, **policy)
            models.check_same_tokenizer(tokenizer, doctor_tokenizer, patient=patient_name,
                                        doctor=f"{doctor_source} {directory}")
            loaded.append(doctor)
        sampler_options.setdefault("pad_token_id", tokenizer.pad_token_id)
        return cls(model, list(zip(dimensions, loaded, strict=True)), alpha=alpha, beta=beta, tokenizer=tokenizer,
                   doctor_sources=[f"{doctor_source} {directory}" for directory in doctors], **sampler_options)

    @property
    def config(self):
        """The patient's config."""
        return self.sampler.config

    @property
    def num_doctors(self) -> int:
        """Doctors guiding the patient, one per preference dimension."""
        return len(self.dimensions)

    def weights(self, preference_weights: PreferenceWeights | None = None, *,
                source: str = "preference_weights") -> dict[str, float]:
        """Every doctor's ``w_i`` (see :func:`resolve_weights`)."""
        return resolve_weights(self.dimensions, preference_weights, source=source)

    def betas(self, preference_weights: PreferenceWeights | None = None, *, alpha: float | None = None,
              beta: float | None = None, source: str = "preference_weights") -> tuple[float, ...]:
        """The engine's per-doctor weights ``β_i = β · w_i``, in the doctors' order (see :func:`guidance_betas`;
        ``alpha``, ``beta`` default to the sampler's)."""
        return guidance_betas(self.dimensions, preference_weights, alpha=self.alpha if alpha is None else alpha,
                              beta=self.beta if beta is None else beta, source=source)

    def generate(self, prompts: np.ndarray | Sequence[Sequence[int]], prompt_mask: np.ndarray | None = None, *,
                 key: Array, params: SamplingParams = SamplingParams(),
                 preference_weights: PreferenceWeights | None = None, alpha: float | None = None,
                 beta: float | None = None, stream: StreamFn | None = None, return_hidden: bool = False) -> Rollout:
        """Sample from ``π ∝ π_patient^α · Π_i π_doctor_i^(β·w_i)`` (see :meth:`Sampler.generate` for the rest).

        Args:
            preference_weights: ``{dimension: w}``; unnamed dimensions get 0, None gives every doctor 1.
            alpha, beta: this call's patient weight and guidance strength (default: the sampler's).

        Returns:
            A :class:`Rollout`; ``model_logps`` are the patient's log-probs of the tokens, ``guide_logps[i]``
            doctor ``i``'s.

        Raises:
            ValueError: as :func:`guidance_betas` (unknown dimensions, bad weights, ``alpha`` or ``beta``, flat
                scores) and :meth:`Sampler.generate`.
        """
        alpha = self.alpha if alpha is None else check_scale(alpha, 0.0)[0]
        betas = self.betas(preference_weights, alpha=alpha, beta=beta)
        return self.sampler.generate(prompts, prompt_mask, key=key, params=params, alpha=alpha, betas=betas,
                                     stream=stream, return_hidden=return_hidden)
