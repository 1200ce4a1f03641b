#!/bin/bash
# (Prepared in the twelfth session for the next one with 4 GPUs; not yet run: only 1- and 2-GPU kinds were lent.)
# 4 GPUs of one host, SP 4 --overlap over copy engines (push, q, k, v landing in head order), dev 1024², compiled
# bf16, 50 steps, CUDA graph, alternating on one machine: the fused QK-norm + RoPE kernel writing straight into the
# send buffer (what compile_transformer and --overlap now do) against the model's own ops compiled (`:unfused`, the
# code of the eleventh session's 6.53 s), for issue 7's 4-GPU target (≤ 6.5 s); then the fused kernel through the
# stacking copy (`:stack`) once. About 6 minutes.
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > $OUT/gpus.txt
JOB_S=90 bash bench/scripts/alternate_plans.sh sp4_fused sp4:overlap:ce sp4:overlap:ce:unfused sp4:overlap:ce \
  sp4:overlap:ce:unfused sp4:overlap:ce:stack
