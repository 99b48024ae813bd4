#!/usr/bin/env bash
# Every GPU figure BENCHMARKS.md still lacks, in one run sized for ~10 minutes on one H100/H200-class GPU.
#
#   tools/gpu_benchmarks.sh OUT_DIR [OFFICIAL_CHECKOUT]
#
# OUT_DIR receives one JSON per measurement (7) and one log.txt with everything printed (the device tool brings
# back at most 8 files from $OUT, so the steps share one log; each JSON lands when its step ends, so a run
# stopped by a time limit still returns the steps it finished). OFFICIAL_CHECKOUT
# (a checkout of LeapLabTHU/FLatten-Transformer) adds the side-by-side ratios; without it those rows are
# skipped and the script says so. Wheels in .whl/ (e.g. yacs, termcolor for a bare machine) are installed
# first. Each step runs even if an earlier one failed; the exit status is the number of failed steps.
#
# Without a GPU, so that a session's few minutes on one are not lost to a typo:
#   GPU_BENCH_DRY_RUN=args  checks every step's arguments (configs load, the official checkout holds them,
#                           the gpu tests collect) in about a minute; tests/test_benchmark.py runs this in CI;
#   GPU_BENCH_DRY_RUN=cpu   runs every step for real on the CPU in the benchmark's smoke mode (batch 2, one
#                           repeat, the official code included): about 11 minutes on 2 cores.
set -uo pipefail
command -v python > /dev/null || python() { python3 "$@"; }      # some images have python3 alone
out=${1:?usage: tools/gpu_benchmarks.sh OUT_DIR [OFFICIAL_CHECKOUT]}
official=${2:-}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
failed=0
log=$out/log.txt
step() {  # step NAME COMMAND...: run, append its output to OUT_DIR/log.txt, count failures
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$log"
    "$@" 2>&1 | tee -a "$log" || { echo "=== $name FAILED" | tee -a "$log"; failed=$((failed + 1)); }
}
case "${GPU_BENCH_DRY_RUN:-}" in
    '') device=(--device cuda); collect=() ;;
    args) device=(--device cpu --check); collect=(--collect-only) ;;
    cpu) device=(--device cpu --smoke); collect=(--collect-only) ;;
    *) echo "GPU_BENCH_DRY_RUN=$GPU_BENCH_DRY_RUN: use 'args' or 'cpu' (or leave it unset on a GPU)"; exit 2 ;;
esac
if [ -z "${GPU_BENCH_DRY_RUN:-}" ]; then
    if compgen -G '.whl/*.whl' > /dev/null; then          # a site of their own, as the device README advises
        python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    python -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name())' \
        || exit 1
    nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv 2>&1 | tee -a "$log" || true
fi

# correctness on the GPU first: every test marked gpu (Triton kernels compiled for real, nccl, float16)
gpu_files=$(grep -l 'mark\.gpu' tests/*.py)                     # the files that hold gpu-marked tests
step cuda_tests python -m pytest -q -m gpu "${collect[@]}" $gpu_files

# the GPU half of the paper's Fig. 7 (float32, 224 px, as published): batch-1 latency and batch-64 time per
# batch (throughput = 64 / latency), FLatten-PVT/Swin against their softmax baselines (+ the official code)
fig7=(python tools/latency.py "${device[@]}" --warmup 10 --repeats 30 --rounds 3 ${official:+--reference "$official"})
step fig7_batch1 "${fig7[@]}" --batch 1 --json "$out/fig7_batch1.json"
step fig7_batch64 "${fig7[@]}" --batch 64 --json "$out/fig7_batch64.json"

bench=(python tools/benchmark.py "${device[@]}" --dtype bfloat16 --batch 128 --warmup 3 --repeats 10)
if [ -n "$official" ]; then
    step vs_official "${bench[@]}" --cfgs cfgs/flatten_swin_t.yaml cfgs/flatten_pvt_v2_b0.yaml \
        cfgs/flatten_cswin_t.yaml --reference "$official" --reference-dtype float16 --rounds 3 \
        --json "$out/vs_official.json"
else
    echo '=== vs_official skipped: no OFFICIAL_CHECKOUT given' | tee -a "$log"
    step ours "${bench[@]}" --cfgs cfgs/flatten_swin_t.yaml cfgs/flatten_pvt_v2_b0.yaml cfgs/flatten_cswin_t.yaml \
        --json "$out/ours.json"
fi
step vs_timm "${bench[@]}" --cfgs cfgs/flatten_swin_t.yaml timm:swin_tiny_patch4_window7_224 cfgs/dat_tiny.yaml \
    --alternate --rounds 3 --json "$out/vs_timm.json"
step triton "${bench[@]}" --cfgs cfgs/flatten_swin_t.yaml --attention-impl triton --json "$out/triton.json"
step sweep python tools/benchmark.py "${device[@]}" --dtype bfloat16 --batch 32 --warmup 3 --repeats 10 \
    --sweep-resolution --cfgs cfgs/flatten_pvt_v2_b0.yaml 'timm:pvt_v2_b0,sr_ratios=(1,1,1,1)' \
    --json "$out/sweep.json"
step op_neighborhood python tools/benchmark.py "${device[@]}" --op neighborhood_attention --batch 32 --warmup 3 \
    --repeats 10 --json "$out/neighborhood.json"
echo "=== done, $failed step(s) failed; results in $out" | tee -a "$log"
exit "$failed"
