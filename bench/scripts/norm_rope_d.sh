#!/bin/bash
# Twelfth session, one GPU: the fused kernel's GPU test (its tolerance revised), then where a dev 1024² step's time
# goes compiled with the fused QK-norm + RoPE kernel and without (bench/profile_step.py), bf16 (issue 5).
export PYTHONPATH=src
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > $OUT/gpus.txt
timeout 60 python3 -m pytest -q -m gpu tests/test_norm_rope.py > $OUT/gpu_test.txt 2>&1
timeout 240 python3 bench/profile_step.py --model flux.2-dev --size 1024 --refs 0 --impls compiled,compiled-unfused --out $OUT/profile.json --time-budget-s 230 > /tmp/prof.log 2>&1
tail -3 $OUT/gpu_test.txt
grep -v USDT /tmp/prof.log | tail -40 | cut -c1-200
