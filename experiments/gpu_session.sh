#!/usr/bin/env bash
# One GPU-machine session: environment, GPU exactness tests, host AdamW rate, step benchmarks.
# usage: bash experiments/gpu_session.sh PART OUTDIR   (PART: a = checks + tests + small runs, b = 6B runs,
#   c = 6B batch 64, d = 13B hand plan on three tiers, e = store bench + 13B with the planner's plan,
#   f = the largest model the plan fits: 13B shape with 46 layers, batch 1,
#   g = XLA's GPU allocator (bfc | vmm | cuda_async) vs the 24 GiB pool's fragmentation, the planner's 6B plans)
set -u
part=${1:-a}; out=${2:-/tmp/gpu_out}; mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1  # XLA's pinned cap: bench_step sets it from each run's plan
log() { echo "== $(date +%T) $*"; }
if [ "$part" = a ]; then
  log env; { nvidia-smi --query-gpu=name,memory.total --format=csv; nproc; free -g; df -h /tmp | tail -1;
    python3 -c "import jax, numba, flax, optax, sys; print(sys.version, jax.__version__, jax.devices(), numba.__version__, flax.__version__, optax.__version__)"; } 2>&1 | tee "$out/env.txt"
  log gpu tests; timeout 300 python3 -m pytest -q -m gpu tests/test_engine.py -W ignore::UserWarning -p no:cacheprovider > "$out/gpu_tests.log" 2>&1; tail -3 "$out/gpu_tests.log"
  log host adam; timeout 120 python3 experiments/host_adam_bench.py --out "$out/host_adam.jsonl" > "$out/host_adam.log" 2>&1; tail -8 "$out/host_adam.log"
  log reference 1.3B; timeout 150 python3 experiments/bench_step.py --system reference --model gpt3-1.3b --batch 8 --steps 6 \
    --experiment reference_throughput --out "$out/reference_throughput.jsonl" > "$out/ref13.log" 2>&1; tail -4 "$out/ref13.log"
fi
if [ "$part" = b ]; then
  log gpu bf16 tests; timeout 120 python3 -m pytest -q -m gpu tests/test_engine.py -k bf16 -W ignore::UserWarning -p no:cacheprovider > "$out/gpu_tests_bf16.log" 2>&1; tail -2 "$out/gpu_tests_bf16.log"
  log reference 1.3B; timeout 150 python3 experiments/bench_step.py --system reference --model gpt3-1.3b --batch 8 --steps 6 \
    --experiment reference_throughput --out "$out/reference_throughput.jsonl" > "$out/ref13.log" 2>&1; tail -4 "$out/ref13.log"
  for b in 8 64; do
    act=recompute; [ "$b" = 64 ] && act=recompute+swap_input
    log 6B batch $b; timeout 280 python3 experiments/bench_step.py --system lohan_jax --model paper-6b --batch $b --steps 4 \
      --gpu-budget-gib 24 --activations $act --experiment engine_throughput --out "$out/engine_throughput.jsonl" \
      --timeline "$out" > "$out/engine6b_b$b.log" 2>&1; grep -E "step [0-9]|engine ready|Error|error" "$out/engine6b_b$b.log" | tail -8
  done
fi
if [ "$part" = c ]; then  # batch 64 on the 24 GiB card: blocks run in 8 slices of 8; the first 16 block inputs go to host
  log 6B batch 64; timeout 400 python3 experiments/bench_step.py --system lohan_jax --model paper-6b --batch 64 \
    --steps 4 --gpu-budget-gib 24 --activations recompute+chunks=8 --swap-input-blocks 16 --experiment engine_throughput \
    --out "$out/engine_throughput.jsonl" --timeline "$out" > "$out/engine6b_b64.log" 2>&1
  grep -E "step [0-9]|engine ready|Error|error" "$out/engine6b_b64.log" | tail -8
fi
if [ "$part" = d ]; then  # paper-13b on all three tiers: last 12 blocks in HBM (GPU AdamW), 15:28 on disk, rest host
  # XLA's pinned pool (a BFC allocator) grows by doubling regions up to its limit and never shrinks: cap it at
  # the plan's pinned need (17.6 GB of streamed weights + 12 GB of gradients in flight) plus a margin. (The OOM
  # kills of 2026-11-25 were a leak of disk units' state, since fixed; the cap keeps the pool to the plan.)
  log 13B three tiers; XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=32 timeout 560 python3 experiments/bench_step.py --system lohan_jax --model paper-13b --batch 8 \
    --steps 3 --gpu-state-blocks 12 --disk-state-blocks 15:28 --disk-path /tmp/lohan_state --prefetch 1 \
    --measure-disk-gib 4 --experiment largest_model --out "$out/largest_model.jsonl" --timeline "$out" --no-peak --mem-trace "$out/mem13b.jsonl" \
    > "$out/engine13b.log" 2>&1; grep -E "step [0-9]|engine ready|raw disk|Error|error" "$out/engine13b.log" | tail -8
  free -g | head -2; df -h /tmp | tail -1
