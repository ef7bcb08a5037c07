"""The retrainer's recovery at start-up, with a stand-in for the swap (no model): tests/serve/test_hitl.py runs
the real app, its training subprocesses and a SIGKILL during retraining."""

from __future__ import annotations

import dataclasses

from jaxalign.serve.retrain import Retrainer, Version, Versions


class Records:
    """The part of a FeedbackStore the retrainer reads."""

    def __init__(self, count: int):
        self.items = list(range(count))

    def __len__(self):
        return len(self.items)

    def records(self):
        return list(self.items)


def retrainer(tmp_path, swaps: list) -> tuple[Retrainer, Versions]:
    versions = Versions(tmp_path, base_model=None)
    return Retrainer(tmp_path, Records(3), versions, swap=lambda path, name: swaps.append((path, name)),
                     threshold=3), versions


def trained(versions: Versions, name: str, parent: str, **fields) -> Version:
    version = Version(name, parent, "ready", records=(0, 3), stages={"sft": {"status": "done", "examples": 3}},
                      model=str(versions.path(name) / "sft" / "export"), **fields)
    versions.save(version)
    return version


def test_a_version_trained_but_never_served_is_served_at_the_next_start(tmp_path):
    swaps = []
    app, versions = retrainer(tmp_path, swaps)
    trained(versions, "v1", "v0")  # a stop came between version.json's "ready" and the swap
    app.resume()
    app._thread.join(10)
    assert swaps == [(str(versions.path("v1") / "sft" / "export"), "v1")]
    assert versions.current.name == "v1" and versions.get("v1").served is not None
    assert app.status.state == "idle" and app.waiting == 0


def test_a_version_rolled_back_from_is_not_served_again(tmp_path):
    swaps = []
    app, versions = retrainer(tmp_path, swaps)
    trained(versions, "v1", "v0", served=1.0)
    versions.set_current("v0")  # the page's "Serve this" on v0
    app.resume()
    assert app._thread is None and swaps == [] and versions.current.name == "v0"


def test_a_version_still_training_resumes_before_anything_else(tmp_path):
    swaps = []
    app, versions = retrainer(tmp_path, swaps)
    version = trained(versions, "v1", "v0")
    versions.save(dataclasses.replace(version, status="training"))  # all stages done, swap not reached
    app.resume()
    app._thread.join(10)
    assert [name for _, name in swaps] == ["v1"] and versions.get("v1").status == "ready"
