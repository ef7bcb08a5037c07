#!/usr/bin/env bash
# The GPU checks in one run, for a lent H100/H200 (the device tool): each stage under its own time limit, so
# one that fails or overruns leaves the others' results. Run from the repository root:
#
#   bash benchmarks/gpu_suite.sh OUTDIR [STAGE ...]
#
# stages: env train512 tests sample64 train2048 sample1 attention train512grouped train2048grouped
#
# The stages' limits add up to more than one device call's 10 minutes: run them over two calls.
# OUTDIR receives the result JSONs (the training ones named by jaxalign's attention), log.txt (every stage's output but the tests') and tests.log (PNGs are
# redrawn from the JSONs afterwards: the device tool returns 8 files at most).
# Uses the machine's own python3 (JAX with CUDA, torch, transformers); jaxalign runs from this checkout. Wheels
# in .whl/ (carried: trl, datasets, dill, multiprocess for the TRL parity tests) are installed first. TESTS
# overrides the test selection.
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUTDIR [STAGE ...]}
shift
stages=("$@")
known=" env train512 tests sample64 train2048 sample1 attention train512grouped train2048grouped "
[ ${#stages[@]} -gt 0 ] || stages=($known)
for stage in "${stages[@]}"; do  # a misspelt stage would cost device time for nothing: refuse it at once
  [[ $known == *" $stage "* ]] || { echo "unknown stage '$stage'; the stages are:$known" >&2; exit 2; }
done
mkdir -p "$out"
failed=()
scratch=$(mktemp -d)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TMPDIR=/dev/shm XLA_PYTHON_CLIENT_PREALLOCATE=false
export TQDM_MININTERVAL=5  # fewer progress-bar lines in the logs
# PyTorch shares the GPU with JAX in the training benchmark: let its cache grow in place, not in new blocks.
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

run() {  # run NAME SECONDS COMMAND...: the command's output into the log, its status and time after it
  local name=$1 limit=$2 start=$SECONDS log=$out/log.txt
  shift 2
  [ "$name" = tests ] && log=$out/tests.log
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  timeout -k 10 "$limit" "$@" >"$scratch/$name.log" 2>&1
  local status=$?
  [ $status -eq 0 ] || failed+=("$name (exit $status)")
  cat "$scratch/$name.log" >>"$log"
  echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$log"
  tail -n 25 "$scratch/$name.log"
}

train() {  # train LENGTH BATCH SECONDS [ATTENTION]: DPO and SFT steps of a random Llama 3.2 1B, bf16 compute,
  # float32 weights; ATTENTION (auto, grouped, cudnn) is jaxalign's attention, named in the result files
  # (train_throughput_gpu_len512_auto.json...), so that no run overwrites another's
  local attention=${4:-auto}
  local dir=$scratch/$attention
  mkdir -p "$dir"
  run "train$1${4:-}" "$3" python3 benchmarks/train_throughput.py --random-weights --config llama-1b \
    --dtype bfloat16 --data synthetic --synthetic-length "$1" --batch "$2" --torch-side plain --steps 5 --warmup 2 \
    --no-breakdown --attention "$attention" --output-dir "$dir"
  for f in "$dir"/*.json; do [ -e "$f" ] && mv "$f" "$scratch/$(basename "$f" .json)_$attention.json"; done
}

sample() {  # sample BATCH NEW_TOKENS SECONDS: the rollout engine against transformers generate, bf16
  run "sample$1" "$3" python3 benchmarks/sampling_throughput.py --random-weights --config llama-1b \
    --dtype bfloat16 --batch "$1" --new-tokens "$2" --repeats 3 \
    --output "$scratch/sampling_throughput_gpu_llama-1b_bf16_b$1.json"
}

for stage in "${stages[@]}"; do
  case $stage in
    env) run env 60 bash -c 'nvidia-smi -L; python3 -c "
import jax, flax, optax, orbax.checkpoint, transformers, torch
print(\"jax\", jax.__version__, jax.devices(), \"flax\", flax.__version__, \"optax\", optax.__version__,
      \"transformers\", transformers.__version__, \"torch\", torch.__version__, torch.cuda.is_available())"' ;;
    train512) train 512 4 150 ;;
    # Batch 2: at 4 pairs of 2048 tokens the PyTorch side ran out of the H200's memory beside JAX's.
    train2048) train 2048 2 110 ;;
    # The attention before cuDNN's (auto picks cuDNN for these rows): the comparison in docs/gpu.md.
    train512grouped) train 512 4 150 grouped ;;
    train2048grouped) train 2048 2 110 grouped ;;
    # One layer's attention forward and backward per kernel (grouped, cuDNN, PyTorch SDPA per backend).
    attention) run attention 180 python3 benchmarks/attention_kernels.py --lengths 512,2048 \
      --output "$scratch/attention_kernels_gpu.json" ;;
    # The model, loss, sampler and training-step tests; float32 products at full precision (parity tolerances).
    # shellcheck disable=SC2086  # TESTS is a list of paths
    tests) JAX_DEFAULT_MATMUL_PRECISION=highest run tests 150 python3 -m pytest -v -p no:cacheprovider -n 12 \
      --timeout 100 --continue-on-collection-errors ${TESTS:-tests/losses tests/models tests/rollout tests/train} ;;
    sample64) sample 64 64 90 ;;
    sample1) sample 1 64 120 ;;  # 50 s did not cover loading, two compilations and the matmul bound
  esac
  cp "$scratch"/*.json "$out"/ 2>/dev/null
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed or timed out: ${failed[*]}"
  exit 1
fi
