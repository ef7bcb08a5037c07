"""Self-critique training (Constitutional AI's supervised stage, Self-Refine's loop): the policy answers each
prompt, critiques its answer against principles, and revises it; a judge scores the answer and the revision.

    jaxalign train critique --config adlf data.source=adlf/train.jsonl reward.model=runs/adlf/reward/export
    jaxalign train critique --config my.yaml gold=vader        # VADER sentiment as the judge

What is trained, from the generated rows:

1. ``sft`` stage (``<output_dir>/sft``): SFT on the revisions (each the target of its original prompt: all finished
   ones, or only those the judge prefers to the first answer, ``loss.revision_target``), and on the critiques (the
   target of prompt + answer + critique request), weighted ``loss.critique_weight`` against a revision's 1: a
   score-weighted SFT (``loss.example_weights: score``), so the model learns to write the critique itself.
2. ``dpo`` stage (``<output_dir>/dpo``, with ``loss.preference_pairs``): DPO from the SFT model on the pairs
   (revision ≻ first answer) where the judge prefers the revision.

The principles: ``loss.principles`` (a YAML list), or a record's ``score_reason`` where it has one (ADLF's
explanation of its score) with ``loss.use_score_reason``. A prompt with neither is an error naming its record.

The generations run on the rollout engine (:class:`jaxalign.rollout.Sampler`) in batches of
``loss.generation_batch_size`` prompts, one labelled progress bar per phase. A critique that has not ended after
``loss.max_critique_tokens`` is *capped*: counted, kept in the rows, never trained on, and not revised from (a
revision of a half-written critique is not what the method means); the same for a revision that does not end.
Every row (prompt, principles, answer, critique, revision, the judge's two scores, what became of it) is written to
``<output_dir>/critique_rows.jsonl`` and a few are printed; the counts go to ``<output_dir>/critique.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxalign import data as jdata
from jaxalign import eval as jeval
from jaxalign import models
from jaxalign.methods.common import RUN_FILE, load_pretrained, prepare_output_dir, stop_ids, write_json
from jaxalign.methods.recipe import RunConfig
from jaxalign.rollout import Sampler, SamplingParams

ROWS_FILE = "critique_rows.jsonl"
SUMMARY_FILE = "critique.json"
SFT_FILE = "sft_records.jsonl"
PAIRS_FILE = "pairs.jsonl"
CRITIQUE_REQUEST = ("Critique your answer against these principles:\n{principles}\n"
                    "Say briefly where it falls short. Do not rewrite it yet.")
REVISION_REQUEST = "Rewrite your answer to meet the critique. Reply with the new answer only."


@dataclasses.dataclass(frozen=True)
class Item:
    """One prompt to answer: its messages (``[{role, content}]``), the principles its critique checks, where it
    was read."""

    prompt: list[dict[str, str]]
    principles: tuple[str, ...]
    where: str


@dataclasses.dataclass
class Plan:
    """What :func:`prepare` leaves for the pipeline: the training stages' configs and the generation's counts."""

    stages: list[RunConfig]
    summary: dict[str, Any]


def _messages(turns: Any) -> list[dict[str, str]]:
    if isinstance(turns, str):
        return [{"role": "user", "content": turns}]
    return [{"role": m.role, "content": m.content} for m in turns]


def read_items(config: RunConfig) -> list[Item]:
    """The prompts of ``config.data`` with their principles: ADLF scored conversations (the conversation before
    the scored reply; its ``score_reason``), prompt records, prompt/completion records or preference pairs.

    Raises:
        DataError: a record has no principles to check (no ``score_reason`` and ``loss.principles`` empty),
            naming the record and the field.
    """
    spec, data = config.loss, config.data
    if data.source is None:
        raise ValueError("method critique reads its prompts from one file: give data.source (not data.sources)")
    records, _ = jdata.read_records(data.source, format=data.format, split=data.split, on_error=data.on_error,
                                    limit=data.limit)
    items = []
    for record in records:
        reason = None
        if isinstance(record, jdata.ScoredConversation):
            prompt, reason = _messages(record.messages[:-1]), record.reason
        elif isinstance(record, (jdata.PromptRecord, jdata.SFTRecord, jdata.PreferenceRecord)):
            prompt = _messages(record.prompt)
        else:
            raise ValueError(f"method critique answers prompts; {data.name} holds {type(record).__name__} records")
        if spec.use_score_reason and reason and reason.strip():
            principles = (reason.strip(),)
        elif spec.principles:
            principles = spec.principles
        else:
            raise jdata.DataError("is missing or empty, and loss.principles is empty: the critique has nothing to "
                                  "check the answer against (give loss.principles, a YAML list)",
                                  where=record.origin, field="score_reason", reason=jdata.Reason.MISSING_FIELD)
        items.append(Item(prompt, principles, str(record.origin) if record.origin else data.name))
    return items


def build_judge(config: RunConfig, tokenizer):
    """The judge of answers and revisions: ``reward: {model: DIR}`` (a reward model) or ``gold: vader``."""
    if config.reward is not None:
        if set(config.reward) != {"model"}:
            raise ValueError(f"method critique's judge: reward must be {{model: DIR}} (a reward model exported by "
                             f"`jaxalign train reward`), got {dict(config.reward)!r}")
        model, info = models.load_reward_model(config.reward["model"])
        return jeval.RewardModelJudge(model, tokenizer=tokenizer, gain=info["gain"], bias=info["bias"])
    if config.gold == "vader":
        return jeval.VaderJudge()
    raise ValueError("method critique needs a judge that decides whether a revision beats the first answer: "
                     "reward.model=DIR (a reward model, e.g. ADLF's from `jaxalign train reward --config adlf`) or "
                     "gold=vader")


def generate(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int, temperature: float,
             batch_size: int, key: jax.Array, label: str) -> tuple[list[str], list[bool]]:
    """One response per conversation from the rollout engine, in batches: ``(texts, capped)`` where ``capped`` is
    true for a response that reached ``max_new_tokens`` without a stop token."""
    sampler = Sampler(model)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            stop_token_ids=stop_ids(model, tokenizer))
    encoded = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True)["input_ids"]
               for c in conversations]
    texts, capped = [], []
    with tqdm(total=len(encoded), unit="prompt", desc=label, dynamic_ncols=True) as bar:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape per prompt width
            rollout = sampler.generate(padded, key=jax.random.fold_in(key, start), params=params)
            tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.response_mask)
            stopped = np.asarray(rollout.stopped)
            for row in range(len(chunk)):
                texts.append(tokenizer.decode(tokens[row][mask[row]], skip_special_tokens=True).strip())
                capped.append(not bool(stopped[row]))
            bar.update(len(chunk))
    return texts, capped


def _bullets(principles: tuple[str, ...]) -> str:
    return "\n".join(f"- {p}" for p in principles)


def critique_rows(model, tokenizer, items: list[Item], judge, spec, *, seed: int) -> list[dict[str, Any]]:
    """Answer, critique and revise every prompt, and judge answer and revision: one row each."""
    options = dict(temperature=spec.temperature, batch_size=spec.generation_batch_size)
    key = jax.random.key(seed)
    prompts = [item.prompt for item in items]
    answers, answer_capped = generate(model, tokenizer, prompts, max_new_tokens=spec.max_answer_tokens,
                                      key=jax.random.fold_in(key, 0), label="critique: answers", **options)
    asked = [p + [{"role": "assistant", "content": a},
                  {"role": "user", "content": CRITIQUE_REQUEST.format(principles=_bullets(item.principles))}]
             for p, a, item in zip(prompts, answers, items, strict=True)]
    critiques, critique_capped = generate(model, tokenizer, asked, max_new_tokens=spec.max_critique_tokens,
                                          key=jax.random.fold_in(key, 1), label="critique: critiques", **options)
    revisable = [i for i, (a, c, cap) in enumerate(zip(answers, critiques, critique_capped, strict=True))
                 if a and c and not cap]
    revision_asks = [asked[i] + [{"role": "assistant", "content": critiques[i]},
                                 {"role": "user", "content": REVISION_REQUEST}] for i in revisable]
    revised, revision_capped = generate(model, tokenizer, revision_asks, max_new_tokens=spec.max_answer_tokens,
                                        key=jax.random.fold_in(key, 2), label="critique: revisions", **options)
    revisions = dict(zip(revisable, zip(revised, revision_capped, strict=True), strict=True))
    judged = [i for i in revisable if revisions[i][0] and not revisions[i][1]]
    texts = [p[-1]["content"] for p in prompts]
    answer_scores = np.asarray(judge.score([texts[i] for i in judged], [answers[i] for i in judged]), np.float64)
    revision_scores = np.asarray(judge.score([texts[i] for i in judged], [revisions[i][0] for i in judged]),
                                 np.float64)
    scores = {i: (float(a), float(r)) for i, a, r in zip(judged, answer_scores, revision_scores, strict=True)}
    rows = []
    for i, item in enumerate(items):
        revision, capped = revisions.get(i, (None, False))
        judge_answer, judge_revision = scores.get(i, (None, None))
        rows.append({"where": item.where, "prompt": item.prompt, "principles": list(item.principles),
                     "answer": answers[i], "answer_capped": answer_capped[i], "critique": critiques[i],
                     "critique_capped": critique_capped[i], "revision": revision, "revision_capped": capped,
                     "judge_answer": judge_answer, "judge_revision": judge_revision,
                     "revision_preferred": None if i not in scores else judge_revision > judge_answer})
    return rows


def training_records(rows: list[dict], spec) -> tuple[list[dict], list[dict]]:
    """``(sft_records, pairs)`` of the rows: revisions (weight 1) and critiques (``critique_weight``) as scored
    prompt/completion records; (revision ≻ answer) pairs where the judge prefers the revision."""
    sft, pairs = [], []
    for row in rows:
        preferred = bool(row["revision_preferred"])
        if row["revision_preferred"] is not None and (preferred or spec.revision_target == "all"):
            sft.append({"prompt": row["prompt"], "completion": [{"role": "assistant", "content": row["revision"]}],
                        "score": 1.0})
        if spec.critique_weight > 0 and row["critique"] and not row["critique_capped"] and row["answer"]:
            request = CRITIQUE_REQUEST.format(principles=_bullets(tuple(row["principles"])))
            sft.append({"prompt": row["prompt"] + [{"role": "assistant", "content": row["answer"]},
                                                   {"role": "user", "content": request}],
                        "completion": [{"role": "assistant", "content": row["critique"]}],
                        "score": float(spec.critique_weight)})
        if preferred and row["revision"] != row["answer"]:
            pairs.append({"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": row["revision"]}],
                          "rejected": [{"role": "assistant", "content": row["answer"]}],
                          "margin": row["judge_revision"] - row["judge_answer"]})
    return sft, pairs


def counts(rows: list[dict]) -> dict[str, int]:
    """What became of the prompts: capped critiques and revisions, judged rows, revisions preferred."""
    return {"prompts": len(rows), "empty_answers": sum(not r["answer"] for r in rows),
            "critiques_capped": sum(r["critique_capped"] for r in rows),
            "empty_critiques": sum(not r["critique"] for r in rows),
            "revisions": sum(r["revision"] is not None for r in rows),
            "revisions_capped": sum(bool(r["revision_capped"]) for r in rows),
            "judged": sum(r["revision_preferred"] is not None for r in rows),
            "revisions_preferred": sum(bool(r["revision_preferred"]) for r in rows)}


def show_rows(rows: list[dict], count: int) -> str:
    """``count`` rows as text for the terminal."""
    shown = []
    for row in rows[:count]:
        scores = ("not judged" if row["revision_preferred"] is None else
                  f"judge: answer {row['judge_answer']:+.3f}, revision {row['judge_revision']:+.3f}")
        capped = " [capped: never ended]" if row["critique_capped"] else ""
        shown.append(f"prompt: {row['prompt'][-1]['content']}\n  answer: {row['answer']}\n"
                     f"  critique{capped}: {row['critique']}\n  revision: {row['revision']}\n  ({scores})")
    return "\n\n".join(shown)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def stage_config(config: RunConfig, method: str, source: Path, **values) -> RunConfig:
    """A training stage of the run: ``config``'s model, data settings and train section on ``source``."""
    resolved = config.to_dict()
    train = resolved["train"]
    train["checkpoint"]["directory"] = train["log"]["directory"] = None  # the stage's own directories
    data = {key: value for key, value in resolved["data"].items()
            if key not in ("sources", "weights", "format", "split", "limit", "score_template", "dimension")}
    stage = {"method": method, "output_dir": str(Path(config.output_dir) / method), "model": resolved["model"],
             "data": {**data, "source": str(source)}, "train": train, "export": config.export, **values}
    return RunConfig.from_dict(stage, where=f"critique stage {method}")


