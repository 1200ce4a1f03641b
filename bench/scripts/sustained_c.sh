#!/bin/bash
# Fifteenth session, one H200, second call on the machine of sustained_b.sh: the products one rank of Ulysses SP 2
# and SP 4 runs (the per-GPU floor of issue 7's plans), the products with one 1024² reference, then the compiled
# step with one reference against diffusers' in the same call. About 5 minutes.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
for n in 2 4; do
  timeout 80 python3 bench/sustained.py --workloads products --shard $n --seconds 15 --idle-s 5 --out $OUT/sustained_sp$n.json 2>&1 | grep -v -e USDT -e Warn -e _warn
done
timeout 100 python3 bench/sustained.py --refs 1 --workloads products,products-fp8 --seconds 15 --idle-s 5 --out $OUT/sustained_1ref.json 2>&1 | grep -v -e USDT -e Warn -e _warn
timeout 250 python3 bench/transformer_step.py --cases flux.2-dev:1024:1 --impls compiled,diffusers-compiled --time-budget-s 230 --out $OUT/step_1ref.json > /tmp/step.log 2>&1
grep -v USDT /tmp/step.log | tail -4
