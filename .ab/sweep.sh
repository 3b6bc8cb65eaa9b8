#!/bin/bash
# Device pass 1: operand-arrangement sweeps (weights_left, fused_gate_up) for W8A16 and bf16.
export PYTHONPATH=src
POINTS=qwen3-30b-a3b:16,qwen3-30b-a3b:64,qwen3-30b-a3b:256,qwen3-30b-a3b:1024,qwen3-30b-a3b:4096,deepseek-v2-lite:16,deepseek-v2-lite:64,deepseek-v2-lite:4096,olmoe-1b-7b:16,olmoe-1b-7b:1024,olmoe-1b-7b:4096,mixtral-8x7b:16,mixtral-8x7b:4096
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt
timeout 280 python3 benchmarks/tune_tiles.py --space operands --quant w8a16 --points $POINTS --jobs 14 --always 3 --budget-s 200 --out $OUT/operands_w8a16.json 2>&1 | tee $OUT/operands_w8a16.txt
timeout 280 python3 benchmarks/tune_tiles.py --space operands --points $POINTS --jobs 14 --always 3 --budget-s 200 --out $OUT/operands_bf16.json 2>&1 | tee $OUT/operands_bf16.txt
