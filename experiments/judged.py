"""What the experiments share about judges: the gold judge named on a command line, an LLM judge served by
``jaxalign serve`` as a child of the experiment, and the judged win-rate column with its agreement with the gold
judge.

- :func:`gold_judge`: ``vader`` (VADER's sentiment), ``reward-model:DIR`` (a saved reward model, normalised as
  saved) or ``llm:URL`` / ``llm:URL#MODEL`` (an LLM grading each answer 1-10 over an OpenAI-compatible endpoint).
- :func:`served_judge`: ``jaxalign serve`` (the embedded model unless told otherwise) started on 127.0.0.1 as a child
  that dies with the experiment, stopped on any exit of the block (an error, Ctrl-C, SIGTERM, SIGHUP).
- :func:`judged_column`: an LLM judge's pairwise win rate of a method against its baseline (both orders asked,
  intervals and the length-controlled rate by prompt) and Cohen's kappa between its verdicts and the gold judge's
  on the same pairs, so a reader sees how far to trust it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxalign.eval.llm_judge import JudgeSpec, cohen_kappa, grade, judged_win_rate
from jaxalign.eval.templates import DEFAULT_TEMPLATES, Template
from jaxalign.serve import children

SERVER_START_S = 900.0  # loading the model and answering /health, bounded
JUDGE_MAX_TOKENS = 8  # the verdict alone: "[[A]]" is 5 tokens of SmolLM2's tokenizer
JUDGE_TIMEOUT_S = 600.0  # a request may wait behind a full batch of prefills on a small shared CPU
# The sentiment experiments' judge question: the gold judge (VADER) rewards a positive tone, so the LLM judge is
# asked the same thing, and kappa measures how well it reproduces the gold criterion. Worked examples as earlier
# turns of the chat: the embedded 135M model gives a verdict in the asked format far more often with them.
_QUESTION = "Question: {question}\nAnswer A: {answer_a}\nAnswer B: {answer_b}\nWhich answer is more positive?"
SENTIMENT_PAIRWISE = Template(
    "pairwise", _QUESTION,
    "You compare two answers and say which is more positive. Reply only [[A]], [[B]] or [[C]] (equal).",
    source="experiments.judged.SENTIMENT_PAIRWISE",
    shots=tuple((_QUESTION.format(question=q, answer_a=a, answer_b=b), verdict) for q, a, b, verdict in (
        ("Describe a sunny day.", "It was awful and cold.", "A lovely, warm day!", "[[B]]"),
        ("Review a cafe.", "Great coffee and friendly staff.", "It is a cafe.", "[[A]]"),
        ("Review a bus.", "The bus was late and dirty.", "Clean seats and a kind driver.", "[[B]]"))))


# --- processes --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def signals_as_exit(signals=(signal.SIGTERM, signal.SIGHUP)):
    """``signals`` raise SystemExit while the context runs, so its ``finally`` blocks stop what it started (by
    default they end Python without running any). A repeated signal while stopping is ignored."""
    def leave(signum, frame):
        for other in signals:
            signal.signal(other, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = {signum: signal.signal(signum, leave) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def served_judge(log: Path, *, model: str | None = None, max_batch: int = 16, max_model_len: int = 512,
                 cache_dir: Path | None = None, templates: dict | None = None, extra: Sequence[str] = ()):
    """Yields a :class:`JudgeSpec` for ``jaxalign serve`` (``model``, default the embedded SmolLM2) started on a
    free loopback port as this process's child (it dies with this process, and is stopped when the block ends,
    however it ends). Its output goes to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", "jaxalign.cli", "serve", "--port", str(port), "--max-batch", str(max_batch),
               "--max-model-len", str(max_model_len), "--no-warmup", "--no-access-log",
               *(["--model", str(model)] if model else []), *extra]
    url = f"http://127.0.0.1:{port}"
    with signals_as_exit():
        with open(log, "ab") as output:
            server = children.spawn(command, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + SERVER_START_S
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"jaxalign serve (the judge) exited with {server.returncode} while starting "
                                       f"(see {log})")
                try:
                    served = _get(url + "/v1/models")["data"][0]["id"]
                    break
                except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, IndexError, ValueError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"jaxalign serve (the judge) did not answer within {SERVER_START_S:.0f} s "
                                           f"(see {log})") from None
                    time.sleep(2.0)
            yield JudgeSpec(url=url + "/v1", model=served, max_tokens=JUDGE_MAX_TOKENS, timeout_s=JUDGE_TIMEOUT_S,
                            concurrency=max_batch, cache_dir=cache_dir,
                            templates=templates or {**DEFAULT_TEMPLATES, "pairwise": SENTIMENT_PAIRWISE})
        finally:
            children.stop(server)


@contextlib.contextmanager
def llm_judge(out: Path, *, url: str | None, model: str | None, templates: dict | None = None):
    """The experiment's LLM judge: the endpoint at ``url`` (``model`` its name there, asked as is), or else
    ``jaxalign serve`` with the embedded model started for the block (:func:`served_judge`). Judgments are cached
    in ``out/judgments`` so a rerun asks nothing twice."""
    cache = out / "judgments"
    if url is None:
        with served_judge(out / "judge_server.log", cache_dir=cache, templates=templates) as spec:
            yield spec
        return
    if not model:
        raise ValueError("--judge-url needs --judge-model (the judge model's name at that endpoint)")
    yield JudgeSpec(url=url, model=model, cache_dir=cache, max_tokens=1024,
                    templates=templates or {**DEFAULT_TEMPLATES, "pairwise": SENTIMENT_PAIRWISE})


