#!/usr/bin/env bash
# The GPU checks in one run, for a lent H100/H200 (the device tool): each stage under its own time limit, so
# one that fails or overruns leaves the others' results. Run from the repository root:
#
#   bash benchmarks/gpu_suite.sh OUTDIR [STAGE ...]     # stages: env train512 tests sample64 train2048 sample1
#
# OUTDIR receives the result JSONs, log.txt (every stage's output but the tests') and tests.log (PNGs are
# redrawn from the JSONs afterwards: the device tool returns 8 files at most).
# Uses the machine's own python3 (JAX with CUDA, torch, transformers); jaxalign runs from this checkout.
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUTDIR [STAGE ...]}
shift
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(env train512 tests sample64 train2048 sample1)
mkdir -p "$out"
scratch=$(mktemp -d)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=/dev/shm XLA_PYTHON_CLIENT_PREALLOCATE=false
export TQDM_MININTERVAL=5  # fewer progress-bar lines in the logs

run() {  # run NAME SECONDS COMMAND...: the command's output into the log, its status and time after it
  local name=$1 limit=$2 start=$SECONDS log=$out/log.txt
  shift 2
  [ "$name" = tests ] && log=$out/tests.log
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  timeout "$limit" "$@" >"$scratch/$name.log" 2>&1
  local status=$?
  cat "$scratch/$name.log" >>"$log"
  echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$log"
  tail -n 25 "$scratch/$name.log"
}

train() {  # train LENGTH SECONDS: DPO and SFT steps of a random Llama 3.2 1B, bf16 compute, float32 weights
  run "train$1" "$2" python3 benchmarks/train_throughput.py --random-weights --config llama-1b --dtype bfloat16 \
    --data synthetic --synthetic-length "$1" --max-length "$1" --torch-side plain --steps 5 --warmup 2 \
    --no-breakdown --output-dir "$scratch"
}

sample() {  # sample BATCH NEW_TOKENS SECONDS: the rollout engine against transformers generate, bf16
  run "sample$1" "$3" python3 benchmarks/sampling_throughput.py --random-weights --config llama-1b \
    --dtype bfloat16 --batch "$1" --new-tokens "$2" --repeats 3 --output "$scratch/sampling_throughput_gpu_b$1.json"
}

for stage in "${stages[@]}"; do
  case $stage in
    env) run env 60 bash -c 'nvidia-smi -L; python3 -c "
import jax, flax, optax, orbax.checkpoint, transformers, torch
print(\"jax\", jax.__version__, jax.devices(), \"flax\", flax.__version__, \"optax\", optax.__version__,
      \"transformers\", transformers.__version__, \"torch\", torch.__version__, torch.cuda.is_available())"' ;;
    train512) train 512 150 ;;
    train2048) train 2048 130 ;;
    # The model, loss, sampler and training-step tests; float32 products at full precision (parity tolerances).
    tests) JAX_DEFAULT_MATMUL_PRECISION=highest run tests 120 python3 -m pytest -v -p no:cacheprovider -n 8 \
      --timeout 100 --continue-on-collection-errors tests/losses tests/models tests/rollout tests/train ;;
    sample64) sample 64 64 90 ;;
    sample1) sample 1 128 60 ;;
    *) echo "unknown stage $stage" ;;
  esac
  cp "$scratch"/*.json "$out"/ 2>/dev/null
done
