#!/bin/bash
export PYTHONPATH=src
python3 -m pytest -q -m gpu tests/test_grouped_gemm.py 2>&1 | tail -15 > $OUT/gpu_tests_grouped.txt
cat $OUT/gpu_tests_grouped.txt
python3 .ab/ab_tiles.py $OUT/ab_bf16.json none 2>&1 | tee $OUT/ab_bf16.txt
python3 .ab/ab_tiles.py $OUT/ab_w8a16.json w8a16 2>&1 | tee $OUT/ab_w8a16.txt
