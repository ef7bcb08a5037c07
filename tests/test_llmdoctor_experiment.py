"""experiments.llmdoctor's bookkeeping: the evaluation cache follows the models it decoded with, and the Pareto
target needs the sweep to move each gold score the stated way (a flat sweep fails)."""

from __future__ import annotations

import os

from experiments.llmdoctor import fingerprint, monotone


def scores(*means, half_width=0.05):
    return [{"mean": m, "low": m - half_width, "high": m + half_width} for m in means]


def test_a_retrained_model_no_longer_matches_its_cached_evaluation(tmp_path):
    doctor = tmp_path / "doctor"
    doctor.mkdir()
    (doctor / "model.safetensors").write_bytes(b"weights")
    (doctor / "nested").mkdir()
    (doctor / "nested" / "value_head.safetensors").write_bytes(b"head")
    before = fingerprint((doctor,))
    assert before == fingerprint((doctor,))  # read twice, unchanged: the cache is reused
    assert [entry[0] for entry in before[str(doctor)]] == ["model.safetensors", "nested/value_head.safetensors"]
    stat = (doctor / "model.safetensors").stat()
    (doctor / "model.safetensors").write_bytes(b"retrain")  # same size: the modification time tells
    os.utime(doctor / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert fingerprint((doctor,)) != before
    (doctor / "extra.json").write_text("{}")
    assert len(fingerprint((doctor,))[str(doctor)]) == 3


def test_the_pareto_sweep_must_move_each_score_the_stated_way():
    assert monotone(scores(0.1, 0.2, 0.2, 0.35), increasing=True)
    assert monotone(scores(0.1, 0.18, 0.15, 0.3), increasing=True)  # a dip within the intervals
    assert not monotone(scores(0.1, 0.3, 0.1, 0.4), increasing=True)  # a step clearly the wrong way
    assert not monotone(scores(0.2, 0.2, 0.2), increasing=True)  # flat: the weights changed nothing
    assert not monotone(scores(0.20, 0.21, 0.205), increasing=True)  # a net move within the noise
    assert not monotone(scores(0.3, 0.25, 0.2), increasing=True)
    assert monotone(scores(0.3, 0.25, 0.15), increasing=False)
    assert not monotone(scores(0.3), increasing=False)
