"""Reward sources for the online trainers (PPO, GRPO): one interface over judges, Python functions and signals.

A batch of sampled responses reaches the reward code as :class:`Episodes` (``R`` rows of host NumPy arrays and
decoded texts). A *reward source* is any object with a ``name`` and ``__call__(episodes) -> RewardOutput``:
``total`` is the ``[R]`` float64 reward the algorithm uses, ``components`` every ``[R]`` signal that went into
it, for the logs. A leaf source lists its own total under its name; combinators nest their parts' components
under the part's name (``<name>/<component>``)::

    episodes = Episodes.from_rollout(rollout, tokenizer, ref_logps=ref_logps, group_size=G)
    source = build_reward({"composite": {"alpha": 0.2, "external": {"model": "runs/rm/export"},
                                         "internal": {"coherence": 1.0, "fluency": 0.5}}}, tokenizer=tokenizer)
    out = source(episodes)          # out.total [R]; out.components["external/reward_model"], ["internal"], ...

Sources:

- :class:`JudgeReward`: any ``jaxalign.eval`` judge (VADER, a learned reward model on the rollout's tokens).
- :class:`FunctionReward`: a user function of the texts (``fn(prompts, responses)``) or of the episodes.
- :data:`BUILTIN_FUNCTIONS`: ``vader``, ``length`` and the internal signals, by name.
- Internal signals (pure NumPy, ``episodes -> [R]``): :func:`coherence` (distinct-2), :func:`length_penalty`,
  :func:`fluency` (reference log-likelihood), :class:`Faithfulness` (prompt/response embedding cosine).
- :class:`CompositeReward`: ``(1 − α)·external + α·Σᵢ wᵢ·signalᵢ``; :class:`WeightedRewards`: ``Σₖ wₖ·rₖ``
  (GRPO's several reward functions).
- :func:`build_reward`: any of the above from the ``reward:`` mapping of a YAML preset.
- :func:`clip_rewards` and :class:`RunningMoments`: PPO's reward clipping and running scaling.

Every source checks what it gets back: ``R`` finite numbers, else a ``ValueError`` naming the source, the row
and the value. ``jaxalign.eval`` (and with it the models) is imported only when a judge or a reward model is
built, so the signals and the config parsing stay NumPy-only.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
from jaxtyping import Bool, Float, Int

__all__ = [
    "BUILTIN_FUNCTIONS",
    "INTERNAL_SIGNALS",
    "Builtin",
    "CompositeReward",
    "Episodes",
    "Faithfulness",
    "FunctionReward",
    "JudgeReward",
    "RewardOutput",
    "RewardSource",
    "RunningMoments",
    "Signal",
    "WeightedRewards",
    "build_reward",
    "clip_rewards",
    "coherence",
    "fluency",
    "length_penalty",
    "response_length",
]


@dataclasses.dataclass(frozen=True)
class Episodes:
    """One batch of sampled responses as the reward sources see it (R rows, host NumPy).

    Attributes:
        prompts: each row's prompt text as the model saw it, special tokens removed.
        responses: each row's response text (special tokens skipped).
        prompt_tokens: ``[R, P]`` int32, left-padded.
        prompt_mask: ``[R, P]`` bool.
        response_tokens: ``[R, N]`` int32, right-padded.
        response_mask: ``[R, N]`` bool (the stop token included).
        stopped: ``[R]`` bool: the row ended on a stop token.
        ref_logps: ``[R, N]`` float32 ``log π_ref`` of each response token (0 on padding); None when not
            computed (only :func:`fluency` needs it).
        rollout: the :class:`jaxalign.rollout.Rollout` these rows came from (token-level scorers use it).
        group_size: ``G`` samples per prompt (rows ``b·G .. b·G+G−1`` share a prompt).

    Raises:
        ValueError: the fields disagree on the number of rows or on shapes, or ``R`` is not a multiple of ``G``.
    """

    prompts: list[str]
    responses: list[str]
    prompt_tokens: Int[np.ndarray, "R P"]
    prompt_mask: Bool[np.ndarray, "R P"]
    response_tokens: Int[np.ndarray, "R N"]
    response_mask: Bool[np.ndarray, "R N"]
    stopped: Bool[np.ndarray, " R"]
    ref_logps: Float[np.ndarray, "R N"] | None = None
    rollout: Any = None
    group_size: int = 1

    def __post_init__(self):
        rows = len(self.prompts)
        problems = []
        if len(self.responses) != rows:
            problems.append(f"{len(self.responses)} responses for {rows} prompts")
        for tokens, mask in (("prompt_tokens", "prompt_mask"), ("response_tokens", "response_mask")):
            shape = np.shape(getattr(self, tokens))
            if len(shape) != 2 or shape[0] != rows:
                problems.append(f"{tokens} has shape {shape}, expected ({rows}, length)")
            elif np.shape(getattr(self, mask)) != shape:
                problems.append(f"{mask} has shape {np.shape(getattr(self, mask))}, {tokens} {shape}")
        if np.shape(self.stopped) != (rows,):
            problems.append(f"stopped has shape {np.shape(self.stopped)}, expected ({rows},)")
        if self.ref_logps is not None and np.shape(self.ref_logps) != np.shape(self.response_tokens):
            problems.append(f"ref_logps has shape {np.shape(self.ref_logps)}, response_tokens "
                            f"{np.shape(self.response_tokens)}")
        if not isinstance(self.group_size, int) or self.group_size < 1 or rows % self.group_size:
            problems.append(f"group_size {self.group_size!r} does not divide the {rows} rows")
        if problems:
            raise ValueError("Episodes: " + "; ".join(problems))

    @property
    def rows(self) -> int:
        """``R``, the number of responses."""
        return len(self.prompts)

    @property
    def content_mask(self) -> Bool[np.ndarray, "R N"]:
        """``response_mask`` without the stop token of the rows that stopped: the tokens of the text itself."""
        mask = np.array(self.response_mask, dtype=bool)
        lengths = mask.sum(axis=1)
        ended = np.flatnonzero(np.asarray(self.stopped, bool) & (lengths > 0))
        # Right padding: a row's stop token is its last real one.
        mask[ended, lengths[ended] - 1] = False
        return mask

    @classmethod
    def from_rollout(cls, rollout, tokenizer, *, ref_logps: Float[Any, "R N"] | None = None,
                     group_size: int = 1) -> Episodes:
        """The episodes of a :class:`jaxalign.rollout.Rollout`: its arrays on the host, its rows decoded with
        ``tokenizer`` (``skip_special_tokens=True``), the rollout kept for token-level scorers.

        Args:
            rollout: ``R`` rows (drop bucket padding first with ``rollout.take_rows``).
            tokenizer: the policy's tokenizer.
            ref_logps: ``[R, N]`` reference log-probabilities of the response tokens, if computed.
            group_size: ``G`` samples per prompt.
        """
        prompt_tokens, prompt_mask = np.asarray(rollout.prompt_tokens, np.int32), np.asarray(rollout.prompt_mask, bool)
        tokens, mask = np.asarray(rollout.tokens, np.int32), np.asarray(rollout.response_mask, bool)

        def decode(ids: np.ndarray, keep: np.ndarray) -> list[str]:
            return list(tokenizer.batch_decode([row[m].tolist() for row, m in zip(ids, keep)],
                                               skip_special_tokens=True))

        return cls(prompts=decode(prompt_tokens, prompt_mask), responses=decode(tokens, mask),
                   prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, response_tokens=tokens, response_mask=mask,
                   stopped=np.asarray(rollout.stopped, bool),
                   ref_logps=None if ref_logps is None else np.asarray(ref_logps, np.float32),
                   rollout=rollout, group_size=group_size)


class RewardOutput(NamedTuple):
    """What a reward source returns.

    Attributes:
        total: ``[R]`` float64, the reward the algorithm uses.
        components: name -> ``[R]`` float64, every signal that went into it (logged).
    """

    total: Float[np.ndarray, " R"]
    components: dict[str, Float[np.ndarray, " R"]]


@runtime_checkable
class RewardSource(Protocol):
    """Turns episodes into rewards: ``source(episodes) -> RewardOutput``; ``name`` labels it in the logs."""

    name: str

    def __call__(self, episodes: Episodes) -> RewardOutput:
        """``[R]`` rewards of ``episodes`` and their components."""
        ...


# An internal signal or built-in function: episodes -> [R] numbers.
Signal = Callable[[Episodes], Float[np.ndarray, " R"]]


def _describe(fn: Callable) -> str:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{qualname}" if module else qualname


def _scores(values: Any, rows: int, source: str) -> Float[np.ndarray, " R"]:
    """``values`` as ``[rows]`` finite float64, or a ValueError naming ``source``, the row and the value."""
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{source}: returned {type(values).__name__} {values!r}; expected a sequence of {rows} "
                         "numbers, one per response")
    if hasattr(values, "__array__") and not isinstance(values, (list, tuple)):
        items = np.asarray(values)
        if items.ndim != 1:
            hint = (" (a multi-objective judge: combine its objectives into one reward, e.g. RewardModelJudge "
                    "dimension_weights=[...])" if items.ndim == 2 else "")
            raise ValueError(f"{source}: returned an array of shape {items.shape}; expected ({rows},){hint}")
    else:
        items = list(values)
    if len(items) != rows:
        raise ValueError(f"{source}: returned {len(items)} values for {rows} responses")
    if isinstance(items, np.ndarray) and items.dtype.kind in "biuf":
        out = items.astype(np.float64)
    else:
        out = np.empty(rows, np.float64)
        for row, value in enumerate(items):
            number = np.asarray(value)
            if number.ndim != 0 or number.dtype.kind not in "biuf":
                raise ValueError(f"{source}: row {row}: {value!r} is not a number")
            out[row] = number
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        more = f" ({bad.size} non-finite rows in all)" if bad.size > 1 else ""
        raise ValueError(f"{source}: row {bad[0]}: {items[bad[0]]!r} is not finite{more}")
    return out


# Names the online methods already log under ``reward/``: the spread of the total (all), of each GRPO group,
# and PPO's running normaliser. A component of that name would overwrite them.
RESERVED_COMPONENTS = ("std", "group_std", "running_std")


def run_source(source: RewardSource, episodes: Episodes) -> RewardOutput:
    """Call ``source`` and check its total and components are ``[R]`` finite numbers, under names that do
    not overwrite another logged metric."""
    out = source(episodes)
    label = f"reward source {source.name!r}"
    if not isinstance(out, RewardOutput):
        raise TypeError(f"{label} returned {type(out).__name__}; expected a RewardOutput(total, components)")
    reserved = [name for name in out.components if name in RESERVED_COMPONENTS]
    if reserved:
        raise ValueError(f"{label}: component name {reserved[0]!r} is reserved (the trainers log their own "
                         f"reward/{reserved[0]}); rename the component")
    components = {name: _scores(value, episodes.rows, f"{label}, component {name!r}")
                  for name, value in out.components.items()}
    return RewardOutput(_scores(out.total, episodes.rows, label), components)


def _nested(prefix: str, name: str, out: RewardOutput) -> dict[str, np.ndarray]:
    """A part's total under ``prefix + name`` and its components under ``prefix + name + "/"`` (a leaf's own
    entry, its total under its name, is not repeated)."""
    nested = {prefix + name: out.total}
    nested.update({f"{prefix}{name}/{key}": value for key, value in out.components.items() if key != name})
    return nested


def _check_source(source: Any, where: str) -> None:
    if not isinstance(source, RewardSource):
        raise TypeError(f"{where}: {source!r} is not a reward source (an object with `name` and "
                        "`__call__(episodes) -> RewardOutput`); wrap a function in FunctionReward, a judge in "
                        "JudgeReward")


# ----------------------------------------------------------------------------------------------- sources


class JudgeReward:
    """A ``jaxalign.eval`` judge as a reward source: ``r = judge.score(prompts, responses)``.

    A judge with ``score_rollout`` (:class:`~jaxalign.eval.RewardModelJudge`) scores ``episodes.rollout``'s
    token arrays when the episodes carry one, exactly as reward-model training read its rewards (the template's
    end of turn appended to rows that stopped); without a rollout it scores the decoded texts.

    Args:
        judge: a :class:`~jaxalign.eval.Judge`; a multi-objective reward model must combine its objectives
            (``RewardModelJudge(..., dimension_weights=[...])``).
        name: the label in the logs; default the judge's ``name`` attribute, else its class name.

    Raises:
        TypeError: ``judge`` has no ``score`` method.
        ValueError: a multi-objective judge without ``dimension_weights`` (and, at call time, any ``[R, D]``
            result).
    """

    def __init__(self, judge, name: str | None = None):
        if not callable(getattr(judge, "score", None)):
            raise TypeError(f"JudgeReward needs a judge with score(prompts, responses), got {type(judge).__name__}")
        self.judge = judge
        self.name = name or getattr(judge, "name", None) or type(judge).__name__
        objectives = getattr(judge, "num_objectives", None)
        if objectives is not None and getattr(judge, "dimension_weights", None) is None:
            raise ValueError(f"JudgeReward {self.name!r}: the judge returns {objectives} objectives per response "
                             "and a reward is one number; give the RewardModelJudge dimension_weights=[...] "
                             f"({objectives} weights) to combine them")

    def __call__(self, episodes: Episodes) -> RewardOutput:
        """``[R]`` judge scores (component ``<name>``)."""
        if episodes.rollout is not None and callable(getattr(self.judge, "score_rollout", None)):
            raw = self.judge.score_rollout(episodes.rollout)
        else:
            raw = self.judge.score(episodes.prompts, episodes.responses)
        total = _scores(raw, episodes.rows, f"judge {self.name!r}")
        return RewardOutput(total, {self.name: total})


class FunctionReward:
    """A Python function as a reward source.

    Args:
        fn: ``inputs="text"``: ``fn(prompts: list[str], responses: list[str]) -> R numbers``;
            ``inputs="episodes"``: ``fn(episodes: Episodes) -> R numbers``.
        name: the label in the logs (and the component's name).
        inputs: ``"text"`` or ``"episodes"``.

    Raises:
        ValueError (at call time): the result is not ``R`` finite numbers; the message names the function,
            the row and the value.
    """

    def __init__(self, fn: Callable, name: str, *, inputs: str = "text"):
        if not callable(fn):
            raise TypeError(f"FunctionReward {name!r}: {fn!r} is not callable")
        if not isinstance(name, str) or not name:
            raise ValueError(f"FunctionReward: name must be a non-empty string, got {name!r}")
        if inputs not in ("text", "episodes"):
            raise ValueError(f"FunctionReward {name!r}: inputs must be 'text' or 'episodes', got {inputs!r}")
        self.fn, self.name, self.inputs = fn, name, inputs

    def __call__(self, episodes: Episodes) -> RewardOutput:
        """``[R]`` values of the function (component ``<name>``)."""
        if self.inputs == "text":
            values = self.fn(list(episodes.prompts), list(episodes.responses))
        else:
            values = self.fn(episodes)
        total = _scores(values, episodes.rows, f"reward function {self.name!r} ({_describe(self.fn)})")
        return RewardOutput(total, {self.name: total})


# ------------------------------------------------------------------------------------------------ signals


def response_length(episodes: Episodes) -> Float[np.ndarray, " R"]:
    """``L``: the response's length in tokens, the stop token excluded (it is not part of the text).

    Returns:
        ``[R]`` float64.
    """
    return episodes.content_mask.sum(axis=1).astype(np.float64)


def coherence(episodes: Episodes) -> Float[np.ndarray, " R"]:
    """Distinct-2 of each response: ``|{(y_t, y_{t+1})}| / (L − 1)``, unique token bigrams over bigrams.

    1 when no bigram repeats, ``1/(L − 1)`` for one token repeated; 1.0 for responses of fewer than 2 tokens.
    It penalises degenerate repetition, the classic failure of a policy over-optimising a reward model. The
    stop token is excluded (it is not part of the text).

    Returns:
        ``[R]`` float64 in ``(0, 1]``.

    References:
        Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models",
        arXiv 1510.03055 (distinct-n, Sec. 4.1); here per response rather than over a corpus.
    """
    tokens, mask = np.asarray(episodes.response_tokens), episodes.content_mask
    out = np.ones(episodes.rows, np.float64)
    for row in range(episodes.rows):
        ids = tokens[row][mask[row]].tolist()
        if len(ids) >= 2:
            out[row] = len(set(zip(ids[:-1], ids[1:]))) / (len(ids) - 1)
    return out


def length_penalty(episodes: Episodes, *, target_length: float) -> Float[np.ndarray, " R"]:
    """``−|L − L*| / L*``: 0 at the target length, −1 for an empty response or one twice too long.

    Args:
        episodes: ``L`` is :func:`response_length` (stop token excluded).
        target_length: ``L* > 0`` tokens.

    Returns:
        ``[R]`` float64, at most 0.
    """
    if isinstance(target_length, bool) or not isinstance(target_length, numbers.Real) or not target_length > 0:
        raise ValueError(f"length_penalty: target_length must be a positive number, got {target_length!r}")
    return -np.abs(response_length(episodes) - target_length) / float(target_length)


def fluency(episodes: Episodes) -> Float[np.ndarray, " R"]:
    """The reference model's mean log-likelihood per response token: ``Σ_t m_t·log π_ref(y_t) / max(Σ_t m_t, 1)``.

    ``m`` is ``response_mask`` (the stop token included: how likely the reference finds ending there is part
    of the response's likelihood); 0 for an empty response.

    Returns:
        ``[R]`` float64, at most 0.

    Raises:
        ValueError: ``episodes.ref_logps`` is None.
    """
    if episodes.ref_logps is None:
        raise ValueError("fluency needs episodes.ref_logps, the reference model's log-probabilities of the "
                         "response tokens [R, N]: compute them (a forward pass of the reference model on "
                         "rollout.sequences()) and pass Episodes(..., ref_logps=...)")
    mask = np.asarray(episodes.response_mask, bool)
    logps = np.where(mask, np.asarray(episodes.ref_logps, np.float64), 0.0)
    return logps.sum(axis=1) / np.maximum(mask.sum(axis=1), 1)


class Faithfulness:
    """Cosine similarity of the prompt's and the response's mean input embeddings: ``cos(ē_x, ē_y)``.

    ``ē_x = mean_{t ∈ x} E[x_t]`` over the prompt's real tokens, ``ē_y`` likewise over the response's, both
    without the ids in ``ignore_ids`` (pad, chat-template and stop tokens, which every row shares and which
    would pull every pair together). A side with no token left (or a zero mean) scores 0. A crude topicality
    signal: responses that drift from the prompt's vocabulary score lower.

    Args:
        embeddings: ``[V, D]`` input embedding table (the reference model's ``embed_tokens``).
        ignore_ids: token ids to leave out on both sides.

    Returns (when called):
        ``[R]`` float64 in ``[−1, 1]``.
    """

    def __init__(self, embeddings: Float[Any, "V D"], *, ignore_ids: Iterable[int] = ()):
        table = np.asarray(embeddings)
        if table.ndim != 2 or table.dtype.kind != "f":
            raise ValueError(f"Faithfulness: embeddings must be a [V, D] float table, got {table.dtype} "
                             f"{table.shape}")
        self.embeddings = table
        self.ignore_ids = np.asarray(sorted({int(i) for i in ignore_ids}), np.int64)

    def _mean(self, ids: np.ndarray) -> np.ndarray | None:
        ids = ids[~np.isin(ids, self.ignore_ids)]
        if ids.size == 0:
            return None
        outside = ids[(ids < 0) | (ids >= self.embeddings.shape[0])]
        if outside.size:
            raise ValueError(f"Faithfulness: token id {int(outside[0])} is outside the embedding table's "
                             f"{self.embeddings.shape[0]} rows (another tokenizer?)")
        return self.embeddings[ids].astype(np.float64).mean(axis=0)

    def __call__(self, episodes: Episodes) -> Float[np.ndarray, " R"]:
        prompts, prompt_mask = np.asarray(episodes.prompt_tokens), np.asarray(episodes.prompt_mask, bool)
        responses, response_mask = np.asarray(episodes.response_tokens), np.asarray(episodes.response_mask, bool)
        out = np.zeros(episodes.rows, np.float64)
        for row in range(episodes.rows):
            x, y = self._mean(prompts[row][prompt_mask[row]]), self._mean(responses[row][response_mask[row]])
            if x is None or y is None:
                continue
            norm = np.linalg.norm(x) * np.linalg.norm(y)
            out[row] = float(x @ y / norm) if norm > 0 else 0.0
        return out


def _vader() -> Signal:
    from jaxalign.eval.judges import VaderJudge

    judge = VaderJudge()

    def vader(episodes: Episodes) -> np.ndarray:
        return judge.score(episodes.prompts, episodes.responses)

    return vader


class Builtin(NamedTuple):
    """A reward function a spec names with ``function: <name>``.

    Attributes:
        make: builds the function ``episodes -> [R]`` from keyword arguments: the spec's ``options``, plus
            ``embeddings`` and ``ignore_ids`` when ``embeddings`` is set.
        summary: one line for listings.
        options: spec keys ``make`` requires (e.g. ``target_length``).
        embeddings: ``make`` needs the reference model's input embedding table.
    """

    make: Callable[..., Signal]
    summary: str
    options: tuple[str, ...] = ()
    embeddings: bool = False


BUILTIN_FUNCTIONS: dict[str, Builtin] = {
    "vader": Builtin(_vader, "VADER compound sentiment of the response in [-1, 1] (the gold judge)"),
    "length": Builtin(lambda: response_length, "response length in tokens (stop token excluded)"),
    "coherence": Builtin(lambda: coherence, "distinct-2 ratio of the response tokens"),
    "length_penalty": Builtin(lambda *, target_length: functools.partial(length_penalty, target_length=target_length),
                              "-|L - target_length| / target_length", options=("target_length",)),
    "fluency": Builtin(lambda: fluency, "reference model's mean log-likelihood per response token"),
    "faithfulness": Builtin(lambda *, embeddings, ignore_ids: Faithfulness(embeddings, ignore_ids=ignore_ids),
                            "cosine of the prompt's and the response's mean input embeddings", embeddings=True),
}
# The signals CompositeReward's internal term combines (ADLF).
INTERNAL_SIGNALS = ("coherence", "length_penalty", "fluency", "faithfulness")


# -------------------------------------------------------------------------------------------- combinators


def _finite_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {type(value).__name__} {value!r}")
    return float(value)


class CompositeReward:
    """The ADLF reward: ``r = (1 − α)·r_ext + α·Σᵢ wᵢ·sᵢ``, an external reward fused with internal signals.

    Args:
        external: the external reward source (a reward model, a judge, a function).
        internal: signal name -> weight ``wᵢ`` (non-empty; each name a key of ``signals``).
        alpha: ``α ∈ [0, 1]``, the internal term's share.
        signals: name -> ``fn(episodes) -> [R]`` (e.g. :func:`coherence`, ``functools.partial(length_penalty,
            target_length=32)``, :func:`fluency`, :class:`Faithfulness`); only the weighted ones run.
        name: the label in the logs.

    Returns (when called):
        ``total [R]``; components ``external/<name>`` (and the external source's own components below it),
        ``internal/<signal>`` (the raw signal) for each weighted signal, and ``internal`` (``Σᵢ wᵢ·sᵢ``).

    References:
        "Adaptive dual-loss fusion" (ADLF)-style mixing of an external reward with intrinsic quality signals,
        ``(1 − α)·external + α·internal``.

    Notes:
        α is fixed here; a schedule for it, if any, belongs to the trainer (pass a new CompositeReward).
    """

    def __init__(self, external: RewardSource, internal: Mapping[str, float], *, alpha: float,
                 signals: Mapping[str, Signal], name: str = "composite"):
        _check_source(external, "CompositeReward external")
        alpha = _finite_number(alpha, "CompositeReward alpha")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"CompositeReward: alpha must be in [0, 1], got {alpha}")
        if not internal:
            raise ValueError("CompositeReward: internal is empty; give at least one signal weight")
        weights = {}
        for key, weight in internal.items():
            if key not in signals:
                raise ValueError(f"CompositeReward: internal signal {key!r} has no function in signals "
                                 f"(given: {', '.join(signals) or 'none'})")
            if not callable(signals[key]):
                raise TypeError(f"CompositeReward: signals[{key!r}] is not callable")
            weights[key] = _finite_number(weight, f"CompositeReward internal[{key!r}]")
        self.external, self.internal, self.alpha, self.name = external, weights, alpha, name
        self.signals = {key: signals[key] for key in weights}

    def __call__(self, episodes: Episodes) -> RewardOutput:
        """``[R]`` fused rewards and their components."""
        external = run_source(self.external, episodes)
        components = _nested("external/", self.external.name, external)
        internal = np.zeros(episodes.rows, np.float64)
        for key, weight in self.internal.items():
            values = _scores(self.signals[key](episodes), episodes.rows, f"internal signal {key!r}")
            components[f"internal/{key}"] = values
            internal = internal + weight * values
        components["internal"] = internal
        return RewardOutput((1.0 - self.alpha) * external.total + self.alpha * internal, components)


class WeightedRewards:
    """Several reward sources summed with weights: ``r = Σₖ wₖ·rₖ`` (GRPO's ``reward_funcs`` with
    ``reward_weights``, as in TRL's GRPOTrainer).

    Args:
        sources: the reward sources, with distinct names.
        weights: ``wₖ``, one per source (negative weights make penalties).
        name: the label in the logs.

    Returns (when called):
        ``total [R]``; components ``<name>`` (each source's unweighted total) and ``<name>/<component>``.

    Raises:
        ValueError: no sources, weights of another length or not finite, two sources with the same name.
    """

    def __init__(self, sources: Sequence[RewardSource], weights: Sequence[float], *, name: str = "weighted"):
        sources, weights = tuple(sources), tuple(weights)
        if not sources:
            raise ValueError("WeightedRewards: no reward sources")
        if len(weights) != len(sources):
            raise ValueError(f"WeightedRewards: {len(weights)} weights for {len(sources)} sources")
        seen: dict[str, int] = {}
        for index, source in enumerate(sources):
            _check_source(source, f"WeightedRewards sources[{index}]")
            if source.name in seen:
                raise ValueError(f"WeightedRewards: sources {seen[source.name]} and {index} are both named "
                                 f"{source.name!r}; give each a distinct name (name=... or `name:` in the config)")
            seen[source.name] = index
        self.sources, self.name = sources, name
        self.weights = tuple(_finite_number(w, f"WeightedRewards weights[{i}]") for i, w in enumerate(weights))

    def __call__(self, episodes: Episodes) -> RewardOutput:
        """``[R]`` weighted sum and each source's components."""
        total = np.zeros(episodes.rows, np.float64)
        components: dict[str, np.ndarray] = {}
        for source, weight in zip(self.sources, self.weights):
            out = run_source(source, episodes)
            total = total + weight * out.total
            components.update(_nested("", source.name, out))
        return RewardOutput(total, components)


# -------------------------------------------------------------------------------------- post-processing


def clip_rewards(rewards: Float[Any, "*R"], limit: float) -> Float[np.ndarray, "*R"]:
    """``clip(r, −limit, limit)`` in float64 (TRL's PPO ``score_clip``, applied after any scaling).

    Raises:
        ValueError: ``limit`` is not a positive finite number.
    """
    limit = _finite_number(limit, "clip_rewards limit")
    if limit <= 0:
        raise ValueError(f"clip_rewards: limit must be positive, got {limit}")
    return np.clip(np.asarray(rewards, np.float64), -limit, limit)


class RunningMoments:
    """Running mean and standard deviation of every reward seen, for PPO's reward scaling ``r / std``.

    Each batch is merged with Chan et al.'s parallel update (Welford's, a batch at a time)::

        n = n_a + n_b,   δ = x̄_b − x̄_a,   x̄ = x̄_a + δ·n_b/n,   M₂ = M₂_a + M₂_b + δ²·n_a·n_b/n

    with ``M₂`` the sum of squared deviations from the mean; ``std = sqrt(M₂ / (n − 1))``.

    Attributes:
        count: values seen.
        mean: their mean (0.0 before any).
        std: their sample standard deviation (``ddof=1``); 1.0 while fewer than 2 values are seen, so scaling
            by it leaves rewards unchanged until there is a spread to measure.

    References:
        Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", arXiv 1909.08593 (Sec. 2.2:
        rewards normalised to mean 0, std 1).

    Notes:
        TRL's ``RunningMoments`` (``use_score_scaling`` in its PPO) starts from ``mean 0, var 1, count 1e-24``,
        merges float32 batch moments the same way, keeps the unbiased variance and returns the batch's mean and
        unbiased std; the trainer divides rewards by the *running* std (plus eps) after updating with the
        batch, and with ``use_score_norm`` first subtracts the running mean. Here the state is exact: an
        integer count from 0 (no pseudo-count), float64 moments, and a ``state_dict`` that round-trips
        through JSON bit for bit so a resumed run scales exactly as an uninterrupted one. A batch of one value
        reports std 0.0 (TRL's divides by ``n − 1 = 0``).
    """

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self._m2 = 0.0

    @property
    def std(self) -> float:
        """Sample standard deviation of all values seen (``ddof=1``); 1.0 before 2 values."""
        return math.sqrt(self._m2 / (self.count - 1)) if self.count >= 2 else 1.0

    def update(self, values: Float[Any, "*B"]) -> tuple[float, float]:
        """Merge a batch (any shape, flattened); return the batch's ``(mean, std)`` (``ddof=1``).

        Raises:
            ValueError: an empty batch, or a non-finite value (its flat index named).
        """
        batch = np.asarray(values, np.float64).ravel()
        if batch.size == 0:
            raise ValueError("RunningMoments.update: empty batch")
        bad = np.flatnonzero(~np.isfinite(batch))
        if bad.size:
            raise ValueError(f"RunningMoments.update: value {bad[0]} is {batch[bad[0]]}")
        n = batch.size
        batch_mean = float(batch.mean())
        batch_m2 = float(np.square(batch - batch_mean).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * n / total
        self._m2 = self._m2 + batch_m2 + delta * delta * self.count * n / total
        self.count = total
        return batch_mean, math.sqrt(batch_m2 / (n - 1)) if n > 1 else 0.0

    def state_dict(self) -> dict[str, int | float]:
        """``{"count", "mean", "m2"}`` as JSON-able int/floats (Python floats round-trip through JSON exactly)."""
        return {"count": int(self.count), "mean": float(self.mean), "m2": float(self._m2)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: missing or extra keys, or a field of the wrong type or range (named).
        """
        if not isinstance(state, Mapping) or set(state) != {"count", "mean", "m2"}:
            keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"RunningMoments.load_state_dict: expected keys count, mean, m2; got {keys}")
        count = state["count"]
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"RunningMoments.load_state_dict: count must be a non-negative int, got {count!r}")
        mean = _finite_number(state["mean"], "RunningMoments.load_state_dict: mean")
        m2 = _finite_number(state["m2"], "RunningMoments.load_state_dict: m2")
        if m2 < 0:
            raise ValueError(f"RunningMoments.load_state_dict: m2 must be >= 0, got {m2}")
        self.count, self.mean, self._m2 = int(count), mean, m2


# ------------------------------------------------------------------------------------------------ config

_FORMS = ("model", "function", "composite", "weighted")
_FORM_KEYS = {
    "model": ("model", "dimension_weights", "batch_size", "name"),
    "function": ("function", "inputs", "name", "target_length"),
    "composite": ("composite", "name"),
    "weighted": ("weighted", "name"),
}
_COMPOSITE_KEYS = ("alpha", "external", "internal", "target_length")


class _Context(NamedTuple):
    tokenizer: Any
    embeddings: Any
    ignore_ids: tuple[int, ...]
    loader: Callable[[str], tuple[Any, dict]] | None


def _check_keys(spec: Mapping, known: Sequence[str], where: str) -> None:
    unknown = [key for key in spec if key not in known]
    if unknown:
        listed = ", ".join(repr(key) for key in unknown)
        raise ValueError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {listed} (known: {', '.join(known)})")


def _mapping(value: Any, where: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    return value


def _name(spec: Mapping, where: str, default: str) -> str:
    name = spec.get("name", default)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: expected a non-empty string, got {name!r}")
    return name


def _target_length(value: Any, where: str) -> float:
    length = _finite_number(value, where)
    if length <= 0:
        raise ValueError(f"{where}: must be positive, got {value!r}")
    return length


def _builtin(name: str, where: str, ctx: _Context, target_length: Any) -> Signal:
    """Build builtin ``name``; ``target_length`` is the spec's value (None when absent)."""
    builtin = BUILTIN_FUNCTIONS[name]
    options = {}
    if "target_length" in builtin.options:
        if target_length is None:
            raise ValueError(f"{where}.target_length: required by {name} (the length in tokens it rewards)")
        options["target_length"] = _target_length(target_length, f"{where}.target_length")
    if builtin.embeddings:
        if ctx.embeddings is None:
            raise ValueError(f"{where}: {name} needs the reference model's input embedding table: pass "
                             "build_reward(..., reference_embeddings=<[V, D] embed_tokens>, ignore_ids=...)")
        options.update(embeddings=ctx.embeddings, ignore_ids=ctx.ignore_ids)
    return builtin.make(**options)


def _import_callable(target: str, where: str) -> Callable:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{where}: {target!r} is neither a builtin ({', '.join(BUILTIN_FUNCTIONS)}) nor "
                         "'package.module:callable'")
    try:
        value = importlib.import_module(module_name)
    except Exception as error:  # a module that fails to import for any reason is the config's problem
        raise ValueError(f"{where}: cannot import module {module_name!r} of {target!r}: "
                         f"{type(error).__name__}: {error}") from error
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise ValueError(f"{where}: {target!r}: module {module_name!r} has no attribute {attribute!r}")
        value = getattr(value, part)
    if not callable(value):
        raise ValueError(f"{where}: {target!r} is a {type(value).__name__}, not a callable")
    return value


def _build_model(spec: Mapping, where: str, ctx: _Context) -> RewardSource:
    location = spec["model"]
    if not isinstance(location, (str, os.PathLike)) or not str(location):
        raise ValueError(f"{where}.model: expected a reward model directory, got {location!r}")
    if not Path(location).exists():
        raise FileNotFoundError(f"{where}.model: {location} does not exist; it should be a reward model exported "
                                "by `jaxalign train reward`")
    if ctx.loader is None:
        from jaxalign.models import load_reward_model as loader
    else:
        loader = ctx.loader
    try:
        model, info = loader(location)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{where}.model: {error}") from error
    for key in ("gain", "bias"):
        if key not in info:
            raise ValueError(f"{where}.model: {location} has no {key!r} in its reward_model.json")
    weights = spec.get("dimension_weights", info.get("dimension_weights"))
    if weights is not None:
        if isinstance(weights, (str, Mapping)) or not isinstance(weights, Sequence) or not weights:
            raise ValueError(f"{where}.dimension_weights: expected a list of numbers, got {weights!r}")
        weights = [_finite_number(w, f"{where}.dimension_weights[{i}]") for i, w in enumerate(weights)]
    batch_size = spec.get("batch_size", 16)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{where}.batch_size: expected a positive int, got {batch_size!r}")
    from jaxalign.eval.judges import RewardModelJudge

    try:
        judge = RewardModelJudge(model, tokenizer=ctx.tokenizer, gain=info["gain"], bias=info["bias"],
                                 batch_size=batch_size, dimension_weights=weights)
    except ValueError as error:
        raise ValueError(f"{where}: {location}: {error}") from error
    if judge.num_objectives is not None and judge.dimension_weights is None:
        raise ValueError(f"{where}: the reward model at {location} scores {judge.num_objectives} objectives and a "
                         f"reward is one number per response: set {where}.dimension_weights to "
                         f"{judge.num_objectives} weights combining them")
    return JudgeReward(judge, name=_name(spec, where, "reward_model"))


def _build_function(spec: Mapping, where: str, ctx: _Context) -> RewardSource:
    target = spec["function"]
    if not isinstance(target, str) or not target:
        raise ValueError(f"{where}.function: expected a builtin name or 'package.module:callable', got {target!r}")
    if target in BUILTIN_FUNCTIONS:
        if "inputs" in spec:
            raise ValueError(f"{where}.inputs: only for 'package.module:callable' functions; the builtin "
                             f"{target!r} reads the episodes itself")
        if "target_length" in spec and "target_length" not in BUILTIN_FUNCTIONS[target].options:
            raise ValueError(f"{where}.target_length: {target} takes no target_length (only length_penalty does)")
        fn = _builtin(target, where, ctx, spec.get("target_length"))
        return FunctionReward(fn, _name(spec, where, target), inputs="episodes")
    if ":" not in target:
        raise ValueError(f"{where}.function: unknown builtin {target!r} (builtins: {', '.join(BUILTIN_FUNCTIONS)}; "
                         "or give 'package.module:callable')")
    if "target_length" in spec:
        raise ValueError(f"{where}.target_length: only for the length_penalty builtin")
    inputs = spec.get("inputs", "text")
    if inputs not in ("text", "episodes"):
        raise ValueError(f"{where}.inputs: expected 'text' or 'episodes', got {inputs!r}")
    fn = _import_callable(target, f"{where}.function")
    return FunctionReward(fn, _name(spec, where, target.rpartition(":")[2].rpartition(".")[2]), inputs=inputs)


def _build_composite(spec: Mapping, where: str, ctx: _Context) -> RewardSource:
    inner = f"{where}.composite"
    body = _mapping(spec["composite"], inner)
    _check_keys(body, _COMPOSITE_KEYS, inner)
    for key in ("alpha", "external", "internal"):
        if key not in body:
            raise ValueError(f"{inner}.{key}: required")
    alpha = _finite_number(body["alpha"], f"{inner}.alpha")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{inner}.alpha: must be in [0, 1], got {body['alpha']!r}")
    external = _build(body["external"], f"{inner}.external", ctx)
    internal = _mapping(body["internal"], f"{inner}.internal")
    if not internal:
        raise ValueError(f"{inner}.internal: empty; give signal weights ({', '.join(INTERNAL_SIGNALS)})")
    weights = {}
    for key, weight in internal.items():
        if key not in INTERNAL_SIGNALS:
            raise ValueError(f"{inner}.internal: unknown signal {key!r} (known: {', '.join(INTERNAL_SIGNALS)})")
        weights[key] = _finite_number(weight, f"{inner}.internal.{key}")
    if "target_length" in body and "length_penalty" not in weights:
        raise ValueError(f"{inner}.target_length: set, but length_penalty is not among the internal signals")
    signals = {key: _builtin(key, inner, ctx, body.get("target_length")) for key in weights}
    return CompositeReward(external, weights, alpha=alpha, signals=signals, name=_name(spec, where, "composite"))


def _build_weighted(spec: Mapping, where: str, ctx: _Context) -> RewardSource:
    entries = spec["weighted"]
    if isinstance(entries, (str, Mapping)) or not isinstance(entries, Sequence) or not entries:
        raise ValueError(f"{where}.weighted: expected a non-empty list of reward specs (each with a weight)")
    sources, weights, seen = [], [], {}
    for index, entry in enumerate(entries):
        at = f"{where}.weighted[{index}]"
        entry = _mapping(entry, at)
        weights.append(_finite_number(entry.get("weight", 1.0), f"{at}.weight"))
        source = _build(entry, at, ctx, extra_keys=("weight",))
        if source.name in seen:
            raise ValueError(f"{where}.weighted: entries {seen[source.name]} and {index} are both named "
                             f"{source.name!r}; give one a distinct `name:`")
        seen[source.name] = index
        sources.append(source)
    return WeightedRewards(sources, weights, name=_name(spec, where, "weighted"))


_BUILDERS = {"model": _build_model, "function": _build_function, "composite": _build_composite,
             "weighted": _build_weighted}


def _build(spec: Any, where: str, ctx: _Context, extra_keys: tuple[str, ...] = ()) -> RewardSource:
    spec = _mapping(spec, where)
    forms = [form for form in _FORMS if form in spec]
    if len(forms) != 1:
        hint = " (pass the mapping under `reward:`, not the whole config)" if "reward" in spec else ""
        raise ValueError(f"{where}: give exactly one of {', '.join(_FORMS)}; got keys {sorted(map(str, spec))}{hint}")
    _check_keys(spec, _FORM_KEYS[forms[0]] + extra_keys, where)
    return _BUILDERS[forms[0]](spec, where, ctx)


def build_reward(spec: Mapping[str, Any], *, tokenizer, reference_embeddings: Float[Any, "V D"] | None = None,
                 ignore_ids: Iterable[int] = (), reward_model_loader: Callable[[str], tuple[Any, dict]] | None = None,
                 ) -> RewardSource:
    """The reward source a config's ``reward:`` mapping describes.

    Forms (exactly one key of ``model``, ``function``, ``composite``, ``weighted``)::

        {model: runs/sentiment/reward/export}               # + dimension_weights: [..], batch_size, name
        {function: vader}                                   # builtin: vader, length, coherence,
                                                            #   length_penalty (+ target_length), fluency, faithfulness
        {function: "my_pkg.rewards:score", inputs: text, name: mine}    # inputs: text | episodes
        {composite: {alpha: 0.2, external: {model: ...}, target_length: 32,
                     internal: {coherence: 1.0, length_penalty: 0.5, fluency: 0.5, faithfulness: 0.2}}}
        {weighted: [{function: vader, weight: 1.0}, {function: length_penalty, weight: 0.1, target_length: 24}]}

    Args:
        spec: the mapping under ``reward:`` (error messages name paths from ``reward``).
        tokenizer: the policy's tokenizer, given to the reward model judge (its text scoring and end-of-turn
            ids; token-level scoring requires the reward model to share the policy's vocabulary).
        reference_embeddings: ``[V, D]`` the reference model's input embeddings (for ``faithfulness``).
        ignore_ids: token ids ``faithfulness`` leaves out (pad, template and stop tokens).
        reward_model_loader: ``path -> (RewardModel, info)`` with ``info["gain"]``, ``info["bias"]``; default
            :func:`jaxalign.models.load_reward_model`. The model is wrapped in
            ``RewardModelJudge(model, tokenizer=tokenizer, gain=info["gain"], bias=info["bias"])``.

    Returns:
        A :class:`RewardSource`.

    Raises:
        ValueError: unknown keys or signals (the known ones listed), bad values, a ``module:callable`` that does
            not import; the message names the config path (e.g. ``reward.composite.internal``).
        FileNotFoundError: ``reward.model`` does not exist or is not a reward model directory.
    """
    ctx = _Context(tokenizer, reference_embeddings, tuple(int(i) for i in ignore_ids), reward_model_loader)
    return _build(spec, "reward", ctx)
