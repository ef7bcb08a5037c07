"""A pipeline's labelled data made offline: prompts, several responses per prompt sampled from a model, and a
judge's labels on them, written as the records the training stages read.

The stand-in for human raters is a judge (``vader``: VADER compound sentiment, as in Ziegler et al. 2019's
sentiment task), shown ``samples`` responses per prompt. ``format`` says what the raters hand back:

- ``pairs``: the best against the worst response, ``margin`` their score gap (``prompt``/``chosen``/``rejected``
  conversations); prompts whose responses all tie carry no preference and are left out (counted).
- ``best_of_n``: OpenAI lm-human-preferences labels, ``query``, ``sample0..N-1`` and the index of the ``best``;
  ``query`` is the prompt as the chat template renders it, so the reward model reads the same tokens the policy's
  rollouts hold. Ties are left out.
- ``scored``: ADLF scored conversations, one per response, ``meta_eval_score`` the judge's score mapped onto ADLF's
  1-10 scale (``1 + 4.5·(compound + 1)`` for VADER's ``[-1, 1]``).

Files in ``<directory>``: ``train.jsonl`` and ``eval.jsonl`` (the records), ``prompts_train.jsonl`` and
``prompts_eval.jsonl`` (the prompts, for online stages and the final evaluation), ``labels.json`` (the settings and
counts). A rerun with the same settings reads them back instead of sampling again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

LABEL_FORMATS = ("pairs", "best_of_n", "scored")
LABEL_JUDGES = ("vader",)
LABELS_FILE = "labels.json"
PROMPT_KEYS = ("templates", "subjects", "file", "count", "held_out", "seed")


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """The ``pipeline.labels`` section.

    Attributes:
        prompts: ``{templates: [...], subjects: [...]}`` (every template filled with every subject) or
            ``{file: PATH}`` (a prompt file, ``jaxalign.data.read_prompt_file``), with ``count`` (None: all),
            ``held_out`` (the fraction kept for evaluation, default 0.2) and ``seed`` (their order).
        format: ``pairs``, ``best_of_n`` or ``scored`` (module docstring).
        samples: responses per prompt (>= 2).
        max_new_tokens, temperature: their sampling.
        judge: ``vader``.
        batch_size: prompts per compiled sampling batch.
        seed: the sampling key.
    """

    prompts: Mapping[str, Any]
    format: str = "pairs"
    samples: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    judge: str = "vader"
    batch_size: int = 16
    seed: int = 0

    @classmethod
    def from_dict(cls, values: Any, where: str) -> LabelSpec:
        if not isinstance(values, Mapping):
            raise ValueError(f"{where}: expected a mapping (prompts, format, samples, ...), got {values!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} (known: {', '.join(known)})")
        if "prompts" not in values:
            raise ValueError(f"{where}.prompts: required ({{templates: [...], subjects: [...]}} or {{file: PATH}})")
        spec = cls(**values)
        spec.check(where)
        return spec

    def check(self, where: str) -> None:
        prompts = self.prompts
        if not isinstance(prompts, Mapping) or set(prompts) - set(PROMPT_KEYS):
            raise ValueError(f"{where}.prompts: expected a mapping of {', '.join(PROMPT_KEYS)}, got {prompts!r}")
        if ("file" in prompts) == ("templates" in prompts or "subjects" in prompts):
            raise ValueError(f"{where}.prompts: give either file or templates + subjects")
        if "file" not in prompts and not (_strings(prompts.get("templates")) and _strings(prompts.get("subjects"))):
            raise ValueError(f"{where}.prompts: templates and subjects must be non-empty lists of strings")
        if "templates" in prompts and not all("{}" in t for t in prompts["templates"]):
            raise ValueError(f"{where}.prompts.templates: each template needs a {{}} where the subject goes")
        held_out = prompts.get("held_out", 0.2)
        if not isinstance(held_out, (int, float)) or isinstance(held_out, bool) or not 0 < held_out < 1:
            raise ValueError(f"{where}.prompts.held_out must be a fraction in (0, 1), got {held_out!r}")
        count = prompts.get("count")
        if count is not None and (not _integer(count) or count < 4):
            raise ValueError(f"{where}.prompts.count must be an integer >= 4 (train and held-out prompts), got "
                             f"{count!r}")
        if self.format not in LABEL_FORMATS:
            raise ValueError(f"{where}.format must be one of {LABEL_FORMATS}, got {self.format!r}")
        if self.judge not in LABEL_JUDGES:
            raise ValueError(f"{where}.judge must be one of {LABEL_JUDGES}, got {self.judge!r}")
        for name, low in (("samples", 2), ("max_new_tokens", 1), ("batch_size", 1)):
            if not _integer(getattr(self, name)) or getattr(self, name) < low:
                raise ValueError(f"{where}.{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 < self.temperature <= 10:
            raise ValueError(f"{where}.temperature must be in (0, 10], got {self.temperature!r}")

    def settings(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "prompts": dict(self.prompts)}


@dataclasses.dataclass(frozen=True)
class LabelFiles:
    """Where a labelling pass wrote its records and prompts."""

    directory: Path
    format: str

    @property
    def train(self) -> Path:
        return self.directory / "train.jsonl"

    @property
    def eval(self) -> Path:
        return self.directory / "eval.jsonl"

    @property
    def prompts_train(self) -> Path:
        return self.directory / "prompts_train.jsonl"

    @property
    def prompts_eval(self) -> Path:
        return self.directory / "prompts_eval.jsonl"

    def data_format(self) -> str:
        """The ``data.format`` of the records (what jaxalign.data's readers call it)."""
        return {"pairs": "preference", "best_of_n": "openai_preferences", "scored": "scored_conversation"}[self.format]


def prompt_texts(spec: LabelSpec) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` prompt texts in a seeded order."""
    from jaxalign import data as jdata

    prompts = spec.prompts
    if "file" in prompts:
        records = jdata.read_prompt_file(prompts["file"], option="pipeline.labels.prompts.file")
        texts = [r.prompt for r in records if isinstance(r.prompt, str)]
        if len(texts) != len(records):
            raise ValueError(f"pipeline.labels.prompts.file {prompts['file']}: prompts must be text, not conversations")
    else:
        texts = [template.format(subject) for subject in prompts["subjects"] for template in prompts["templates"]]
    order = np.random.default_rng(prompts.get("seed", 0)).permutation(len(texts))
    count = prompts.get("count") or len(texts)
    if count > len(texts):
        raise ValueError(f"pipeline.labels.prompts.count {count}: only {len(texts)} distinct prompts")
    texts = [texts[i] for i in order[:count]]
    held_out = max(1, round(count * prompts.get("held_out", 0.2)))
    return texts[held_out:], texts[:held_out]


def make_labels(spec: LabelSpec, directory: Path, model, tokenizer) -> tuple[LabelFiles, dict[str, Any]]:
    """Sample, judge and write (module docstring); reused when ``labels.json`` holds the same settings. Returns
    the files and the counts (records per split, prompts left out and why)."""
    files = LabelFiles(Path(directory), spec.format)
    marker = files.directory / LABELS_FILE
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("settings") == spec.settings():
            return files, saved["counts"]
    train_prompts, eval_prompts = prompt_texts(spec)
    judge = _judge(spec.judge)
    counts = {}
    files.directory.mkdir(parents=True, exist_ok=True)
    for split, prompts, path, prompt_path, offset in (
            ("train", train_prompts, files.train, files.prompts_train, 0),
            ("eval", eval_prompts, files.eval, files.prompts_eval, 1)):
        records, left_out = label(spec, model, tokenizer, prompts, judge, seed=spec.seed + offset, split=split)
        if not records:
            raise ValueError(f"pipeline.labels: no {split} prompt gave a usable label ({left_out}); raise "
                             "samples or max_new_tokens, or use more prompts")
        _write_jsonl(path, records)
        _write_jsonl(prompt_path, [{"prompt": [{"role": "user", "content": p}]} for p in prompts])
        counts[split] = {"prompts": len(prompts), "records": len(records), "left_out": left_out}
    marker.write_text(json.dumps({"settings": spec.settings(), "counts": counts}, indent=2) + "\n")
    return files, counts


def label(spec: LabelSpec, model, tokenizer, prompts: Sequence[str], judge, *, seed: int, split: str,
          ) -> tuple[list[dict], dict[str, int]]:
    """The records of ``prompts`` (``spec.samples`` responses each, judged), and the prompts left out."""
    from jaxalign.rollout import Sampler, SamplingParams

    sampler = Sampler(model, pad_token_id=tokenizer.pad_token_id)
    stop = tuple(model.config.eos_token_ids) + ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None
                                                else ())
    params = SamplingParams(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, n=spec.samples,
                            stop_token_ids=stop)
    queries = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=False) for p in prompts]
    records, left_out = [], {"tie": 0, "empty": 0}
    with tqdm(total=len(prompts), unit="prompt", desc=f"labelling {split} samples", dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), spec.batch_size):
            chunk = [tokenizer(query, add_special_tokens=False)["input_ids"]
                     for query in queries[start:start + spec.batch_size]]
            padded = chunk + [chunk[-1]] * (spec.batch_size - len(chunk))  # one compiled shape
            rollout = sampler.generate(padded, key=jax.random.fold_in(jax.random.key(seed), start), params=params)
            tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.response_mask)
            for i in range(len(chunk)):
                index = start + i
                rows = range(spec.samples * i, spec.samples * (i + 1))
                texts = [tokenizer.decode(tokens[r][mask[r]], skip_special_tokens=True).strip() for r in rows]
                record, reason = _record(spec.format, prompts[index], queries[index], texts, judge)
                if record is None:
                    left_out[reason] += 1
                else:
                    records.extend(record)
            bar.update(len(chunk))
    return records, left_out


def _record(kind: str, prompt: str, query: str, texts: list[str], judge) -> tuple[list[dict] | None, str]:
    if kind == "best_of_n" and not all(texts):  # every label names one of N samples: all N are needed
        return None, "empty"
    texts = [t for t in texts if t]
    if len(texts) < (1 if kind == "scored" else 2):
        return None, "empty"
    scores = np.asarray(judge.score([prompt] * len(texts), texts), np.float64)
    if kind == "scored":
        return [{"conversation": [{"role": "human", "content": prompt}, {"role": "assistant", "content": text}],
                 "meta_eval_score": round(1.0 + 4.5 * (float(score) + 1.0), 3),
                 "score_reason": f"VADER compound {float(score):+.3f}"}
                for text, score in zip(texts, scores, strict=True)], ""
    best, worst = int(np.argmax(scores)), int(np.argmin(scores))
    if scores[best] == scores[worst]:
        return None, "tie"
    if kind == "best_of_n":
        return [{"query": query, **{f"sample{i}": t for i, t in enumerate(texts)}, "best": best}], ""
    return [{"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": texts[best]}],
             "rejected": [{"role": "assistant", "content": texts[worst]}],
             "margin": float(scores[best] - scores[worst])}], ""


def _judge(name: str):
    from jaxalign.eval import VaderJudge

    return {"vader": VaderJudge}[name]()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, str) for item in value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
