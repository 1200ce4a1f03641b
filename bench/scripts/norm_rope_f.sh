#!/bin/bash
# Twelfth session, one GPU: the rest of issue 5's case matrix with the fused QK-norm + RoPE kernel (what --compile
# now does on CUDA) against diffusers' compiled step in the same process: dev 1024² with one reference and 512²,
# then klein 4B / 9B (4 steps) with CUDA graphs.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=src:/tmp/site
S="python3 bench/transformer_step.py"
timeout 320 $S --cases flux.2-dev:1024:1,flux.2-dev:512:0 --impls compiled,compiled-unfused,fp8-compiled,diffusers-compiled --time-budget-s 310 --out $OUT/step_dev.json > /tmp/dev.log 2>&1
timeout 220 $S --cases flux.2-klein-4b:512:0,flux.2-klein-4b:1024:0,flux.2-klein-9b:1024:0 --impls compiled,cudagraph,fp8-compiled,diffusers-compiled --time-budget-s 210 --out $OUT/step_klein.json > /tmp/klein.log 2>&1
grep -v USDT /tmp/dev.log | tail -12
grep -v USDT /tmp/klein.log | tail -16
