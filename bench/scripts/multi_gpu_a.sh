#!/bin/bash
# As run on 2026-11-27: its multi-plan compiled jobs ran out of memory after the first plan (see multi_gpu_d.sh,
# one plan per job, and bench/RESULTS.md); kept as the record of what produced those rows.
# 4 GPUs of one host: dev, compiled, bf16. 1024²: one GPU (10 steps), Ulysses SP 4, SP 4 with --overlap, each then
# profiled for 3 steps; 2048²: the same plans, 50 steps (one GPU 10). Results and logs under $OUT.
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
R="python3 -m torch.distributed.run --standalone --nproc-per-node 4 bench/parallel.py --model flux.2-dev --compile --steps 50 --base-steps 10"
timeout 290 $R --sizes 1024 --plans 1 sp4 sp4:overlap --profile-steps 3 --out $OUT/dev1024_bf16_4gpu.json > $OUT/dev1024_bf16_4gpu.log 2>&1
timeout 290 $R --sizes 2048 --plans 1 sp4 sp4:overlap --out $OUT/dev2048_bf16_4gpu.json > $OUT/dev2048_bf16_4gpu.log 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpus.csv
