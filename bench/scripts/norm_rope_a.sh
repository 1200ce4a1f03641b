#!/bin/bash
# Twelfth session, one GPU: the fused QK-norm + RoPE Triton kernel (fluxrt.accel.norm_rope). Its GPU test, then one
# dev block of each kind compiled under the kernel variants (with inductor's code for the first two), then the whole
# dev 1024² step compiled with and without it, bf16 and fp8, and diffusers' compiled step in the same call (issue 5).
# As run (before 6f9c998): the kernel was then chosen per process and its rows were impls compiled-nr and
# fp8-compiled-nr; compile_transformer now picks it on CUDA, and the same comparison is
# --impls compiled-unfused,compiled,fp8-compiled-unfused,fp8-compiled,diffusers-compiled.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=src:/tmp/site
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > $OUT/gpus.txt
timeout 120 python3 -m pytest -q -m gpu tests/test_norm_rope.py > $OUT/gpu_test.txt 2>&1
timeout 200 python3 bench/block_kernels.py --out $OUT/blocks.json --code /tmp/code.txt > /tmp/blocks.log 2>&1
gzip -c /tmp/code.txt > $OUT/code.txt.gz
S="python3 bench/transformer_step.py --cases flux.2-dev:1024:0"
timeout 330 $S --impls compiled,compiled-nr,fp8-compiled,fp8-compiled-nr,diffusers-compiled --time-budget-s 320 --out $OUT/step.json > /tmp/step.log 2>&1
tail -3 $OUT/gpu_test.txt
grep -v USDT /tmp/blocks.log | cut -c1-400
grep -v USDT /tmp/step.log | tail -30
