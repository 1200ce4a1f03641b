#!/bin/bash
# Twelfth session, one GPU: the fused QK-norm + RoPE kernel's GPU test, then dev 1024² compiled with and without it
# in alternating rounds on one build (bench/step_ab.py; bf16 with both output orders, then fp8), then the compiled
# step (now fused) against diffusers' compiled step in the same process (issue 5).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=src:/tmp/site
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > $OUT/gpus.txt
timeout 90 python3 -m pytest -q -m gpu tests/test_norm_rope.py > $OUT/gpu_test.txt 2>&1
timeout 190 python3 bench/step_ab.py --variants unfused,fused,fused-bhld --rounds 4 --steps 6 --out $OUT/ab_bf16.json > /tmp/ab1.log 2>&1
timeout 140 python3 bench/step_ab.py --fp8 --variants unfused,fused --rounds 3 --steps 6 --out $OUT/ab_fp8.json > /tmp/ab2.log 2>&1
timeout 150 python3 bench/transformer_step.py --cases flux.2-dev:1024:0 --impls compiled,diffusers-compiled --time-budget-s 140 --out $OUT/step.json > /tmp/step.log 2>&1
tail -3 $OUT/gpu_test.txt
grep -v USDT /tmp/ab1.log /tmp/ab2.log | tail -24
grep -v USDT /tmp/step.log | tail -6
