#!/usr/bin/env bash
# The GPU measurements that benchmarks/RESULTS.md records, on one CUDA device (H100/H200 class):
#   1. workload W (Qwen2.5-0.5B shape, random init, bf16, 8 prompts x G=8, 64-token prompts,
#      256-token completions, the controlled reward: every group has signal): grpo_lab GRPO,
#      PPO-head and PPO-critic, standard and at matched updates (*_matched), against TRL's
#      GRPOTrainer, each in its own process, with per-phase times and peak memory;
#   2. grpo_lab's GRPO step on W with LoRA (r=16) for peak memory against full fine-tuning (1.);
#   3. grpo_lab's GRPO step on W with the static-cache rollout engine, eager and compiled (CUDA
#      graphs; the first step compiles), against the default shared-prefix engine (1.).
# Needs torch, transformers, accelerate, peft and (for TRL) trl and datasets.
# Usage: bash benchmarks/gpu_suite.sh [OUT_DIR]          (about 8-10 minutes on one H100/H200)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python benchmarks/step_bench.py --preset w0.5b --steps 3 --warmup 1 \
    --out "$out/w0.5b.json" 2>&1 | tee "$out/w0.5b.log"
python benchmarks/step_bench.py --preset w0.5b --steps 3 --warmup 1 --impls grpo \
    --set model.lora.r=16 --out "$out/w0.5b_lora.json" 2>&1 | tee "$out/w0.5b_lora.log"
for backend in static compiled; do
    python benchmarks/step_bench.py --preset w0.5b --steps 3 --warmup 2 --impls grpo \
        --set rollout.backend=$backend --out "$out/w0.5b_$backend.json" 2>&1 \
        | tee "$out/w0.5b_$backend.log"
done
