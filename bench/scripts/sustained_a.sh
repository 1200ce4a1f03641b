#!/bin/bash
# Fifteenth session, one H200 (the first version of bench/sustained.py; sustained_b.sh and _c.sh ran the
# current one): matmul speed held for seconds (bench/sustained.py: the 8192³ product, every product
# of the dev 1024² step with nothing between them, in bf16, default fp8 and all-fp8, then the compiled step itself,
# with nvidia-smi's clock and power samples), then the compiled step against diffusers' compiled step in the same
# call (issue 5's denominator). About 8 minutes.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit,power.max_limit --format=csv > $OUT/gpus.txt
timeout 330 python3 bench/sustained.py --seconds 15 --idle-s 5 --out $OUT/sustained.json 2>&1 | grep -v USDT | tee /tmp/s.log
timeout 200 python3 bench/transformer_step.py --cases flux.2-dev:1024:0 --impls compiled,diffusers-compiled --time-budget-s 180 --out $OUT/step.json > /tmp/step.log 2>&1
cat $OUT/gpus.txt
grep -v USDT /tmp/step.log | tail -6
