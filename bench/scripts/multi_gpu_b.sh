#!/bin/bash
# As run on 2026-11-27: its multi-plan compiled jobs ran out of memory after the first plan (see multi_gpu_d.sh,
# one plan per job, and bench/RESULTS.md); kept as the record of what produced those rows.
# 4 GPUs of one host: dev 2048², compiled, fp8 (default layers): one GPU (10 steps) and Ulysses SP 4; then on GPUs
# 0 and 1 alone, Ulysses SP 2.
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
R="python3 -m torch.distributed.run --standalone --nproc-per-node"
A="bench/parallel.py --model flux.2-dev --compile --fp8 --sizes 2048 --steps 50 --base-steps 10"
timeout 250 $R 4 $A --plans 1 sp4 --out $OUT/dev2048_fp8_4gpu.json > $OUT/dev2048_fp8_4gpu.log 2>&1
CUDA_VISIBLE_DEVICES=0,1 timeout 200 $R 2 $A --plans sp2 --out $OUT/dev2048_fp8_2gpu.json > $OUT/dev2048_fp8_2gpu.log 2>&1
