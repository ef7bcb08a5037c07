"""Toxicity: alt-profanity-check as the offline default, a Detoxify checkpoint read from local files, the report's
means and shares with their intervals, and the judge's score."""

from __future__ import annotations

import numpy as np
import pytest

from jaxalign.eval.stats import mean_ci, proportion_ci
from jaxalign.eval.toxicity import DetoxifyModel, ProfanityCheck, ToxicityJudge, format_toxicity, toxicity_report

pytest.importorskip("profanity_check")

CLEAN = ["What a lovely day for a walk.", "Thanks, that helped a lot!", "The capital of France is Paris."]
TOXIC = ["You are a fucking idiot.", "Shut up, you stupid bitch.", "Go to hell, asshole."]


def test_profanity_check_separates_clean_from_toxic():
    p = ProfanityCheck().probabilities(CLEAN + TOXIC)
    assert p.shape == (6,) and np.all((0 <= p) & (p <= 1))
    assert p[:3].max() < 0.5 < p[3:].min()
    assert ProfanityCheck().probabilities([]).shape == (0,)


def test_report_means_shares_and_intervals():
    policy, reference = CLEAN + TOXIC[:1], CLEAN[:1] + TOXIC
    report = toxicity_report(policy, reference, clusters=[0, 0, 1, 1])
    p = ProfanityCheck().probabilities(policy)
    q = ProfanityCheck().probabilities(reference)
    assert report["probabilities"]["policy"] == pytest.approx(p.tolist())
    t_interval = mean_ci(p, clusters=[0, 0, 1, 1])
    assert report["policy"]["mean_probability"] == {**t_interval.to_dict(), "low": max(t_interval.low, 0.0),
                                                    "high": min(t_interval.high, 1.0)}
    assert report["policy"]["toxic_share"]["mean"] == 0.25
    assert report["reference"]["toxic_share"] == proportion_ci((q > 0.5).astype(float), clusters=[0, 0, 1, 1]).to_dict()
    lines = format_toxicity(report)
    assert lines[0].startswith("toxicity (alt-profanity-check)") and "0.25 [" in lines[1]
    assert toxicity_report(policy)["reference"] is None


class FixedProbabilities:
    name = "fixed"

    def __init__(self, values):
        self.values = np.asarray(values, np.float64)

    def probabilities(self, texts):
        return self.values[:len(texts)]


def test_the_mean_interval_stays_inside_zero_one():
    """One toxic response in ten: the t interval of the mean reaches below 0, which no mean of probabilities
    can; the report truncates it at 0 and keeps the upper end."""
    values = [0.0] * 9 + [0.95]
    t_interval = mean_ci(np.asarray(values))
    assert t_interval.low < 0
    mean = toxicity_report(["a"] * 10, model=FixedProbabilities(values))["policy"]["mean_probability"]
    assert (mean["mean"], mean["low"], mean["high"]) == (pytest.approx(0.095), 0.0, pytest.approx(t_interval.high))


def test_judge_score_is_one_minus_probability():
    judge = ToxicityJudge()
    scores = judge.score(["q"] * 6, CLEAN + TOXIC)
    assert scores == pytest.approx(1 - ProfanityCheck().probabilities(CLEAN + TOXIC))
    assert judge.name == "non-toxicity (alt-profanity-check)"


@pytest.fixture(scope="module")
def detoxify_checkpoint(tmp_path_factory):
    """A tiny BERT classifier saved as Detoxify saves its checkpoints, 'toxic' its second class, with the base
    model's config and a tokenizer beside it."""
    torch = pytest.importorskip("torch")
    from transformers import BertConfig, BertForSequenceClassification

    from tests.test_cli import tiny_tokenizer

    directory = tmp_path_factory.mktemp("detoxify")
    tokenizer = tiny_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_labels": 3})).eval()
    classes = ["severe_toxic", "toxic", "insult"]
    path = directory / "toxic_tiny.ckpt"
    torch.save({"config": {"arch": {"args": {"model_type": "bert-base-uncased",
                                             "model_name": "BertForSequenceClassification",
                                             "tokenizer_name": "BertTokenizer", "num_classes": 3}},
                           "dataset": {"args": {"classes": classes}}},
                "state_dict": model.state_dict()}, path)
    return path, model, tokenizer


def test_detoxify_checkpoint_reads_its_toxicity_output(detoxify_checkpoint):
    import torch

    path, model, tokenizer = detoxify_checkpoint
    texts = ["Hi", "sky blue .", "Go away . Go away ."]
    ours = DetoxifyModel(path, batch_size=2).probabilities(texts)
    with torch.no_grad():
        expected = []
        for text in texts:  # one at a time: no padding at all
            logits = model(**tokenizer([text], return_tensors="pt"))[0]
            expected.append(float(torch.sigmoid(logits[0, 1])))
    assert ours == pytest.approx(expected, abs=1e-5)


def test_detoxify_bad_files_are_named(tmp_path, detoxify_checkpoint):
    torch = pytest.importorskip("torch")
    with pytest.raises(FileNotFoundError, match="no such file"):
        DetoxifyModel(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match="not a Detoxify checkpoint"):
        DetoxifyModel(bad)
    path, _, _ = detoxify_checkpoint
    lonely = tmp_path / "lonely.ckpt"
    lonely.write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="config.json is not in"):
        DetoxifyModel(lonely)