def prepare(config: RunConfig, *, overwrite: bool = False) -> Plan:
    """Generate (or, resuming, read back) the rows, write the training files, and return the stages to train."""
    spec = config.loss
    out = Path(config.output_dir)
    rows_path = out / ROWS_FILE
    if config.train.checkpoint.resume and rows_path.is_file():
        rows = [json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines()]
        print(f"critique: reusing the {len(rows)} rows of {rows_path}")
    else:
        items = read_items(config)
        policy, tokenizer = load_pretrained(config.model)
        judge = build_judge(config, tokenizer)
        rows = critique_rows(policy, tokenizer, items, judge, spec, seed=config.train.seed)
        del policy
        prepare_output_dir(config, overwrite=overwrite)
        write_json(out / RUN_FILE, {"config": config.to_dict(), "examples": len(rows)})
        write_jsonl(rows_path, rows)
    summary = counts(rows)
    print(f"critique: {json.dumps(summary)}; every row in {rows_path}")
    if spec.shown_rows:
        print(show_rows(rows, spec.shown_rows))
    sft_records, pairs = training_records(rows, spec)
    summary.update(sft_records=len(sft_records), preference_pairs=len(pairs))
    if not any(r["score"] == 1.0 for r in sft_records):
        raise ValueError(f"critique: no revision to train on ({json.dumps(summary)}): the judge preferred none of "
                         "the revisions (loss.revision_target=all trains on every finished one), or none finished "
                         "(raise loss.max_critique_tokens / max_answer_tokens)")
    write_jsonl(out / SFT_FILE, sft_records)
    # The SFT stage always exports: the DPO stage starts from its export.
    stages = [stage_config(config, "sft", out / SFT_FILE, loss={"example_weights": "score"},
                           export=config.export or spec.preference_pairs)]
    if spec.preference_pairs and len(pairs) >= 2:
        write_jsonl(out / PAIRS_FILE, pairs)
        lora = config.model.lora is not None
        model = {**config.to_dict()["model"], "path": str(Path(stages[0].output_dir) / "export")}
        stages.append(stage_config(config, "dpo", out / PAIRS_FILE, model=model,
                                   loss={"loss_type": "sigmoid", "beta": spec.beta},
                                   reference="lora_base" if lora else "precomputed"))
    elif spec.preference_pairs:
        summary["dpo_skipped"] = f"{len(pairs)} preference pair(s): DPO needs at least 2"
    return Plan(stages, summary)


def finish(config: RunConfig, plan: Plan, results: list) -> Any:
    """The run's result: the last stage's model and export, the generation's counts and each stage's metrics."""
    last = results[-1]
    summary = {**plan.summary, "stages": {stage.method: {"output_dir": stage.output_dir,
                                                         "eval": result.eval_metrics}
                                          for stage, result in zip(plan.stages, results, strict=True)}}
    if jax.process_index() == 0:
        write_json(Path(config.output_dir) / SUMMARY_FILE, summary)
    return dataclasses.replace(last, config=config, extra={**last.extra, "critique": summary})
