"""Memory plans of Llama-3-8B and Llama-3-70B runs (``jaxalign plan``), the table of docs/models.md.

Each row is ``jaxalign plan --json`` in a fresh process: the method's step lowered and compiled by XLA:CPU on
emulated devices from the model's published ``config.json`` (tests/methods/model_configs/), no weight read. Rows:
Llama-3-8B SFT, DPO and PPO full bf16 on 8 devices (FSDP), LoRA bf16 and QLoRA nf4 on one device, Llama-3-70B
QLoRA on one and on eight devices; every row fitted against H100 80GB, and the 70B one-device rows against H200
too. 1024-token sequences; 8 sequences (SFT) or pairs (DPO) a step on eight devices, 2 on one. PPO (the
``sentiment_ppo`` preset: a frozen reference, a separate critic, VADER as the reward, so no reward model on the
device): 8 prompts of 768 tokens and 256 new ones an iteration, one minibatch of 8 rows; its sampling loop,
scoring pass and update each compiled.

    python benchmarks/plan_table.py            # writes benchmarks/results/plan_table.json
    python benchmarks/plan_table.py --rows "llama-3-8b ppo full bf16"     # one row, the file's others kept
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import provenance  # benchmarks/provenance.py: run as `python benchmarks/plan_table.py`

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "tests" / "methods" / "model_configs"
BF16 = ["model.param_dtype=bfloat16", "model.compute_dtype=bfloat16", "data.buckets=null", "data.max_length=1024"]
LORA = "model.lora={rank: 16, alpha: 32, targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}"
NF4 = "model.quantize={type: nf4, compute_dtype: bfloat16}"
PRESETS = {"ppo": "sentiment_ppo"}  # the online methods' presets (sampling, reward, loss); others "sentiment"
PPO = ["reference=model", "loss.critic=separate", "loss.num_minibatches=1", "reward={function: vader}",
       "data.max_length=768", "sampling={max_new_tokens: 256, temperature: 1.0}"]
# (model, method, setting, mesh, global batch, device, overrides)
ROWS = [
    ("llama-3-8b", "dpo", "QLoRA nf4", None, 2, "h100-80gb", [LORA, NF4, "reference=lora_base"]),
    ("llama-3-70b", "dpo", "QLoRA nf4", None, 2, "h200", [LORA, NF4, "reference=lora_base"]),
    ("llama-3-8b", "dpo", "full bf16", "fsdp=8", 8, "h100-80gb", ["reference=model"]),
    ("llama-3-8b", "dpo", "LoRA bf16", None, 2, "h100-80gb", [LORA, "reference=lora_base"]),
    ("llama-3-70b", "dpo", "QLoRA nf4", "fsdp=8", 8, "h100-80gb", [LORA, NF4, "reference=lora_base"]),
    ("llama-3-8b", "sft", "full bf16", "fsdp=8", 8, "h100-80gb", []),
    ("llama-3-8b", "ppo", "full bf16", "fsdp=8", 8, "h100-80gb", PPO),
    ("llama-3-8b", "sft", "QLoRA nf4", None, 2, "h100-80gb", [LORA, NF4]),
    ("llama-3-8b", "sft", "LoRA bf16", None, 2, "h100-80gb", [LORA]),
    ("llama-3-70b", "sft", "QLoRA nf4", None, 2, "h200", [LORA, NF4]),
    ("llama-3-70b", "sft", "QLoRA nf4", "fsdp=8", 8, "h100-80gb", [LORA, NF4]),
]


def plan(model: str, method: str, mesh: str | None, batch: int, device: str, overrides: list[str]) -> dict:
    command = [sys.executable, "-m", "jaxalign.cli", "plan", "--config", PRESETS.get(method, "sentiment"),
               "--method", method,
               "--model-config", str(CONFIGS / f"{model}.json"), "--device", device, "--json",
               *(["--mesh", mesh] if mesh else []), *BF16, f"data.batch_size={batch}", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout[result.stdout.index("{"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=RESULTS / "plan_table.json")
    parser.add_argument("--rows", nargs="+", metavar="'MODEL METHOD SETTING MESH'",
                        help="only these rows (e.g. 'llama-3-8b ppo full bf16 fsdp=8', 'llama-3-70b dpo QLoRA nf4 1 "
                             "device'); the output file's other rows are kept")
    args = parser.parse_args()
    # The mesh is part of a row's name: 70B QLoRA is planned on one device and on eight.
    names = {f"{model} {method} {setting} {mesh or '1 device'}": (model, method, setting, mesh, *rest)
             for model, method, setting, mesh, *rest in ROWS}
    unknown = sorted(set(args.rows or ()) - set(names))
    if unknown:
        parser.error(f"--rows: no row {unknown[0]!r} (rows: {', '.join(names)})")
    chosen = [names[name] for name in args.rows] if args.rows else ROWS
    kept = []
    if args.rows and args.output.is_file():
        kept = [row for row in json.loads(args.output.read_text())["rows"]
                if f"{row['model']} {row['method']} {row['setting']} {row['mesh']}" not in args.rows]
    rows = []
    for model, method, setting, mesh, batch, device, overrides in chosen:
        start = time.perf_counter()
        result = plan(model, method, mesh, batch, device, overrides)
        rows.append({"model": model, "method": method, "setting": setting, "mesh": mesh or "1 device",
                     "batch": batch, "tokens": 1024, "device": device, "overrides": overrides, "plan": result,
                     "seconds": round(time.perf_counter() - start, 1)})
        gib = result["total"] / 2**30
        print(f"{model:12} {method:4} {setting:10} {mesh or '1 device':9} {device:10} {gib:8.1f} GiB "
              f"{'fits' if result['fits'] else 'does not fit'}", flush=True)
        provenance.write_result(args.output, "plan_table", rows=kept + rows)  # after every row: each takes minutes
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
