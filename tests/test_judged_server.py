"""The experiments' LLM judge: ``jaxalign serve`` started as the experiment's child on loopback (a tiny random
Llama here, the embedded model in the experiments), asked both orders of a pair, and stopped when the block ends."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from experiments.judged import served_judge
from jaxalign.eval.llm_judge import judged_win_rate
from tests.eval.test_llm_judge_serve import SHORT
from tests.serve.conftest import tiny_checkpoint  # noqa: F401 (fixture)
from tests.test_compare_methods import children_of, running


def test_the_served_judge_answers_and_stops_with_its_block(tmp_path, tiny_checkpoint):  # noqa: F811
    log = tmp_path / "judge_server.log"
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the server's command uses no path relative to the caller's directory but the model's
    try:
        with served_judge(log, model=str(tiny_checkpoint), max_batch=4, max_model_len=96, templates=SHORT) as spec:
            [server] = [pid for pid in children_of(os.getpid())
                        if "serve" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
            assert spec.url.startswith("http://127.0.0.1:") and spec.model == "tiny_llama"
            result = judged_win_rate(["Hi"], ["sky blue"], ["Go"], dataclasses.replace(spec, max_tokens=4),
                                     lc_bootstrap=0)
            counts = result.counts
            assert counts["judgments"] == 2 and counts["ok"] + counts["unparseable"] == 2
    finally:
        os.chdir(cwd)
    assert not running(server), "the judge server outlived its block"
    assert log.read_text()  # its output went to the log


def test_a_server_that_cannot_start_is_one_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"jaxalign serve \(the judge\) exited with .* while starting"):
        with served_judge(tmp_path / "log", model=str(tmp_path / "no-such-model")):
            pass
