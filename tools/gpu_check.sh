#!/usr/bin/env bash
# The first thing to run on a machine with a CUDA GPU: every CUDA path at once, then one table
# (pass / FAIL and seconds per check; each check's output in runs/gpu-check/logs/).
#   tests      the test suite's CUDA cases (sparsemax and the FDT backward vs the CPU, bf16 / fp16 /
#              fp32 steps that must update the weights, a step with CUDA's sync debug mode on error)
#   bench      bench.py --quick on CUDA: sparsemax (sort vs top-k), step time, MFU, peak memory
#   base bf16  200 steps of the base preset (ViT-B/32, 16384 FDT tokens) on the shapes world
#   mocov2     the paper's augmentation on the GPU, with 2 loader threads
#   compile    --compile, with graph breaks logged (the count is in the table)
#   paper      --recipe paper (base, fp32 with TF32, 224 px cache) for 5 steps at batch 64
#   ddp nccl   torchrun on 2 GPUs, 20 steps of the tiny preset (its stem's BatchNorm sums its
#              statistics over the processes; only where there are two GPUs)
set -uo pipefail
cd "$(dirname "$0")/.."
out=runs/gpu-check
rm -rf "$out"                          # each check starts afresh
logs=$out/logs
mkdir -p "$logs"
rows=()
failed=0

check() {  # check NAME COMMAND...: run it, log its output, add a row to the table
    local name=$1 start=$SECONDS status=pass note=""
    shift
    "$@" > "$logs/${name// /-}.log" 2>&1 || { status=FAIL; failed=1; }
    if [[ $name == compile ]]; then
        note="$(grep -c "Graph break" "$logs/compile.log") graph breaks"
    fi
    rows+=("$(printf '%-10s %-5s %6ds  %s' "$name" "$status" $((SECONDS - start)) "$note")")
    echo "${rows[-1]}"
}

check tests python -m pytest -m cuda -q
check bench python -m tools.bench --device cuda --quick
check "base bf16" python train.py --preset base --steps 200 --device cuda --out $out/base
check mocov2 python train.py --preset small --augment mocov2 --workers 2 --steps 50 --device cuda \
    --out $out/mocov2
check compile env TORCH_LOGS=graph_breaks python train.py --preset small --compile --steps 50 \
    --device cuda --out $out/compile
check paper python train.py --recipe paper --batch-size 64 --steps 5 --device cuda --out $out/paper
if [[ $(python -c "import torch; print(torch.cuda.device_count())") -ge 2 ]]; then
    check "ddp nccl" torchrun --standalone --nproc_per_node=2 train.py --preset tiny --steps 20 \
        --batch-size 64 --out $out/ddp
fi

echo
echo "gpu check on $(python -c "import torch; print(torch.cuda.get_device_name())")"
printf '%-10s %-5s %7s  %s\n' check state time note
printf '%s\n' "${rows[@]}"
exit $failed
