"""``jaxalign pipeline``: the stages of a ``pipeline:`` section (e.g. labels -> sft -> reward -> ppo) run in order
as one command, each stage's export feeding the next, every stage resumable on its own, one summary at the end.

    jaxalign pipeline --config production_rlhf --smoke          # every stage, tiny: proves the install
    jaxalign pipeline --config production_rlhf                  # the full run; rerun it to resume
    jaxalign pipeline --config my_pipeline.yaml ppo/train.total_steps=50 'pipeline.labels.samples=8'

A pipeline file is a run preset (common keys, ``methods:`` sections per method, as ``jaxalign train`` reads) plus::

    pipeline:
      labels: {prompts: {templates: [...], subjects: [...]}, format: pairs, samples: 4}   # optional
      stages: [sft, reward, {name: ppo, method: ppo, config: {train: {total_steps: 16}}}]
      evaluation: {samples_per_prompt: 2, max_new_tokens: 32}
    smoke: {...}          # merged over the file by --smoke

Wiring (each default applies only where the stage's config leaves the key unset):

- a policy stage (``sft``, ``distill``, ``dpo``, ``kto``, ``ppo``, ``grpo``) and a reward stage start from the export
  of the latest policy stage before them, the first from the file's ``model.path``; a ``tfpo`` stage's patient and
  doctor start there too;
- ``ppo``/``grpo`` stages take ``reward: {model: <latest reward stage's export>}``; with neither a reward stage
  before them nor a ``reward:`` of their own they are refused before anything trains;
- ``stage:<name>`` anywhere in a stage's config is the export directory of the earlier stage ``<name>``
  (``reward: {composite: {external: {model: stage:reward}, ...}}``);
- ``data``/``eval_data`` without a source read the labels' records (offline methods) or prompts (online ones).

Stage ``<name>`` runs in ``<output_dir>/<name>``. ``<output_dir>/pipeline.json`` records the stages that finished
(with their resolved configs): a rerun skips them and resumes the one that was interrupted from its checkpoints.
``<output_dir>/pipeline.lock`` (an ``flock``) keeps a second process out of the directory while one runs. At the end
the final policy is evaluated on the held-out prompts against the SFT stage's model and the base
(:func:`jaxalign.eval.evaluate_policy`: gold judge, the last reward model, KL), into ``summary.json``,
``summary.png`` and a table.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxalign.methods import recipe
from jaxalign.methods.labels import LabelFiles, LabelSpec

PIPELINE_KEYS = ("labels", "stages", "evaluation", "keep_checkpoints")
EVALUATION_KEYS = ("prompts", "samples_per_prompt", "max_new_tokens", "temperature", "batch_size", "seed", "judge")
POLICY_METHODS = ("sft", "distill", "dpo", "kto", "ppo", "grpo")
STATE_FILE = "pipeline.json"
LOCK_FILE = "pipeline.lock"
STAGE_REF = "stage:"
# What an offline stage can train on, by the labels' format (online stages read the prompts).
LABEL_KINDS = {"sft": ("pairs", "scored"), "distill": ("pairs", "scored"), "reward": ("pairs", "best_of_n", "scored"),
               "dpo": ("pairs",), "kto": ("pairs",), "tfpo": ("pairs",)}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: its name (and directory), its resolved run config, and the earlier stages it reads."""

    name: str
    config: recipe.RunConfig
    reads: tuple[str, ...]

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def export(self) -> Path:
        return Path(self.config.output_dir) / "export"


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A resolved pipeline: every stage's config checked before anything runs."""

    source: str
    output_dir: Path
    base: recipe.ModelSpec
    labels: LabelSpec | None
    stages: tuple[Stage, ...]
    evaluation: dict[str, Any]
    keep_checkpoints: bool = True

    @property
    def label_files(self) -> LabelFiles | None:
        return None if self.labels is None else LabelFiles(self.output_dir / "labels", self.labels.format)

    def final_policy(self) -> Stage | None:
        return next((s for s in reversed(self.stages) if s.method in POLICY_METHODS), None)

    def sft_stage(self) -> Stage | None:
        return next((s for s in reversed(self.stages) if s.method == "sft"), None)

    def reward_stage(self) -> Stage | None:
        return next((s for s in reversed(self.stages) if s.method == "reward"), None)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "output_dir": str(self.output_dir),
                "labels": None if self.labels is None else self.labels.settings(),
                "stages": [{"name": s.name, "reads": list(s.reads), "config": s.config.to_dict()} for s in self.stages],
                "evaluation": self.evaluation, "keep_checkpoints": self.keep_checkpoints}


