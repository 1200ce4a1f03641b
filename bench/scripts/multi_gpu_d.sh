#!/bin/bash
# 4 GPUs of one host, one plan per job (a compiled 64 GB model is not freed within one process): dev compiled,
# Ulysses SP 4 without and with --overlap at 1024² (profiled 3 steps) and 2048² (bf16), SP 4 at 2048² fp8.
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
R="python3 -m torch.distributed.run --standalone --nproc-per-node 4 bench/parallel.py --model flux.2-dev --compile --steps 50"
for p in sp4 sp4:overlap; do
  timeout 110 $R --sizes 1024 --plans $p --profile-steps 3 --out $OUT/dev1024_bf16_4gpu_${p/:/_}.json > $OUT/dev1024_bf16_4gpu_${p/:/_}.log 2>&1
done
for p in sp4 sp4:overlap; do
  timeout 120 $R --sizes 2048 --plans $p --out $OUT/dev2048_bf16_4gpu_${p/:/_}.json > $OUT/dev2048_bf16_4gpu_${p/:/_}.log 2>&1
done
timeout 110 $R --sizes 2048 --plans sp4 --fp8 --out $OUT/dev2048_fp8_4gpu_sp4.json > $OUT/dev2048_fp8_4gpu_sp4.log 2>&1
