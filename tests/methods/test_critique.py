"""Self-critique training: ``jaxalign train critique`` on ADLF records end to end (answers, critiques, revisions
on the rollout engine; rows kept and shown; an SFT stage on revisions and critiques), what becomes of capped
critiques and judged rows, and the errors of missing principles and judges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxalign import data as jdata
from jaxalign.cli import main
from jaxalign.methods import critique, recipe
from jaxalign.methods.specs import CritiqueSpec

REASONS = ["Vague.", "", "Rude.", None, "Too long.", None]


@pytest.fixture(scope="module")
def terse_checkpoint(tmp_path_factory) -> Path:
    """The tiny Llama with every token a stop token: each answer, critique and revision is one token and ends
    (a random tiny model left alone never ends a critique: every one would be capped)."""
    from tests.models.conftest import make_hf_model
    from tests.test_cli import tiny_tokenizer

    directory = tmp_path_factory.mktemp("terse") / "tiny_llama"
    model = make_hf_model("llama")
    model.config.eos_token_id = list(range(model.config.vocab_size))
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def adlf_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adlf") / "train.jsonl"
    rows = []
    for index, reason in enumerate(REASONS):
        record = {"conversation": [{"role": "human", "content": ["Hi ?", "sky ?", "blue ?"][index % 3]},
                                   {"role": "assistant", "content": "Go away ."}],
                  "meta_eval_score": float(index % 4)}
        if reason is not None:
            record["score_reason"] = reason
        rows.append(json.dumps(record))
    path.write_text("\n".join(rows) + "\n")
    return path


def settings(checkpoint, source, out, *extra):
    return ["train", "critique", "--config", "adlf", f"model.path={checkpoint}", f"data.source={source}",
            f"output_dir={out}", "gold=vader", "loss.principles=[Be kind., Be brief.]", "loss.revision_target=all",
            "loss.max_answer_tokens=2", "loss.max_critique_tokens=3", "loss.generation_batch_size=4",
            "data.max_length=96", "data.buckets=null", "data.batch_size=2", "train.total_steps=2",
            "train.log.progress_bar=false", "train.log.tensorboard=false", *extra]


def test_train_critique_from_the_command_line(terse_checkpoint, adlf_file, tmp_path, capsys):
    out = tmp_path / "critique"
    assert main(settings(terse_checkpoint, adlf_file, out)) == 0
    printed = capsys.readouterr()
    rows = [json.loads(line) for line in (out / critique.ROWS_FILE).read_text().splitlines()]
    assert len(rows) == len(REASONS)
    for row, reason in zip(rows, REASONS, strict=True):
        assert set(row) >= {"prompt", "principles", "answer", "critique", "critique_capped", "revision",
                            "judge_answer", "judge_revision", "revision_preferred"}
        assert row["principles"] == ([reason] if reason else ["Be kind.", "Be brief."])
        if row["critique_capped"] or not row["critique"] or not row["answer"]:
            assert row["revision"] is None  # never revised from a critique that did not end
    summary = json.loads((out / critique.SUMMARY_FILE).read_text())
    assert summary["critiques_capped"] == sum(r["critique_capped"] for r in rows)
    assert summary["prompts"] == len(REASONS) and "sft" in summary["stages"]
    sft_records = [json.loads(line) for line in (out / critique.SFT_FILE).read_text().splitlines()]
    assert {r["score"] for r in sft_records} <= {1.0, 0.5}
    assert (out / "sft" / "export" / "config.json").is_file() and (out / "sft" / "metrics.jsonl").is_file()
    assert "critique: answers" in printed.err and "critique: revisions" in printed.err
    assert f"prompt: {rows[0]['prompt'][-1]['content']}" in printed.out  # rows shown
    assert f"metrics: {out / 'sft' / 'metrics.jsonl'}" in printed.out and f"{out / 'metrics.jsonl'}" not in printed.out
    assert summary["revisions"] > 0 and summary["sft_records"] == len(sft_records)


def test_a_capped_critique_is_counted_and_never_revised_from(monkeypatch):
    """The loop's bookkeeping with the generations stubbed: the capped critique's prompt never reaches the revision
    phase, its row keeps the critique and says it was capped, and the judge sees only finished revisions."""
    asked = {}

    def fake_generate(model, tokenizer, conversations, *, label, **options):
        asked[label] = conversations
        count = len(conversations)
        if label == "critique: critiques":
            return [f"critique {i}" for i in range(count)], [i == 0 for i in range(count)]
        return [f"{label} {i} is lovely" for i in range(count)], [False] * count

    class LengthJudge:
        def score(self, prompts, responses):
            return [float(len(r)) for r in responses]

    monkeypatch.setattr(critique, "generate", fake_generate)
    items = [critique.Item([{"role": "user", "content": f"q{i}"}], ("Be kind.",), "here") for i in range(3)]
    rows = critique.critique_rows(None, None, items, LengthJudge(), CritiqueSpec(principles=("Be kind.",)), seed=0)
    assert len(asked["critique: revisions"]) == 2
    assert rows[0]["critique_capped"] and rows[0]["revision"] is None and rows[0]["revision_preferred"] is None
    assert all(r["revision"] and r["revision_preferred"] for r in rows[1:])
    assert "- Be kind." in asked["critique: critiques"][0][-1]["content"]
    assert critique.counts(rows)["critiques_capped"] == 1


def row(answer="Hi .", critique_text="Be kinder .", capped=False, revision="Hi there .", preferred=True):
    return {"prompt": [{"role": "user", "content": "Hi ?"}], "principles": ["Be kind."], "answer": answer,
            "critique": critique_text, "critique_capped": capped, "revision": revision, "revision_capped": False,
            "judge_answer": 0.0, "judge_revision": 0.5 if preferred else -0.5, "revision_preferred": preferred}


def test_capped_critiques_are_counted_and_never_trained_on():
    rows = [row(), row(capped=True, revision=None, preferred=None), row(preferred=False)]
    rows[1].update(judge_answer=None, judge_revision=None)
    spec = CritiqueSpec(principles=("Be kind.",), critique_weight=0.25)
    sft_records, pairs = critique.training_records(rows, spec)
    critiques = [r for r in sft_records if r["score"] == 0.25]
    revisions = [r for r in sft_records if r["score"] == 1.0]
    assert len(critiques) == 2  # the capped one is left out
    assert len(revisions) == 1 and revisions[0]["completion"][0]["content"] == "Hi there ."
    assert critiques[0]["prompt"][-2] == {"role": "assistant", "content": "Hi ."}
    assert len(pairs) == 1 and pairs[0]["chosen"][0]["content"] == "Hi there ." and pairs[0]["margin"] == 0.5
    counted = critique.counts(rows)
    assert counted["critiques_capped"] == 1 and counted["revisions_preferred"] == 1 and counted["judged"] == 2
    everything, _ = critique.training_records(rows, CritiqueSpec(principles=("x",), revision_target="all",
                                                                  critique_weight=0.0))
    assert [r["score"] for r in everything] == [1.0, 1.0]


def test_missing_principles_name_the_record_before_any_model_loads(checkpoint, adlf_file, tmp_path, capsys):
    args = settings(checkpoint, adlf_file, tmp_path / "none", "loss.principles=[]")
    assert main(args) != 0
    error = capsys.readouterr().err
    assert "train.jsonl" in error and "line 2" in error and "score_reason" in error and "loss.principles" in error
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    (["loss.principles=[]", "loss.use_score_reason=false"], "loss.principles .* must be a non-empty list"),
    (["loss.principles=[' ']"], "loss.principles .* must be a list of non-empty strings"),
    (["loss.constitution=[Be kind.]"], "loss.constitution is loss.principles here"),
    (["loss.max_critique_tokens=0"], "loss.max_critique_tokens .* must be a positive int"),
])
def test_bad_critique_options_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        recipe.load_run_config("adlf", ["data.source=x.jsonl", *overrides], method="critique")


def test_a_critique_run_needs_a_judge(checkpoint, adlf_file, tmp_path):
    config = recipe.load_run_config("adlf", [f"data.source={adlf_file}", f"model.path={checkpoint}",
                                             f"output_dir={tmp_path / 'c'}", "gold=null", "loss.principles=[x]"],
                                    method="critique")
    with pytest.raises(ValueError, match="needs a judge"):
        critique.prepare(config)
    assert isinstance(critique.read_items(config)[1], critique.Item)
    with pytest.raises(jdata.DataError):
        critique.read_items(recipe.load_run_config("adlf", [f"data.source={adlf_file}", "loss.principles=[]"],
                                                   method="critique"))


def test_nothing_left_to_train_on_stops_with_the_counts(adlf_file, tmp_path):
    """Rows read back on --resume where every critique was capped: the run stops naming the counts."""
    config = recipe.load_run_config("adlf", [f"data.source={adlf_file}", f"output_dir={tmp_path}", "gold=vader",
                                             "train.checkpoint.resume=true"], method="critique")
    capped = row(capped=True, revision=None, preferred=None)
    (tmp_path / critique.ROWS_FILE).write_text(json.dumps(capped) + "\n")
    with pytest.raises(ValueError, match=r'no revision to train on .*"critiques_capped": 1'):
        critique.prepare(config)
