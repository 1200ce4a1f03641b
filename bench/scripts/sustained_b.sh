#!/bin/bash
# Fifteenth session, one H200, first of two calls on one machine: bench/sustained.py's five workloads (after the
# first call of sustained_a.sh: a warm-up call before each, the clock sampled through the rest before it), then the
# compiled step against diffusers' compiled step in the same call. About 5 minutes.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit,power.max_limit --format=csv > $OUT/gpus.txt
timeout 300 python3 bench/sustained.py --seconds 15 --idle-s 5 --out $OUT/sustained.json 2>&1 | grep -v -e USDT -e Warn -e _warn
timeout 200 python3 bench/transformer_step.py --cases flux.2-dev:1024:0 --impls compiled,diffusers-compiled --time-budget-s 180 --out $OUT/step.json > /tmp/step.log 2>&1
grep -v USDT /tmp/step.log | tail -4