def _pipeline_file(config: str) -> Path:
    """``--config``'s YAML file. A shipped preset's name whose pipeline ships as ``<name>_pipeline`` names that
    pipeline: ``adlf`` (ADLF's run preset, one method at a time) and ``production`` run ``adlf_pipeline`` and
    ``production_pipeline``. A path is always that file."""
    sibling = f"{config}_pipeline"
    if Path(config).suffix not in (".yaml", ".yml") and sibling in recipe.preset_names():
        return recipe.resolve_preset(sibling)
    return recipe.resolve_preset(config)


def load_pipeline(config: str, overrides: Sequence[str] = (), *, smoke: bool = False) -> Pipeline:
    """The pipeline of a preset name or YAML file, with ``key=value`` overrides (every stage, or the
    ``pipeline:`` section) and ``<stage>/key=value`` ones (that stage), and with its ``smoke:`` section merged
    over it when ``smoke``. Every stage's config is resolved and its inputs checked here, before any work.

    Raises:
        ValueError: naming the file, the stage and the key.
    """
    path = _pipeline_file(config)
    where = str(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{where}: not valid YAML: {error}") from None
    if not isinstance(values, dict) or not isinstance(values.get("pipeline"), dict):
        raise ValueError(f"{where}: no pipeline: section (stages: [...]); a run preset trains with "
                         f"`jaxalign train <method> --config`, docs/pipelines.md describes pipeline files")
    smoke_values = values.pop("smoke", None)
    if smoke:
        if not isinstance(smoke_values, dict):
            raise ValueError(f"{where}: --smoke needs a smoke: section (the settings merged over the file)")
        values = _merged(values, smoke_values)
    return recipe.resolved_blaming_overrides(lambda chosen: _pipeline(values, chosen, where), overrides, where)


def _pipeline(values: dict[str, Any], overrides: Sequence[str], where: str) -> Pipeline:
    common = [o for o in overrides if "/" not in o.partition("=")[0]]
    per_stage = [o for o in overrides if "/" in o.partition("=")[0]]
    values = recipe.apply_overrides(copy.deepcopy(values), common)
    section = values.pop("pipeline")
    unknown = sorted(set(section) - set(PIPELINE_KEYS))
    if unknown:
        raise ValueError(f"{where}: pipeline: unknown key(s) {unknown} (known: {', '.join(PIPELINE_KEYS)})")
    output_dir = values.get("output_dir")
    if not isinstance(output_dir, str) or not output_dir:
        raise ValueError(f"{where}: output_dir: required (each stage runs in <output_dir>/<stage>)")
    labels = None if section.get("labels") is None else LabelSpec.from_dict(section["labels"], f"{where}: "
                                                                                                 "pipeline.labels")
    entries = _stage_entries(section.get("stages"), where)
    evaluation = _evaluation(section.get("evaluation") or {}, where)
    stage_overrides = _split_stage_overrides(per_stage, [name for name, _, _ in entries])
    out = Path(output_dir)
    try:  # the base model alone, as a run's model section
        base = recipe.load_run_config({"output_dir": output_dir, "data": {"source": "-"}, "train": {"total_steps": 1},
                                       "model": values.get("model") or {}}, method="sft").model
    except ValueError as error:
        raise ValueError(f"{where}: {str(error).removeprefix('config: ')}") from None
    files = None if labels is None else LabelFiles(out / "labels", labels.format)
    stages: list[Stage] = []
    for name, method, own in entries:
        stages.append(_stage(where, name, method, values, own, stage_overrides[name], stages, out, base, files))
    keep_checkpoints = _keep_checkpoints(section.get("keep_checkpoints", True), stages, where)
    if evaluation.get("prompts") is None and files is None and stages[-1].method in POLICY_METHODS:
        raise ValueError(f"{where}: pipeline.evaluation.prompts: required without a labels section (the held-out "
                         "prompts the final policy is evaluated on)")
    return Pipeline(where, out, base, labels, tuple(stages), evaluation, keep_checkpoints)


def _keep_checkpoints(value: Any, stages: list[Stage], where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: pipeline.keep_checkpoints must be true or false, got {value!r}")
    if not value:
        unexported = [s.name for s in stages if not s.config.export]
        if unexported:
            raise ValueError(f"{where}: pipeline.keep_checkpoints: false deletes a finished stage's checkpoints, and "
                             f"{', '.join(unexported)} has export: false: its trained weights would be lost")
    return value


def _stage_entries(stages: Any, where: str) -> list[tuple[str, str, dict]]:
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"{where}: pipeline.stages: a non-empty list of stages (sft, reward, {{name: ppo, method: "
                         "ppo, config: {...}}})")
    entries, seen = [], set()
    for index, entry in enumerate(stages):
        at = f"{where}: pipeline.stages[{index}]"
        if isinstance(entry, str):
            entry = {"name": entry, "method": entry}
        if not isinstance(entry, dict) or set(entry) - {"name", "method", "config"}:
            raise ValueError(f"{at}: expected a method name or {{name, method, config}}, got {entry!r}")
        method = entry.get("method", entry.get("name"))
        name = entry.get("name", method)
        if method not in recipe.METHODS:
            raise ValueError(f"{at}.method must be one of {recipe.METHODS}, got {method!r}")
        if not isinstance(name, str) or not name.isidentifier() or name in ("labels",):
            raise ValueError(f"{at}.name must be an identifier other than 'labels', got {name!r}")
        if name in seen:
            raise ValueError(f"{at}.name {name!r} is given twice: stage names are their directories")
        seen.add(name)
        own = entry.get("config") or {}
        if not isinstance(own, dict):
            raise ValueError(f"{at}.config must be a mapping of run-config keys, got {own!r}")
        entries.append((name, method, own))
    return entries


def _split_stage_overrides(overrides: Sequence[str], names: list[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {name: [] for name in names}
    for override in overrides:
        stage, _, rest = override.partition("/")
        if stage not in grouped or not rest:
            raise ValueError(f"override {override!r}: <stage>/key=value names a stage of the pipeline "
                             f"({', '.join(names)})")
        grouped[stage].append(rest)
    return grouped


def _evaluation(values: Any, where: str) -> dict[str, Any]:
    if not isinstance(values, dict) or set(values) - set(EVALUATION_KEYS):
        raise ValueError(f"{where}: pipeline.evaluation: expected a mapping of {', '.join(EVALUATION_KEYS)}, got "
                         f"{values!r}")
    evaluation = {"prompts": None, "samples_per_prompt": 1, "max_new_tokens": 32, "temperature": 1.0,
                  "batch_size": 16, "seed": 0, "judge": "vader", **values}
    for key in ("samples_per_prompt", "max_new_tokens", "batch_size"):
        if not isinstance(evaluation[key], int) or isinstance(evaluation[key], bool) or evaluation[key] < 1:
            raise ValueError(f"{where}: pipeline.evaluation.{key} must be an integer >= 1, got {evaluation[key]!r}")
    if evaluation["judge"] != "vader":
        raise ValueError(f"{where}: pipeline.evaluation.judge must be vader, got {evaluation['judge']!r}")
    return evaluation


def _stage(where: str, name: str, method: str, values: dict, own: dict, overrides: list[str], earlier: list[Stage],
           out: Path, base: recipe.ModelSpec, files: LabelFiles | None) -> Stage:
    at = f"{where}: stage {name} ({method})"
    stage_values = copy.deepcopy(values)
    sections = stage_values.pop("methods", None) or {}
    if not isinstance(sections, dict) or set(sections) - set(recipe.METHODS):
        raise ValueError(f"{where}: 'methods' must map some of {recipe.METHODS} to sections, got {sections!r}")
    stage_values = _merged(_merged(stage_values, sections.get(method) or {}), own)
    stage_values = recipe.apply_overrides(stage_values, overrides)
    given_model = _get(own, "model", "path") is not None or any(o.startswith("model.path=") for o in overrides)
    stage_values["method"] = method
    stage_values["output_dir"] = str(out / name)
    reads: list[str] = []
    exports = {stage.name: str(stage.export) for stage in earlier}
    stage_values = _replace_refs(stage_values, exports, reads, at)
    policy = next((s for s in reversed(earlier) if s.method in POLICY_METHODS), None)
    if policy is not None and not given_model and method != "tfpo" or method == "tfpo" and policy is not None:
        model = stage_values.setdefault("model", {})
        if not given_model:
            model["path"] = str(policy.export)
            model.pop("revision", None)
        if method == "tfpo":
            doctor = stage_values.setdefault("doctor", {})
            if doctor.get("patient") is None:
                doctor["patient"] = str(policy.export)
        reads.append(policy.name)
    if method in recipe.ONLINE_METHODS and stage_values.get("reward") is None:
        scorer = next((s for s in reversed(earlier) if s.method == "reward"), None)
        if scorer is None:
            raise ValueError(f"{at}: method {method} needs a reward and no reward stage comes before it: add a "
                             "reward stage earlier in pipeline.stages, or give the stage reward: {model: DIR} or "
                             "{function: vader} (config: {reward: ...})")
        stage_values["reward"] = {"model": str(scorer.export)}
        reads.append(scorer.name)
    _wire_data(stage_values, method, files, at)
    for stage in earlier:
        if stage.name in reads and not stage.config.export:
            raise ValueError(f"{at}: reads stage {stage.name}'s export, but that stage has export: false")
    try:
        config = recipe.load_run_config(stage_values, method=method)
    except ValueError as error:
        raise ValueError(f"{at}: {str(error).removeprefix('config: ')}") from None
    return Stage(name, config, tuple(dict.fromkeys(reads)))


def _wire_data(values: dict, method: str, files: LabelFiles | None, at: str) -> None:
    """``data``/``eval_data`` without a source read the labels (module docstring)."""
    data = values.setdefault("data", {})
    if not isinstance(data, dict):
        raise ValueError(f"{at}: data must be a mapping, got {data!r}")
    if data.get("source") not in (None, "") or data.get("sources") is not None:
        return
    if files is None:
        raise ValueError(f"{at}: data.source is not set and the pipeline has no labels section to read: give the "
                         "stage its data (config: {data: {source: FILE}}) or add pipeline.labels")
    online = method in recipe.ONLINE_METHODS
    if not online and files.format not in LABEL_KINDS[method]:
        raise ValueError(f"{at}: method {method} cannot train on the labels' {files.format} records (it takes "
                         f"{' or '.join(LABEL_KINDS[method])}): change pipeline.labels.format or give the stage its "
                         "own data.source")
    data["source"] = str(files.prompts_train if online else files.train)
    if not online:
        data["format"] = files.data_format()
    held_out = values.get("eval_data")
    if held_out is None or isinstance(held_out, dict) and held_out.get("source") is None:
        shared = {k: v for k, v in data.items() if k in ("max_length", "batch_size", "format", "dimension")}
        values["eval_data"] = {**shared, **(held_out or {}),
                               "source": str(files.prompts_eval if online else files.eval)}
        if online:
            values["eval_data"].pop("format", None)


def _replace_refs(value: Any, exports: Mapping[str, str], reads: list[str], at: str) -> Any:
    if isinstance(value, str) and value.startswith(STAGE_REF):
        name = value[len(STAGE_REF):]
        if name not in exports:
            raise ValueError(f"{at}: {value!r} names no earlier stage (earlier: {', '.join(exports) or 'none'})")
        reads.append(name)
        return exports[name]
    if isinstance(value, dict):
        return {key: _replace_refs(item, exports, reads, at) for key, item in value.items()}
    if isinstance(value, list):
        return [_replace_refs(item, exports, reads, at) for item in value]
    return value


def _get(values: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(values, dict):
            return None
        values = values.get(key)
    return values


def _merged(base: dict, update: Mapping) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(dict(merged[key]), value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# ------------------------------------------------------------------------------------------------ running


@contextlib.contextmanager
def directory_lock(out: Path):
    """Hold ``out/pipeline.lock`` (an exclusive ``flock``) while the pipeline runs: a second process that would
    write the same stages is refused with the holder's process id."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            raise ValueError(f"output_dir {out} is being written by process {holder} ({path}): wait for it to "
                             "finish, or give this pipeline another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def read_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    if not path.is_file():
        return {"stages": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg}): the record of finished stages is damaged; rerun "
                         "with --overwrite to start over") from None


def _write_state(out: Path, state: dict) -> None:
    path = out / STATE_FILE
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(state, indent=2, default=str) + "\n")
    os.replace(temporary, path)  # atomic: a kill never leaves half a record


def _fingerprint(pipeline: Pipeline, stage: Stage) -> dict[str, Any]:
    config = stage.config.to_dict()
    config["train"]["checkpoint"]["resume"] = False
    return {"config": json.loads(json.dumps(config, default=str)),
            "labels": None if pipeline.labels is None else pipeline.labels.settings()}


def run_pipeline(pipeline: Pipeline, *, overwrite: bool = False, log=print) -> dict[str, Any]:
    """Run every stage not yet finished (a finished one is skipped; an interrupted one resumes from its
    checkpoints), then evaluate the final policy and write the summary. Returns the summary."""
    from jaxalign.methods import common
    from jaxalign.methods import pipeline as single_run

    out = pipeline.output_dir
    with directory_lock(out):
        if overwrite:
            (out / STATE_FILE).unlink(missing_ok=True)
        elif not (out / STATE_FILE).is_file():
            held = [s.name for s in pipeline.stages if common.earlier_run(Path(s.config.output_dir))]
            if held:
                raise ValueError(f"output_dir {out} holds runs in {', '.join(held)} that no pipeline there recorded: "
                                 "choose another output_dir, or replace them with --overwrite")
        state = read_state(out)
        _write_state(out, state)  # from now on the stage directories are this pipeline's: a rerun resumes them
        for stage in pipeline.stages:
            done = state["stages"].get(stage.name, {})
            if done.get("status") == "done" and done.get("fingerprint") != _fingerprint(pipeline, stage):
                raise ValueError(f"stage {stage.name} in {stage.config.output_dir} finished with other settings "
                                 "(its config or the labels changed since): rerun with --overwrite to start over, or "
                                 "give the pipeline another output_dir")
        timings: dict[str, float] = {}
        label_counts = None
        if pipeline.labels is not None:
            started = time.perf_counter()
            label_counts = _labels(pipeline, log)
            timings["labels"] = time.perf_counter() - started
        results: dict[str, Any] = {}
        for index, stage in enumerate(pipeline.stages, 1):
            done = state["stages"].get(stage.name, {})
            if done.get("status") == "done":
                log(f"[{index}/{len(pipeline.stages)}] {stage.name} ({stage.method}): finished earlier, skipped")
                results[stage.name] = done
                continue
            resumed = (Path(stage.config.output_dir) / "checkpoints").is_dir() and not overwrite
            log(f"[{index}/{len(pipeline.stages)}] {stage.name} ({stage.method})"
                + (": resuming from its checkpoints" if resumed else "") + f" -> {stage.config.output_dir}")
            config = dataclasses.replace(stage.config, train=dataclasses.replace(
                stage.config.train, checkpoint=dataclasses.replace(stage.config.train.checkpoint,
                                                                   resume=not overwrite)))
            started = time.perf_counter()
            result = single_run.run(config, overwrite=overwrite)
            seconds = time.perf_counter() - started
            record = {"status": "done", "method": stage.method, "output_dir": stage.config.output_dir,
                      "export": None if result.export_dir is None else str(result.export_dir), "seconds": seconds,
                      "eval": result.eval_metrics, "fingerprint": _fingerprint(pipeline, stage)}
            state["stages"][stage.name] = results[stage.name] = record
            _write_state(out, state)
            del result
            if not pipeline.keep_checkpoints:  # the export feeds the next stage; the optimiser state is 2x the weights
                shutil.rmtree(Path(stage.config.output_dir) / "checkpoints", ignore_errors=True)
                log(f"    {stage.name}: finished; its checkpoints removed (pipeline.keep_checkpoints: false)")
        timings.update({name: record.get("seconds", 0.0) for name, record in results.items()})
        from jaxalign.methods.pipeline_summary import summarise

        return summarise(pipeline, results, label_counts, timings, log=log)


def _labels(pipeline: Pipeline, log) -> dict[str, Any]:
    from jaxalign.methods import common
    from jaxalign.methods.labels import make_labels

    files = pipeline.label_files
    log(f"[labels] {pipeline.labels.samples} samples per prompt from the base model, judged by "
        f"{pipeline.labels.judge} -> {files.directory} ({pipeline.labels.format})")
    model, tokenizer = common.load_pretrained(pipeline.base)
    _, counts = make_labels(pipeline.labels, files.directory, model, tokenizer)
    for split, count in counts.items():
        log(f"         {split}: {count['records']} records from {count['prompts']} prompts "
            f"(left out: {count['left_out']})")
    return counts


# ------------------------------------------------------------------------------------------------ command


def add_pipeline_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "pipeline", help="run the stages of a pipeline file (labels -> sft -> reward -> ppo, sft -> dpo, ...) as one "
                         "command, resumable, with a summary",
        description="Run a pipeline preset (shipped: " + ", ".join(pipeline_presets()) + ") or YAML file: "
                    "each stage's export feeds the next; a rerun skips finished stages and resumes the interrupted "
                    "one; the final policy is evaluated against the SFT model and the base (docs/pipelines.md).")
    parser.add_argument("--config", required=True,
                        help="a pipeline preset name or a YAML file with a pipeline: section")
    parser.add_argument("--smoke", action="store_true", help="merge the file's smoke: section over it (tiny steps)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over: rerun every stage, replacing what output_dir holds")
    parser.add_argument("--print-config", action="store_true", help="print every stage's resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="key=value for every stage (or pipeline.*), <stage>/key=value for one")
    parser.set_defaults(run=run_pipeline_command)


def pipeline_presets() -> list[str]:
    """The shipped presets that hold a pipeline: section."""
    return [name for name in recipe.preset_names()
            if "pipeline" in (yaml.safe_load((recipe.PRESETS / f"{name}.yaml").read_text(encoding="utf-8")) or {})]


def run_pipeline_command(args) -> int:
    pipeline = load_pipeline(args.config, args.overrides, smoke=args.smoke)
    if args.print_config:
        print(json.dumps(pipeline.to_dict(), indent=2, default=str))
        return 0
    run_pipeline(pipeline, overwrite=args.overwrite)
    return 0