# --- the judged column -------------------------------------------------------------------------------------------


def gold_outcome(policy: float, reference: float) -> float:
    """The gold judge's verdict on one pair, for the policy: 1 win, ½ tie, 0 loss."""
    return 1.0 if policy > reference else 0.5 if policy == reference else 0.0


def judged_column(spec: JudgeSpec, prompts: Sequence, policy: Sequence[str], reference: Sequence[str],
                  gold_policy: Sequence[float], gold_reference: Sequence[float], *, clusters: Sequence,
                  label: str = "judging") -> dict:
    """The LLM judge's win rate of ``policy`` over ``reference`` (row ``i`` answering ``prompts[i]``; rows of one
    prompt share a ``clusters`` label) and its agreement with the gold judge: Cohen's kappa between each judgment's
    outcome (1, ½, 0 for the policy) and the gold judge's on the same pair."""
    print(f"      {label}: {len(prompts)} pairs, both orders, judge {spec.name}", flush=True)
    result = judged_win_rate(list(prompts), list(policy), list(reference), spec, clusters=list(clusters),
                             check=True, progress=True)
    gold = [gold_outcome(a, b) for a, b in zip(gold_policy, gold_reference, strict=True)]
    agreement = cohen_kappa([j["outcome"] for j in result.judgments], [gold[j["index"]] for j in result.judgments])
    column = result.to_dict()
    column["agreement_with_gold"] = agreement.to_dict()
    column["gold_win_rate_same_pairs"] = float(np.mean(gold))
    return column


def judged_cell(column: dict | None) -> str:
    """``63.2% [52%, 73%] κ 0.41`` (or ``-`` when the judge gave no verdict)."""
    if not column or column.get("win_rate") is None:
        return "-"
    win, kappa = column["win_rate"], column["agreement_with_gold"]["kappa"]
    return (f"{win['rate']:.1%} [{win['low']:.0%}, {win['high']:.0%}] "
            f"κ {'-' if kappa is None else f'{kappa:.2f}'}")


# --- gold judges named on the command line -------------------------------------------------------------------------


class LLMGradeJudge:
    """An LLM grading each answer 1-10 (MT-Bench's single-answer format, :func:`jaxalign.eval.grade`) as a gold
    judge: ``score = (grade − 5.5) / 4.5``, in ``[-1, 1]`` like VADER's. An answer the judge did not grade (its
    text held no ``[[N]]``, or the request failed) is an error naming how many and why: a missing grade is never
    guessed."""

    def __init__(self, spec: JudgeSpec):
        self.spec = spec
        self.name = f"llm grade ({spec.name})"

    def score(self, prompts: Sequence, responses: Sequence[str]) -> np.ndarray:
        from jaxalign.eval.llm_judge import question_text

        items = [{"turns": [question_text(p)], "answers": [r]} for p, r in zip(prompts, responses, strict=True)]
        grades = grade(items, self.spec, check=False)
        missing = [j for j in grades.judgments if j["score"] is None]
        if missing:
            statuses = {s: sum(j["status"] == s for j in missing) for s in {j["status"] for j in missing}}
            raise ValueError(f"the judge {self.spec.name} gave no grade for {len(missing)} of {len(items)} answers "
                             f"({statuses}); first: {missing[0]['raw'] or missing[0]['error']!r}")
        return (np.asarray([j["score"] for j in grades.judgments], np.float64) - 5.5) / 4.5


def gold_judge(value: str):
    """The gold judge a ``--judge`` value names: ``vader``, ``reward-model:DIR`` or ``llm:URL`` (``llm:URL#MODEL``
    to name the model at the endpoint; default the first it lists). Checked here, before any work.

    Raises:
        ValueError, FileNotFoundError: one line naming ``--judge`` and what is wrong.
    """
    kind, _, target = value.partition(":")
    if kind == "vader" and not target:
        from jaxalign.eval import VaderJudge

        return VaderJudge()
    if kind == "reward-model" and target:
        from jaxalign.eval.judges import load_reward_judge

        if not Path(target).is_dir():
            raise FileNotFoundError(f"--judge reward-model:{target}: no such directory")
        try:
            judge, _, _ = load_reward_judge(target, option="--judge reward-model:")
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--judge {value}: {error}") from None
        return judge
    if kind == "llm" and target:
        from jaxalign.eval.llm_judge import check_endpoint

        url, _, model = target.partition("#")
        if not model:
            try:
                model = _get(url.rstrip("/") + "/models")["data"][0]["id"]
            except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError) as error:
                raise ValueError(f"--judge {value}: cannot list the endpoint's models ({error}); name one as "
                                 f"llm:URL#MODEL") from None
        spec = JudgeSpec(url=url, model=model, cache_dir=None, max_tokens=256)
        check_endpoint(spec)
        return LLMGradeJudge(spec)
    raise ValueError(f"--judge {value!r}: expected vader, reward-model:DIR or llm:URL[#MODEL]")