fi
if [ "$part" = e ]; then  # issue 4: the disk tier tuned, then paper-13b with the planner's own plan
  log store bench; timeout 90 python3 experiments/store_bench.py --path /tmp/lohan_sb --units 2 --unit-gib 1 \
    --out "$out/store_bench.jsonl" > "$out/store_bench.log" 2>&1; tail -8 "$out/store_bench.log"; rm -rf /tmp/lohan_sb
  best=$(grep '^best:' "$out/store_bench.log" | tail -1); mode=$(echo "$best" | sed -n 's/.*io_mode=\([a-z]*\).*/\1/p')
  conc=$(echo "$best" | sed -n 's/.*io_concurrency=\([0-9]*\).*/\1/p')
  limit=$(python3 - <<'PY'
import sys; sys.path.insert(0, "experiments"); import study_runner as sr
v = sr.planner_verdict("paper-13b", 8, 0.0); v["plan"].save("/tmp/plan13.json"); print(v["pinned_limit_gb"])
PY
)
  log 13B planner plan, io_mode=${mode:-default} concurrency=${conc:-8}, pinned cap ${limit} GB
  left=$((585 - SECONDS)); log "13B time limit ${left} s"
  timeout $left python3 experiments/bench_step.py --system lohan_jax --model paper-13b --batch 8 --steps 4 --lr 1e-5 \
    --plan-file /tmp/plan13.json --disk-path /tmp/lohan_state --pinned-limit-gb "$limit" --disk-io-mode "${mode:-default}" \
    --disk-io-concurrency "${conc:-8}" --measure-disk-gib 4 --experiment largest_model --out "$out/largest_model.jsonl" \
    --timeline "$out" --no-peak --mem-trace "$out/mem13b.jsonl" > "$out/engine13b.log" 2>&1
  grep -E "step [0-9]|engine ready|raw disk|Error|error" "$out/engine13b.log" | tail -8; free -g | head -2
fi
if [ "$part" = f ]; then  # issue 4: the largest model the plan fits on this machine (paper-13b's shape, 46 layers, batch 1)
  plan=experiments/results/largest_model_plans/paper-13b-46l-b1.json; df -h /tmp | tail -1
  log 14.7B planner plan; timeout $((585 - SECONDS)) python3 experiments/bench_step.py --system lohan_jax --model paper-13b \
    --layers 46 --batch 1 --steps 3 --lr 1e-5 --plan-file $plan --disk-path /tmp/lohan_state --pinned-limit-gb 38 \
    --measure-disk-gib 4 --experiment largest_model --out "$out/largest_model.jsonl" --timeline "$out" --no-peak \
    --mem-trace "$out/mem14b.jsonl" > "$out/engine14b.log" 2>&1
  grep -E "step [0-9]|engine ready|raw disk|Error|error" "$out/engine14b.log" | tail -8; free -g | head -2
fi
if [ "$part" = g ]; then  # the study's 6B b16/b32/b64 plans at 24 GiB failed under BFC (a contiguous jit_bwd temp)
  pl=experiments/results/allocator_check/plans; export XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=120
  for spec in "16 vmm 29" "16 cuda_async 29" "16 bfc 29" "64 vmm 43" "32 vmm 35"; do
    set -- $spec; left=$((590 - SECONDS)); [ $left -lt 60 ] && break
    log "6B b$1 24 GiB allocator $2 (${left} s left)"
    TF_CPP_MIN_LOG_LEVEL=$([ "$2" = bfc ] && echo 0 || echo 1) timeout $((left < 170 ? left : 170)) python3 experiments/bench_step.py \
      --system lohan_jax --model paper-6b --batch $1 --steps 3 --gpu-budget-gib 24 --no-peak --plan-file $pl/paper-6b-b$1-24gib.json \
      --pinned-limit-gb $3 --allocator $2 --experiment allocator_check --out "$out/allocator_check.jsonl" > "$out/b$1_$2.log" 2>&1
    grep -E "^step [0-9]|RESOURCE_EXHAUSTED|Error" "$out/b$1_$2.log" | head -4 | cut -c1-300
  done
  python3 - "$out/allocator_check.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print({k: r.get(k) for k in ("batch_tokens", "allocator", "status", "step_s", "tokens_per_s", "hbm_limit_gib",
                                 "hbm_peak_gib", "hbm_largest_free_block_gib")})
PY
fi
python3 - "$out" <<'PY'
import json, sys, glob
for f in sorted(g for g in glob.glob(sys.argv[1] + "/*.jsonl") if not g.split("/")[-1].startswith("mem")):
    for line in open(f):
        r = json.loads(line)
        print(f.split("/")[-1], {k: r.get(k) for k in ("system", "model", "batch_tokens", "step_s", "tokens_per_s",
              "tflops_6n", "fraction_of_block_peak", "params_per_s", "threads", "status", "error") if r.get(k) is not None})
PY
