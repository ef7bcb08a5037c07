"""Benchmark files in their published formats, read from paths the user gives, and the runs over them.

- AlpacaEval (Li et al. 2023; Dubois et al. 2024): a JSON array of ``{"instruction", "output", "generator",
  "dataset"}`` (``alpaca_eval.json``; ``output`` is the baseline's answer). The policy answers every
  instruction, an LLM judge compares it with the baseline (the file's outputs, or ``--reference``'s answers) in
  both orders: the win rate and the length-controlled win rate.
- MT-Bench (Zheng et al. 2023, arXiv 2306.05685): ``question.jsonl``, one ``{"question_id", "category",
  "turns": [first, second], "reference": [...] (optional)}`` a line. The policy answers the first turn, then
  the second with its own first answer in the conversation; the judge grades each answer 1–10 (the second in
  the context of both turns; with the reference answers where given). Scores per turn and per category.
- TruthfulQA multiple choice (Lin et al. 2022, arXiv 2109.07958): ``mc_task.json``, a JSON array of
  ``{"question", "mc1_targets": {answer: 0|1}, "mc2_targets": {answer: 0|1}}``. No judge: each answer's
  log-likelihood after ``"Q: {question}\\nA:"``. MC1 is right when the best true answer scores above every
  false one; MC2 is the probability mass on the true answers, ``Σ_true p / Σ_all p`` with ``p = exp(log-lik)``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import special

from jaxalign.data import Message
from jaxalign.eval.forward import padded_batches, split_model, target_logps
from jaxalign.eval.stats import MeanCI, mean_ci, proportion_ci

__all__ = ["AlpacaItem", "MTBenchQuestion", "TruthfulQAItem", "check_same_tokenizer", "read_alpaca_eval",
           "read_mt_bench", "read_truthfulqa_mc", "truthfulqa_scores"]

BENCHMARKS = ("alpaca_eval", "mt_bench", "truthfulqa_mc")


@dataclasses.dataclass(frozen=True)
class AlpacaItem:
    instruction: str
    output: str | None = None
    generator: str | None = None
    dataset: str | None = None


@dataclasses.dataclass(frozen=True)
class MTBenchQuestion:
    question_id: int | str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class TruthfulQAItem:
    question: str
    mc1: tuple[tuple[str, int], ...]
    mc2: tuple[tuple[str, int], ...]


def _load_json(path: Path, option: str):
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {error.lineno}: not JSON ({error.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def _string(record: dict, field: str, where: str, *, required: bool = True) -> str | None:
    value = record.get(field)
    if value is None and not required:
        return None
    if field not in record:
        raise ValueError(f"{where}: field {field!r} is missing")
    if not isinstance(value, str) or (required and not value.strip()):
        raise ValueError(f"{where}: field {field!r} must be a non-empty string, got {json.dumps(value)[:60]}")
    return value


def _array(path: Path, option: str, benchmark: str, example: str) -> list:
    content = _load_json(path, option)
    if not isinstance(content, list) or not content:
        raise ValueError(f"{path}: expected {benchmark}'s format, a non-empty JSON array of {example} objects")
    for number, record in enumerate(content, start=1):
        if not isinstance(record, dict):
            raise ValueError(f"{path}, record {number}: expected an object, got {type(record).__name__}")
    return content


def read_alpaca_eval(path: str | Path, *, option: str = "--data") -> list[AlpacaItem]:
    """AlpacaEval's evaluation set (a JSON array; ``instruction`` required, ``output``/``generator``/``dataset``
    optional strings). Errors name the file, the record and the field."""
    path = Path(path)
    items = []
    for number, record in enumerate(_array(path, option, "AlpacaEval", '{"instruction": ...}'), start=1):
        where = f"{path}, record {number}"
        items.append(AlpacaItem(instruction=_string(record, "instruction", where),
                                output=_string(record, "output", where, required=False),
                                generator=_string(record, "generator", where, required=False),
                                dataset=_string(record, "dataset", where, required=False)))
    return items


def read_mt_bench(path: str | Path, *, option: str = "--data") -> list[MTBenchQuestion]:
    """MT-Bench's ``question.jsonl``: ``question_id`` (unique), ``category``, ``turns`` (one or two non-empty
    strings), optional ``reference`` (as many strings as turns). Errors name the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path}: no such file")
    questions, seen = [], {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not JSON ({error.msg}); MT-Bench's question.jsonl has one JSON object a "
                             "line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
        if "question_id" not in record:
            raise ValueError(f"{where}: field 'question_id' is missing")
        qid = record["question_id"]
        if not isinstance(qid, int | str) or isinstance(qid, bool):
            raise ValueError(f"{where}: field 'question_id' must be an integer or a string")
        if qid in seen:
            raise ValueError(f"{where}: field 'question_id' {qid!r} repeats line {seen[qid]}")
        seen[qid] = number
        category = _string(record, "category", where)
        turns = record.get("turns")
        if not isinstance(turns, list) or len(turns) not in (1, 2) or not all(
                isinstance(t, str) and t.strip() for t in turns):
            raise ValueError(f"{where}: field 'turns' must be a list of one or two non-empty strings")
        reference = record.get("reference")
        if reference is not None and (not isinstance(reference, list) or len(reference) < len(turns)
                                      or not all(isinstance(r, str) for r in reference)):
            raise ValueError(f"{where}: field 'reference' must be a list of strings, one per turn")
        questions.append(MTBenchQuestion(qid, category, tuple(turns),
                                         None if reference is None else tuple(reference[:len(turns)])))
    if not questions:
        raise ValueError(f"{path}: no questions (MT-Bench's question.jsonl has one JSON object a line)")
    return questions


def _targets(record: dict, field: str, where: str, *, exactly_one: bool) -> tuple[tuple[str, int], ...]:
    targets = record.get(field)
    if field not in record:
        raise ValueError(f"{where}: field {field!r} is missing")
    if not isinstance(targets, dict) or len(targets) < 2:
        raise ValueError(f"{where}: field {field!r} must map at least two answers to 0 or 1")
    for answer, label in targets.items():
        if not answer.strip() or label not in (0, 1) or isinstance(label, bool):
            raise ValueError(f"{where}: field {field!r}: answer {answer[:40]!r} has label {label!r}; labels are 0 or 1")
    trues = sum(targets.values())
    if exactly_one and trues != 1:
        raise ValueError(f"{where}: field {field!r} has {trues} true answers; MC1 has exactly one")
    if not 0 < trues < len(targets):
        raise ValueError(f"{where}: field {field!r} needs at least one true and one false answer")
    return tuple(targets.items())


def read_truthfulqa_mc(path: str | Path, *, option: str = "--data") -> list[TruthfulQAItem]:
    """TruthfulQA's ``mc_task.json``: ``question``, ``mc1_targets`` (exactly one true answer), ``mc2_targets``
    (at least one true and one false). Errors name the file, the record and the field."""
    path = Path(path)
    items = []
    records = _array(path, option, "TruthfulQA's mc_task.json", '{"question", "mc1_targets", "mc2_targets"}')
    for number, record in enumerate(records, start=1):
        where = f"{path}, record {number}"
        items.append(TruthfulQAItem(question=_string(record, "question", where),
                                    mc1=_targets(record, "mc1_targets", where, exactly_one=True),
                                    mc2=_targets(record, "mc2_targets", where, exactly_one=False)))
    return items


def read_benchmark(name: str, path: str | Path):
    """The items of benchmark ``name`` read from ``path``."""
    readers = {"alpaca_eval": read_alpaca_eval, "mt_bench": read_mt_bench, "truthfulqa_mc": read_truthfulqa_mc}
    if name not in readers:
        raise ValueError(f"unknown benchmark {name!r} (one of {', '.join(BENCHMARKS)})")
    return readers[name](path)


# ---------------------------------------------------------------------------------------------- likelihoods
def check_same_tokenizer(first, second, *, what: str = "truthfulqa_mc") -> None:
    """Refuse two tokenizers that map any token to another id (or differ in size or special tokens).

    Raises:
        ValueError: one line naming the first difference.
    """
    a, b = first.get_vocab(), second.get_vocab()
    problem = None
    if len(a) != len(b):
        problem = f"vocabularies of {len(a)} and {len(b)} tokens"
    elif a != b:
        token = next(t for t in a if b.get(t) != a[t])
        problem = f"the token {token!r} is id {a[token]} in one and {b.get(token)} in the other"
    elif (first.bos_token, first.eos_token) != (second.bos_token, second.eos_token):
        problem = "different BOS/EOS tokens"
    if problem:
        raise ValueError(f"--policy and --reference have different tokenizers ({problem}): the likelihood benchmark "
                         f"{what} compares the two models on the same tokens; give models that share one tokenizer")


def _context(question: str) -> str:
    return f"Q: {question}\nA:"


def continuation_logliks(model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16
                         ) -> np.ndarray:
    """``log p(continuation | context)`` summed over the continuation's tokens, for each ``(context,
    continuation)``: the context encoded with the tokenizer's special tokens, the continuation without, joined.

    Rows are right-padded to a multiple of 32 tokens (one compiled program per bucket) and run in batches of
    exactly ``batch_size`` rows.
    """
    sequences, spans = [], []
    for context, continuation in pairs:
        ctx = tokenizer(context)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not cont:
            raise ValueError(f"the answer {continuation!r} encodes to no tokens")
        sequences.append(ctx + cont)
        spans.append((len(ctx), len(ctx) + len(cont)))
    limit = model.config.max_position_embeddings
    if (longest := max(len(s) for s in sequences)) > limit:
        raise ValueError(f"a question and answer take {longest} tokens, more than the model's {limit} positions")
    split = split_model(model)
    out = np.zeros(len(sequences))
    order = np.argsort([len(s) for s in sequences], kind="stable")
    buckets: dict[int, list[int]] = {}
    for index in order:
        buckets.setdefault(min(limit, -(-len(sequences[index]) // 32) * 32), []).append(int(index))
    for length, members in buckets.items():
        tokens = np.zeros((len(members), length), np.int32)
        mask = np.zeros((len(members), length), np.int32)
        for row, index in enumerate(members):
            tokens[row, :len(sequences[index])] = sequences[index]
            mask[row, :len(sequences[index])] = 1
        offset = 0
        for rows, batch in padded_batches({"input_ids": tokens, "attention_mask": mask}, batch_size):
            logps = np.asarray(target_logps(split.graphdef, split.state, batch["input_ids"], batch["attention_mask"],
                                            None, None, chunk_size=None), np.float64)
            for row in range(rows):
                start, end = spans[members[offset + row]]
                # logps[:, t] is log p(token t + 1 | tokens ..t): the continuation's tokens start - 1 .. end - 2.
                out[members[offset + row]] = logps[row, start - 1:end - 1].sum()
            offset += rows
    return out


def truthfulqa_scores(model, tokenizer, items: Sequence[TruthfulQAItem], *, batch_size: int = 16) -> dict:
    """MC1 (0/1) and MC2 (in ``[0, 1]``) per question (module docstring): ``{"mc1": [...], "mc2": [...]}``."""
    pairs, owners = [], []
    for index, item in enumerate(items):
        for task, targets in (("mc1", item.mc1), ("mc2", item.mc2)):
            for answer, label in targets:
                pairs.append((_context(item.question), " " + answer.strip()))
                owners.append((index, task, label))
    logliks = continuation_logliks(model, tokenizer, pairs, batch_size=batch_size)
    grouped: dict[tuple[int, str], dict[int, list[float]]] = {}
    for (index, task, label), value in zip(owners, logliks):
        grouped.setdefault((index, task), {0: [], 1: []})[label].append(float(value))
    mc1, mc2 = [], []
    for index in range(len(items)):
        one = grouped[(index, "mc1")]
        mc1.append(float(max(one[1]) > max(one[0])))
        two = grouped[(index, "mc2")]
        mc2.append(float(np.exp(special.logsumexp(two[1]) - special.logsumexp(two[1] + two[0]))))
    return {"mc1": mc1, "mc2": mc2}


def truthfulqa_summary(scores: dict, confidence: float = 0.95) -> dict:
    """MC1 accuracy (Wilson interval) and mean MC2 (t interval) as :class:`MeanCI` dicts."""
    return {"mc1": proportion_ci(scores["mc1"], confidence).to_dict(),
            "mc2": mean_ci(scores["mc2"], confidence).to_dict(), "questions": len(scores["mc1"])}


# ---------------------------------------------------------------------------------------------- generation
def mt_bench_answers(generate, questions: Sequence[MTBenchQuestion]) -> list[list[str]]:
    """Both turns' answers per question: ``generate(conversations) -> texts`` is called once per turn, the
    second turn's conversations holding the first answers."""
    first = generate([(Message("user", q.turns[0]),) for q in questions])
    two = [i for i, q in enumerate(questions) if len(q.turns) == 2]
    second = generate([(Message("user", questions[i].turns[0]), Message("assistant", first[i]),
                        Message("user", questions[i].turns[1])) for i in two]) if two else []
    answers = [[text] for text in first]
    for i, text in zip(two, second):
        answers[i].append(text)
    return answers


def mt_bench_items(questions: Sequence[MTBenchQuestion], answers: Sequence[Sequence[str]]) -> list[dict]:
    """The items :func:`jaxalign.eval.llm_judge.grade` grades."""
    return [{"turns": list(q.turns), "answers": list(a), "category": q.category,
             "references": None if q.reference is None else list(q.reference)} for q, a in zip(questions, answers)]


def format_means(title: str, means: dict[str, MeanCI | dict | None]) -> list[str]:
    """``title`` then one ``name  mean [low, high]`` line per entry."""
    def cell(value):
        if value is None:
            return "-"
        value = value.to_dict() if isinstance(value, MeanCI) else value
        low = value["low"]
        return f"{value['mean']:.4g}" + ("" if low is None else f" [{low:.4g}, {value['high']:.4g}]")

    width = max([len(str(name)) for name in means] + [4])
    return [title] + [f"  {str(name):<{width}}  {cell(value)}" for name, value in means.items()]
