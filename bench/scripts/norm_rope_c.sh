#!/bin/bash
# Twelfth session, 2 GPUs: the fused QK-norm + RoPE kernel in the 2-GPU plan (issue 7): SP 2 --overlap over copy
# engines in a CUDA graph, dev 1024², compiled bf16, 50 steps, with the kernel (what compile_transformer now picks)
# and without (:unfused), alternating, one plan per job; first the kernel's GPU test.
export PYTHONPATH=src
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > $OUT/gpus.txt
timeout 45 python3 -m pytest -q -m gpu tests/test_norm_rope.py > $OUT/gpu_test.txt 2>&1
NPROC=2 JOB_S=135 bash bench/scripts/alternate_plans.sh sp2_fused sp2:overlap:ce sp2:overlap:ce:unfused sp2:overlap:ce sp2:overlap:ce:unfused
tail -3 $OUT/gpu_test.txt
