"""Judges: whatever turns ``(prompt, response)`` texts into one score per response.

- :class:`VaderJudge`: the default *gold* judge, VADER's compound sentiment of the response (a lexicon-based
  scorer nobody here trained), standing in for human raters as in the sentiment experiments of Ziegler et al.
  2019 (arXiv 1909.08593, Sec. 4.1).
- :class:`ConcisenessJudge`: a fixed rule, ``1 / (1 + words / scale)``: shorter responses score higher (the second
  gold dimension of ``experiments.llmdoctor``, which pulls against VADER's, since positive words add up).
- :class:`RewardModelJudge`: a learned :class:`~jaxalign.models.RewardModel`, on token arrays
  (:meth:`~RewardModelJudge.score_tokens`, :meth:`~RewardModelJudge.score_rollout`) or on texts rendered
  with its tokenizer's chat template (:meth:`~RewardModelJudge.score`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from flax import nnx
from jaxtyping import Float, Int

from jaxalign.data import Message, load_tokenizer
from jaxalign.eval.forward import padded_batches, rewards, split_model
from jaxalign.models import load_reward_model
from jaxalign.rollout import Rollout

#: A prompt: plain text (a single user turn) or a conversation that ends where the reply begins.
Prompt = str | Sequence[Message]
# Marks the response's place in a rendered template, to find the text the template puts after it.
_CONTENT_MARKER = "\x00response\x00"

__all__ = ["ConcisenessJudge", "Judge", "Prompt", "RewardModelJudge", "VaderJudge", "end_of_turn_ids",
           "load_reward_judge", "parse_dimension_weights"]


@runtime_checkable
class Judge(Protocol):
    """Scores responses to prompts: ``score(prompts, responses) -> [N]`` float (higher is better).

    An optional ``name`` attribute labels the judge in reports (default: its class name).
    """

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> np.ndarray:
        """One score per ``(prompts[i], responses[i])``."""
        ...


def _check_lengths(prompts: Sequence, responses: Sequence) -> None:
    if isinstance(responses, str):
        raise TypeError("responses must be a sequence of strings, got one string")
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts and {len(responses)} responses; a judge scores pairs, "
                         "one response per prompt")


class VaderJudge:
    """VADER's compound sentiment of each response, in ``[-1, 1]`` (prompts are ignored).

    The compound score is VADER's normalised sum of lexicon valences, adjusted for negation, intensifiers,
    "but" and punctuation (Hutto & Gilbert 2014); an empty response scores 0.

    Raises:
        ImportError: the ``vaderSentiment`` package is missing (``pip install vadersentiment``).
    """

    name = "vader"

    def __init__(self):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as error:
            raise ImportError("VaderJudge needs the vaderSentiment package: pip install vadersentiment "
                              "(or pip install 'jaxalign[demo]')") from error
        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> Float[np.ndarray, " N"]:
        """``[N]`` float64 compound sentiments of ``responses``."""
        _check_lengths(prompts, responses)
        return np.asarray([self._analyzer.polarity_scores(text)["compound"] for text in responses], np.float64)


class ConcisenessJudge:
    """Conciseness by a fixed rule: ``1 / (1 + words / scale)``, in ``(0, 1]`` (prompts are ignored).

    ``words`` is the number of whitespace-separated words of the response; an empty response scores 1,
    ``scale`` words score 0.5. The score is a strictly decreasing function of the length alone, so it ranks
    responses exactly as "the shorter is better" does, and stays bounded (a mean over responses is not dominated
    by one rambling answer).

    Args:
        scale: the length in words that scores 0.5 (> 0).
    """

    name = "conciseness"

    def __init__(self, scale: float = 10.0):
        if not scale > 0:
            raise ValueError(f"ConcisenessJudge: scale must be > 0, got {scale}")
        self.scale = float(scale)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> Float[np.ndarray, " N"]:
        """``[N]`` float64 conciseness scores of ``responses``."""
        _check_lengths(prompts, responses)
        words = np.asarray([len(text.split()) for text in responses], np.float64)
        return 1.0 / (1.0 + words / self.scale)


def _messages(prompt: Prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [m.as_dict() if isinstance(m, Message) else dict(m) for m in prompt]


def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
    """The ids the chat template writes after an assistant turn's EOS token (ChatML: the ``"\\n"`` after
    ``<|im_end|>``); ``()`` without a template, or when the turn does not end with the EOS token.

    ``jaxalign.data`` renders training pairs with the whole template, so a reward model trained on them reads
    its reward at the last of these ids; a sampled response stops at the EOS and lacks them.
    """
    template, eos = getattr(tokenizer, "chat_template", None), getattr(tokenizer, "eos_token", None)
    if template is None or not eos:
        return ()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "?"}, {"role": "assistant", "content": _CONTENT_MARKER}], tokenize=False)
    after = text.rsplit(_CONTENT_MARKER, 1)[-1]
    if not after.startswith(eos) or len(after) == len(eos):
        return ()
    return tuple(tokenizer(after[len(eos):], add_special_tokens=False)["input_ids"])


class RewardModelJudge:
    """A learned reward model as a judge: ``reward = gain·r_θ(x, y) + bias``, or for a D-objective head
    combined as ``Σ_d w_d·(gain_d·r_d + bias_d)``.

    Args:
        reward_model: a :class:`jaxalign.models.RewardModel` (scalar head ``[R]`` or D objectives ``[R, D]``).
        tokenizer: the reward model's tokenizer; needed for text scoring (:meth:`score`) and for the
            end-of-turn ids :meth:`score_rollout` appends.
        gain, bias: the affine normalisation saved with the reward model (e.g. so rewards have mean 0 and
            standard deviation 1 on reference samples, as Ziegler et al. 2019 normalise theirs); a scalar, or
            one value per objective of a D-objective head.
        batch_size: rows per compiled forward pass; the last batch is padded to it so nothing recompiles.
        dimension_weights: ``[D]`` weights combining a D-objective head's normalised objectives into one
            reward (``Σ_d w_d·(gain_d·r_d + bias_d)``); None keeps ``[R, D]``.
        end_of_turn: ids appended after a rollout row that stopped (see :func:`end_of_turn_ids`, the
            default when a tokenizer is given; ``()`` appends nothing).
    """

    name = "reward_model"

    def __init__(self, reward_model: nnx.Module, *, tokenizer=None, gain: float | Sequence[float] = 1.0,
                 bias: float | Sequence[float] = 0.0, batch_size: int = 16,
                 dimension_weights: Sequence[float] | None = None, end_of_turn: Sequence[int] | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"RewardModelJudge: batch_size must be a positive int, got {batch_size!r}")
        head = getattr(reward_model, "reward_head", None)
        if head is None:
            raise TypeError(f"RewardModelJudge needs a jaxalign.models.RewardModel, got {type(reward_model).__name__}")
        self.num_objectives = head.num_objectives
        self.dimension_weights = None if dimension_weights is None else np.asarray(dimension_weights, np.float64)
        if self.dimension_weights is not None and (
                self.num_objectives is None or self.dimension_weights.shape != (self.num_objectives,)):
            raise ValueError(f"RewardModelJudge: dimension_weights has shape {self.dimension_weights.shape}, but the "
                             f"reward head has {self.num_objectives or 'a single'} objective(s)"
                             + (f"; expected ({self.num_objectives},)" if self.num_objectives else ""))
        self.gain, self.bias = np.asarray(gain, np.float64), np.asarray(bias, np.float64)
        width = () if self.num_objectives is None else (self.num_objectives,)
        for name, value in (("gain", self.gain), ("bias", self.bias)):
            if value.shape not in ((), width):
                raise ValueError(f"RewardModelJudge: {name} has shape {value.shape}; expected a scalar"
                                 + (f" or {width}" if width else ""))
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.end_of_turn = tuple(end_of_turn) if end_of_turn is not None else (
            end_of_turn_ids(tokenizer) if tokenizer is not None else ())
        self._vocab_size = reward_model.backbone.config.vocab_size
        self._max_length = reward_model.backbone.config.max_position_embeddings
        self._model = split_model(reward_model)

    def score_tokens(self, tokens: Int[np.ndarray, "R L"], attention_mask: Int[np.ndarray, "R L"],
                     positions: Int[np.ndarray, "R L"] | None = None) -> Float[np.ndarray, " R *D"]:
        """Rewards of token sequences (left, right or both-sided padding: read at each row's last real token,
        or averaged over its real tokens, as the head pools).

        Args:
            tokens: ``[R, L]`` token ids.
            attention_mask: ``[R, L]`` 1 on real tokens.
            positions: ``[R, L]`` RoPE positions; None derives them from the mask (``cumsum − 1``).

        Returns:
            ``[R]`` float64 rewards, or ``[R, D]`` for a D-objective head without ``dimension_weights``.
        """
        tokens, attention_mask = np.asarray(tokens), np.asarray(attention_mask)
        if tokens.ndim != 2 or attention_mask.shape != tokens.shape:
            raise ValueError(f"score_tokens: tokens {tokens.shape} and attention_mask {attention_mask.shape} must "
                             "both be [rows, length]")
        if positions is not None and np.shape(positions) != tokens.shape:
            raise ValueError(f"score_tokens: positions {np.shape(positions)} do not match tokens {tokens.shape}")
        outputs = []
        arrays = {"input_ids": tokens.astype(np.int32), "attention_mask": attention_mask.astype(np.int32),
                  "positions": None if positions is None else np.asarray(positions, np.int32)}
        for rows, batch in padded_batches(arrays, self.batch_size):
            out = rewards(self._model.graphdef, self._model.state, batch["input_ids"], batch["attention_mask"],
                          batch["positions"])
            outputs.append(np.asarray(out, np.float64)[:rows])
        empty = (0,) if self.num_objectives is None else (0, self.num_objectives)
        raw = np.concatenate(outputs) if outputs else np.zeros(empty)
        normalised = self.gain * raw + self.bias
        return normalised if self.dimension_weights is None else normalised @ self.dimension_weights

    def score_rollout(self, rollout: Rollout) -> Float[np.ndarray, " R *D"]:
        """Rewards of a rollout's prompt + response rows (:meth:`Rollout.sequences`).

        A row that stopped gets ``end_of_turn`` appended, so the reward is read where it was read in
        training (on ``jaxalign.data``'s rendering of a pair); a row cut at ``max_new_tokens`` is read at
        its last token, as TRL's PPO reads every row. The rollout's ids must be the reward model's
        vocabulary (the same tokenizer as the policy's); otherwise score the decoded texts with :meth:`score`.

        Raises:
            ValueError: token ids beyond the reward model's vocabulary.
        """
        tokens, mask = (np.asarray(a) for a in rollout.sequences())
        vocab = self._vocab_size
        if mask.any() and int(tokens[mask.astype(bool)].max()) >= vocab:
            raise ValueError(f"the rollout holds token ids >= {vocab}, the reward model's vocabulary: it was sampled "
                             "with another tokenizer; score its decoded texts with RewardModelJudge.score instead")
        if self.end_of_turn:
            rows, length = tokens.shape
            suffix = np.asarray(self.end_of_turn, tokens.dtype)
            tokens = np.concatenate([tokens, np.zeros((rows, len(suffix)), tokens.dtype)], axis=1)
            mask = np.concatenate([mask, np.zeros((rows, len(suffix)), mask.dtype)], axis=1)
            stopped = np.flatnonzero(np.asarray(rollout.stopped))
            # Response tokens are right-padded after each row's length: the suffix goes right after them.
            start = rollout.prompt_tokens.shape[1] + np.asarray(rollout.lengths)[stopped, None]
            columns = start + np.arange(len(suffix))
            tokens[stopped[:, None], columns] = suffix
            mask[stopped[:, None], columns] = 1
        return self.score_tokens(tokens, mask)

    def encode(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[list[int]]:
        """Token ids of each ``prompt + response`` as ``jaxalign.data`` renders a pair's side.

        With a chat template: the conversation (a text prompt is one user message) plus the response as the
        assistant's message, rendered whole (its end of turn included) and encoded without added special
        tokens. Without one: ``prompt + response`` with the tokenizer's special tokens, then its EOS.
        """
        _check_lengths(prompts, responses)
        if self.tokenizer is None:
            raise ValueError("RewardModelJudge.score needs the reward model's tokenizer: pass tokenizer=... "
                             "(or score token arrays with score_tokens / score_rollout)")
        tokenizer = self.tokenizer
        if getattr(tokenizer, "chat_template", None) is not None:
            texts = [tokenizer.apply_chat_template(_messages(p) + [{"role": "assistant", "content": r}],
                                                   tokenize=False) for p, r in zip(prompts, responses)]
            return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("chat-message prompts need a tokenizer with a chat template")
        ids = tokenizer([p + r for p, r in zip(prompts, responses)])["input_ids"] if prompts else []
        eos = tokenizer.eos_token_id
        return [row if eos is None or row[-1:] == [eos] else row + [eos] for row in ids]

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> Float[np.ndarray, " N *D"]:
        """Rewards of response texts (see :meth:`encode` for the rendering).

        Raises:
            ValueError: a prompt + response that renders to more tokens than the reward model has positions (its
                reward would be read past what it was trained on).
        """
        ids = self.encode(prompts, responses)
        for index, row in enumerate(ids):
            if len(row) > self._max_length:
                raise ValueError(f"response {index} renders to {len(row)} tokens with its prompt, more than the "
                                 f"reward model's {self._max_length} positions")
        length = max((len(row) for row in ids), default=1)
        # Lengths round up to a multiple of 32, so texts of similar length share a compiled program.
        length = -(-length // 32) * 32
        tokens = np.zeros((len(ids), length), np.int32)
        mask = np.zeros((len(ids), length), np.int32)
        for row, sequence in enumerate(ids):
            tokens[row, :len(sequence)] = sequence
            mask[row, :len(sequence)] = 1
        return self.score_tokens(tokens, mask)


def parse_dimension_weights(text: str, option: str = "--dimension-weights") -> list[float]:
    """A command line's ``1,0.5``: finite numbers, comma-separated (``option`` names it in errors)."""
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated numbers such as 1,0.5; got {text!r}") from None
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"{option}: weights must be finite numbers, got {text!r}")
    return weights


def load_reward_judge(directory, *, dimension_weights: Sequence[float] | None = None, batch_size: int = 16,
                      option: str = "--reward-model", weights_option: str = "--dimension-weights"):
    """``(RewardModelJudge, reward model, tokenizer)`` of a saved reward model directory
    (:func:`jaxalign.models.save_reward_model`), normalised with its saved gain and bias.

    A multi-objective head combines its objectives with ``dimension_weights``, else with the weights it was saved
    with. ``option`` and ``weights_option`` name the command-line options in error messages.

    Raises:
        ValueError: a multi-objective head with no weights given or saved, or weights that do not fit the head.
    """
    reward_model, info = load_reward_model(directory)
    tokenizer = load_tokenizer(directory)
    weights = dimension_weights if dimension_weights is not None else info.get("dimension_weights")
    if reward_model.reward_head.num_objectives is not None and weights is None:
        raise ValueError(f"{option} {directory} scores {reward_model.reward_head.num_objectives} "
                         f"objectives {info.get('metadata', {}).get('dimensions', '')} and saved no default weights: "
                         f"give {weights_option} W1,W2,... to combine them into one reward")
    try:
        judge = RewardModelJudge(reward_model, tokenizer=tokenizer, gain=info.get("gain", 1.0),
                                 bias=info.get("bias", 0.0), dimension_weights=weights, batch_size=batch_size)
    except ValueError as error:
        raise ValueError(f"{option} {directory}: {error}"
                         + (f" ({weights_option})" if dimension_weights is not None else "")) from None
    return judge, reward_model, tokenizer
