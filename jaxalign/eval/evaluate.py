"""Policy versus reference: sample both on the same prompts with the same keys, judge both, compare.

:func:`evaluate_policy` returns a :class:`PolicyEval` with the mean gold reward (and learned reward) of each
model, the paired win rate of the policy over the reference with its confidence interval, the KL of the
policy to the reference on the policy's own samples, and response lengths; as a dict, a text table, a plot,
and every decoded sample.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jaxalign import data
from jaxalign.eval.judges import Judge, Prompt, RewardModelJudge, VaderJudge
from jaxalign.eval.metrics import reference_logps, sequence_kl
from jaxalign.eval.stats import MeanCI, WinRate, mean_ci, proportion_ci, win_rate
from jaxalign.rollout import Rollout, Sampler, SamplingParams

__all__ = ["PolicyEval", "evaluate_policy", "generate"]

# Sampling defaults of `jaxalign eval` (short continuations, as in the sentiment experiments).
DEFAULT_PARAMS = SamplingParams(max_new_tokens=48, temperature=0.7)


@dataclasses.dataclass(frozen=True)
class PolicyEval:
    """Scores of ``R = prompts × samples_per_prompt`` paired responses (row ``i`` of the policy with row ``i``
    of the reference: same prompt, same random key).

    Attributes:
        judge: the gold judge's name; ``learned_judge`` the reward judge's (None without one).
        prompts, samples_per_prompt: the layout of the rows (prompt ``b``'s samples are rows ``b·n .. b·n+n−1``).
        gold_policy, gold_reference: ``[R]`` gold scores.
        learned_policy, learned_reference: ``[R]`` learned rewards (None without a reward judge).
        kl: ``[R]`` k1 estimate of ``KL(π ‖ π_ref)`` per policy response (nats); ``kl_k3`` the k3 estimate.
        length_policy, length_reference: ``[R]`` response tokens; ``stopped_*`` whether each row ended on a
            stop token (else it ran out of ``max_new_tokens``).
        win_rate: the policy's paired win rate under the gold judge; ``learned_win_rate`` under the reward judge
            (their intervals, and every mean's, count prompts, not samples, as the independent units).
        records: one dict per row (prompt, both responses, their scores, the KL).
        confidence: level of every interval.
        num_samples: how many records :attr:`samples` shows.
    """

    judge: str
    learned_judge: str | None
    prompts: int
    samples_per_prompt: int
    gold_policy: Float[np.ndarray, " R"]
    gold_reference: Float[np.ndarray, " R"]
    learned_policy: Float[np.ndarray, " R"] | None
    learned_reference: Float[np.ndarray, " R"] | None
    kl: Float[np.ndarray, " R"]
    kl_k3: Float[np.ndarray, " R"]
    length_policy: Int[np.ndarray, " R"]
    length_reference: Int[np.ndarray, " R"]
    stopped_policy: Bool[np.ndarray, " R"]
    stopped_reference: Bool[np.ndarray, " R"]
    win_rate: WinRate
    learned_win_rate: WinRate | None
    records: tuple[dict, ...]
    confidence: float = 0.95
    num_samples: int = 5

    @property
    def samples(self) -> tuple[dict, ...]:
        """A few decoded examples (the first rows)."""
        return self.records[:self.num_samples]

    def _mean(self, values) -> MeanCI:
        return mean_ci(np.asarray(values, np.float64), self.confidence, clusters=self.prompt_of_row)

    @property
    def prompt_of_row(self) -> np.ndarray:
        """``[R]`` each row's prompt: a prompt's samples are correlated, so intervals count prompts as the units."""
        return np.arange(self.prompts * self.samples_per_prompt) // self.samples_per_prompt

    def summary(self) -> dict[str, tuple[MeanCI, MeanCI | None]]:
        """``metric -> (policy, reference)`` means with their intervals (the reference has no KL)."""
        out = {"gold_reward": (self._mean(self.gold_policy), self._mean(self.gold_reference))}
        if self.learned_policy is not None:
            out["learned_reward"] = (self._mean(self.learned_policy), self._mean(self.learned_reference))
        out |= {"kl": (self._mean(self.kl), None), "kl_k3": (self._mean(self.kl_k3), None),
                "response_length": (self._mean(self.length_policy), self._mean(self.length_reference)),
                # A fraction: its interval is Wilson's, inside [0, 1] (a t interval is not near 0 or 1).
                "stopped": (proportion_ci(self.stopped_policy, self.confidence, clusters=self.prompt_of_row),
                            proportion_ci(self.stopped_reference, self.confidence, clusters=self.prompt_of_row))}
        return out

    def _label(self, metric: str) -> str:
        return {"gold_reward": f"gold reward ({self.judge})",
                "learned_reward": f"learned reward ({self.learned_judge})",
                "kl": "KL(policy || reference), k1", "kl_k3": "KL(policy || reference), k3",
                "response_length": "response length (tokens)", "stopped": "stopped (fraction)"}[metric]

    def to_dict(self) -> dict:
        """Plain values for ``eval.json``: every mean with its interval, the win rates, the counts."""
        summary = self.summary()
        means = {metric: {"policy": ours.to_dict(), "reference": None if theirs is None else theirs.to_dict()}
                 for metric, (ours, theirs) in summary.items()}
        return {
            "prompts": self.prompts,
            "samples_per_prompt": self.samples_per_prompt,
            "responses": int(self.gold_policy.size),
            "confidence": self.confidence,
            "judge": self.judge,
            "gold_reward": means["gold_reward"],
            "win_rate": self.win_rate.to_dict(),
            "learned_judge": self.learned_judge,
            "learned_reward": means.get("learned_reward"),
            "learned_win_rate": None if self.learned_win_rate is None else self.learned_win_rate.to_dict(),
            "kl": means["kl"]["policy"],
            "kl_k3": means["kl_k3"]["policy"],
            "response_length": means["response_length"],
            "stopped": means["stopped"],
        }

    def table(self) -> str:
        """An aligned text table: metric, policy, reference (means with their intervals), then the win rates."""
        level = f"{self.confidence:.0%} CI"
        rows = [("metric", f"policy (mean [{level}])", "reference")]
        rows += [(self._label(metric), str(ours), "-" if theirs is None else str(theirs))
                 for metric, (ours, theirs) in self.summary().items()]
        rows.append((f"win rate vs reference ({self.judge})", str(self.win_rate), ""))
        if self.learned_win_rate is not None:
            rows.append((f"win rate vs reference ({self.learned_judge})", str(self.learned_win_rate), ""))
        widths = [max(len(row[c]) for row in rows) for c in range(3)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Write a PNG: gold-score histograms of both models, the win rates with their intervals, and the
        per-response KL. Returns the path."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(13, 3.8), layout="constrained")
        FigureCanvasAgg(figure)  # the Agg canvas: no display, no global pyplot backend switch
        scores, rates, kl = figure.subplots(1, 3)
        bins = np.histogram_bin_edges(np.concatenate([self.gold_policy, self.gold_reference]), bins=20)
        scores.hist(self.gold_reference, bins=bins, alpha=0.6, label="reference")
        scores.hist(self.gold_policy, bins=bins, alpha=0.6, label="policy")
        scores.set(title=f"gold reward ({self.judge})", xlabel="score", ylabel="responses")
        scores.legend()
        judged = [(self.judge, self.win_rate)]
        if self.learned_win_rate is not None:
            judged.append((self.learned_judge, self.learned_win_rate))
        names = [name for name, _ in judged]
        values = np.asarray([w.rate for _, w in judged])
        errors = np.asarray([[w.rate - w.low for _, w in judged], [w.high - w.rate for _, w in judged]])
        rates.bar(names, values, yerr=errors, capsize=8, width=0.5, color=["tab:green", "tab:purple"][:len(judged)])
        rates.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        rates.set(title=f"win rate vs reference ({self.confidence:.0%} CI)", ylim=(0, 1))
        kl.hist(self.kl, bins=20, color="tab:red")
        kl.set(title=f"KL(policy || reference), mean {np.mean(self.kl):.3g}", xlabel="nats per response",
               ylabel="responses")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        return path


def _prompt_records(prompts: Sequence[Prompt | data.PromptRecord], raw: bool
                   ) -> tuple[list[data.PromptRecord], list[data.PromptRecord]]:
    """``(as given, as encoded)``: the prompts as records (conversations as ``Message`` tuples), and the
    records to encode (text prompts as one user message unless ``raw``)."""
    given = [prompt if isinstance(prompt, data.PromptRecord)
             else data.PromptRecord(prompt, origin=data.Location("prompts", index + 1))
             for index, prompt in enumerate(prompts)]
    encoded = []
    for index, record in enumerate(given):
        if isinstance(record.prompt, str):
            content = record.prompt if raw else (data.Message("user", record.prompt),)
        elif raw:
            raise ValueError(f"prompt {index} is a conversation: raw=True encodes text prompts only")
        else:
            content = record.prompt
        encoded.append(data.PromptRecord(content, origin=record.origin))
    return given, encoded


def _as_json(prompt: Prompt):
    return prompt if isinstance(prompt, str) else [message.as_dict() for message in prompt]


def _stop_params(params: SamplingParams, model, tokenizer, n: int) -> SamplingParams:
    """``params`` with ``n`` samples and, unless stop ids are given, the model's and the tokenizer's EOS."""
    if params.n not in (1, n):
        raise ValueError(f"params.n is {params.n} but samples_per_prompt is {n}: set one of them")
    stop = params.stop_token_ids
    if stop is None:
        stop = tuple(model.config.eos_token_ids)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop:
            stop += (tokenizer.eos_token_id,)
    return dataclasses.replace(params, n=n, stop_token_ids=stop)


def _decode(tokenizer, rollout: Rollout) -> list[str]:
    tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.response_mask)
    return [tokenizer.decode(tokens[row][mask[row]], skip_special_tokens=True) for row in range(tokens.shape[0])]


def _learned(reward_judge, prompts, texts, rollout) -> np.ndarray:
    """Learned rewards: on the rollout's tokens when the judge is a reward model without a tokenizer (it must
    share the policy's), else on the texts."""
    if isinstance(reward_judge, RewardModelJudge) and reward_judge.tokenizer is None:
        scores = reward_judge.score_rollout(rollout)
    else:
        scores = reward_judge.score(prompts, texts)
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1:
        raise ValueError(f"the reward judge returns scores of shape {scores.shape}; a win rate needs one score per "
                         "response (give RewardModelJudge dimension_weights to combine the objectives)")
    return scores


def evaluate_policy(
    policy: nnx.Module,
    reference: nnx.Module,
    tokenizer,
    prompts: Sequence[Prompt | data.PromptRecord],
    *,
    judge: Judge | None = None,
    reward_judge: Judge | None = None,
    params: SamplingParams = DEFAULT_PARAMS,
    samples_per_prompt: int = 1,
    key: Array,
    batch_size: int = 16,
    progress: bool = True,
    raw: bool = False,
    confidence: float = 0.95,
    num_samples: int = 5,
) -> PolicyEval:
    """Sample the policy and the reference on ``prompts`` with the same keys, judge both, compare.

    Per batch of ``batch_size`` prompts: the prompts are encoded with the chat template and its generation
    prompt (``raw``: as plain text), both models sample ``samples_per_prompt`` responses with the batch's key
    (``fold_in(key, batch index)``; sample ``j`` of prompt ``b`` draws from the same uniforms in both), the
    responses are decoded (``skip_special_tokens``), scored by ``judge`` and ``reward_judge``, and the
    reference scores the policy's tokens for the KL.

    Args:
        policy, reference: causal LMs sharing ``tokenizer``'s vocabulary. The same object is sampled once.
        tokenizer: the policy's tokenizer (with a chat template unless ``raw``).
        prompts: text prompts (a user message each), conversations (messages ending where the reply
            begins), or ``jaxalign.data.PromptRecord`` objects.
        judge: the gold judge (default :class:`VaderJudge`).
        reward_judge: a learned judge; a :class:`RewardModelJudge` without a tokenizer scores the sampled
            tokens directly (it must share the policy's vocabulary), any other judge scores the texts.
        params: sampling parameters (``n`` is set from ``samples_per_prompt``; stop ids default to the
            model's and the tokenizer's EOS).
        samples_per_prompt: responses per prompt from each model.
        key: a ``jax.random`` key.
        batch_size: prompts per compiled batch (the last batch is padded with empty rows, so every batch
            compiles once).
        progress: show a progress bar (prompts, with rate and ETA) on stderr.
        raw: encode text prompts as plain text, without the chat template.
        confidence: level of the intervals.
        num_samples: examples :attr:`PolicyEval.samples` shows.

    Returns:
        A :class:`PolicyEval`.

    Raises:
        ValueError: no prompts, a bad setting, models with different vocabularies, or a prompt the tokenizer
            cannot encode (named).
    """
    from tqdm.auto import tqdm

    if not prompts:
        raise ValueError("evaluate_policy: no prompts")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate_policy: batch_size must be a positive int, got {batch_size!r}")
    if policy.config.vocab_size != reference.config.vocab_size:
        raise ValueError(f"the policy has a vocabulary of {policy.config.vocab_size} tokens and the reference "
                         f"{reference.config.vocab_size}: the KL and the paired samples need one tokenizer")
    judge = VaderJudge() if judge is None else judge
    n = samples_per_prompt
    params = _stop_params(params, policy, tokenizer, n)
    given, encoded = _prompt_records(prompts, raw)
    dataset = data.tokenize(encoded, tokenizer, progress=False, source="prompts")
    # One prompt length for every batch: one compiled sampling loop for the whole evaluation.
    length = int(max(len(example.sequences[0]) for example in dataset.examples))
    policy_sampler = Sampler(policy, pad_token_id=tokenizer.pad_token_id)
    reference_sampler = None if reference is policy else Sampler(reference, pad_token_id=tokenizer.pad_token_id)

    columns = {name: [] for name in ("gold_policy", "gold_reference", "learned_policy", "learned_reference", "kl",
                                     "kl_k3", "length_policy", "length_reference", "stopped_policy",
                                     "stopped_reference")}
    records = []
    with tqdm(total=len(prompts), unit="prompt", desc="evaluating", disable=not progress, file=sys.stderr) as bar:
        for index, start in enumerate(range(0, len(prompts), batch_size)):
            rows = list(range(start, min(start + batch_size, len(prompts))))
            batch = data.collate(dataset, rows + [None] * (batch_size - len(rows)), length)
            batch_key = jax.random.fold_in(key, index)
            ours = policy_sampler.generate(batch["input_ids"], batch["attention_mask"], key=batch_key,
                                           params=params).take_rows(len(rows) * n)
            theirs = ours if reference_sampler is None else reference_sampler.generate(
                batch["input_ids"], batch["attention_mask"], key=batch_key, params=params).take_rows(len(rows) * n)
            ref_logps = reference_logps(reference, ours, batch_size=batch_size * n)
            kl = np.asarray(sequence_kl(ours.model_logps, ref_logps, ours.response_mask), np.float64)
            kl_k3 = np.asarray(sequence_kl(ours.model_logps, ref_logps, ours.response_mask, estimator="k3"),
                               np.float64)
            row_prompts = [given[rows[r // n]].prompt for r in range(len(rows) * n)]
            our_texts, their_texts = _decode(tokenizer, ours), _decode(tokenizer, theirs)
            gold = (np.asarray(judge.score(row_prompts, our_texts), np.float64),
                    np.asarray(judge.score(row_prompts, their_texts), np.float64))
            learned = (None, None) if reward_judge is None else (
                _learned(reward_judge, row_prompts, our_texts, ours),
                _learned(reward_judge, row_prompts, their_texts, theirs))
            values = {"gold_policy": gold[0], "gold_reference": gold[1], "learned_policy": learned[0],
                      "learned_reference": learned[1], "kl": kl, "kl_k3": kl_k3,
                      "length_policy": np.asarray(ours.lengths), "length_reference": np.asarray(theirs.lengths),
                      "stopped_policy": np.asarray(ours.stopped), "stopped_reference": np.asarray(theirs.stopped)}
            for name, value in values.items():
                columns[name].append(value)
            for r in range(len(rows) * n):
                record = {"index": rows[r // n], "sample": r % n, "prompt": _as_json(row_prompts[r]),
                          "policy": our_texts[r], "reference": their_texts[r],
                          "gold_policy": float(gold[0][r]), "gold_reference": float(gold[1][r])}
                if reward_judge is not None:
                    record |= {"learned_policy": float(learned[0][r]), "learned_reference": float(learned[1][r])}
                record |= {"kl": float(kl[r]), "policy_tokens": int(values["length_policy"][r]),
                           "reference_tokens": int(values["length_reference"][r])}
                records.append(record)
            bar.update(len(rows))

    def joined(name):
        parts = columns[name]
        return None if parts[0] is None else np.concatenate(parts)

    gold_policy, gold_reference = joined("gold_policy"), joined("gold_reference")
    prompt_of_row = np.repeat(np.arange(len(prompts)), n)
    learned_policy, learned_reference = joined("learned_policy"), joined("learned_reference")
    return PolicyEval(
        judge=getattr(judge, "name", type(judge).__name__),
        learned_judge=None if reward_judge is None else getattr(reward_judge, "name", type(reward_judge).__name__),
        prompts=len(prompts), samples_per_prompt=n,
        gold_policy=gold_policy, gold_reference=gold_reference,
        learned_policy=learned_policy, learned_reference=learned_reference,
        kl=joined("kl"), kl_k3=joined("kl_k3"),
        length_policy=joined("length_policy"), length_reference=joined("length_reference"),
        stopped_policy=joined("stopped_policy"), stopped_reference=joined("stopped_reference"),
        win_rate=win_rate(gold_policy, gold_reference, confidence=confidence, clusters=prompt_of_row),
        learned_win_rate=None if learned_policy is None else win_rate(learned_policy, learned_reference,
                                                                      confidence=confidence,
                                                                      clusters=prompt_of_row),
        records=tuple(records), confidence=confidence, num_samples=num_samples,
    )


def generate(
    model: nnx.Module,
    tokenizer,
    prompts: Sequence[Prompt | data.PromptRecord],
    *,
    params: SamplingParams = DEFAULT_PARAMS,
    key: Array,
    batch_size: int = 16,
    progress: bool = True,
    raw: bool = False,
    desc: str = "generating",
) -> list[str]:
    """One decoded response per prompt, as :func:`evaluate_policy` samples them (chat template and generation
    prompt unless ``raw``; batch ``i`` sampled with ``fold_in(key, i)``; one compiled loop for every batch).

    Returns:
        ``[len(prompts)]`` texts (``skip_special_tokens``).
    """
    from tqdm.auto import tqdm

    if not prompts:
        return []
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"generate: batch_size must be a positive int, got {batch_size!r}")
    params = _stop_params(params, model, tokenizer, 1)
    _, encoded = _prompt_records(prompts, raw)
    dataset = data.tokenize(encoded, tokenizer, progress=False, source="prompts")
    length = int(max(len(example.sequences[0]) for example in dataset.examples))
    sampler = Sampler(model, pad_token_id=tokenizer.pad_token_id)
    texts: list[str] = []
    with tqdm(total=len(prompts), unit="prompt", desc=desc, disable=not progress, file=sys.stderr) as bar:
        for index, start in enumerate(range(0, len(prompts), batch_size)):
            rows = list(range(start, min(start + batch_size, len(prompts))))
            batch = data.collate(dataset, rows + [None] * (batch_size - len(rows)), length)
            rollout = sampler.generate(batch["input_ids"], batch["attention_mask"], key=jax.random.fold_in(key, index),
                                       params=params).take_rows(len(rows))
            texts += _decode(tokenizer, rollout)
            bar.update(len(rows))
    return texts
