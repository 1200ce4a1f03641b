#!/bin/bash
# 4 GPUs of one host: the GPU tests of the fused QK-norm + RoPE kernel (its lazy import, usable() fallback and the
# prepare / QKNorm.forward refactor had run only on CPU), then SP 4 --overlap over copy engines (push, q, k, v
# landing in head order), dev 1024², compiled bf16, 50 steps, CUDA graph, alternating on one machine: the fused
# kernel writing into the send buffer (the default) against the model's own ops compiled (`:unfused`, the code of
# the eleventh session's 6.53 s), for issue 7's 4-GPU target (<= 6.5 s). About 7 minutes.
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > $OUT/gpus.txt
export PYTHONPATH=src
timeout 70 python3 -m pytest -q -m gpu tests/test_norm_rope.py > $OUT/gpu_test.txt 2>&1 || { tail -40 $OUT/gpu_test.txt; exit 1; }
tail -2 $OUT/gpu_test.txt
JOB_S=100 bash bench/scripts/alternate_plans.sh sp4_fused sp4:overlap:ce sp4:overlap:ce:unfused sp4:overlap:ce \
  sp4:overlap:ce:unfused
