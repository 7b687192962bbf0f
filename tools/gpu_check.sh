#!/usr/bin/env bash
# The first thing to run on a machine with a CUDA GPU: every CUDA path at once, in about 10 minutes.
#   1. the test suite's CUDA cases (sparsemax and the FDT backward vs the CPU, bf16 / fp16 / fp32 steps)
#   2. bench.py on CUDA: the base preset's step time, samples/s, model FLOPs utilisation, peak memory
#   3. a 200-step base run (ViT-B/32, 16384 FDT tokens) on the shapes world, bf16
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -m cuda -q
python -m tools.bench --device cuda
python train.py --preset base --steps 200 --device cuda --out runs/gpu-check
