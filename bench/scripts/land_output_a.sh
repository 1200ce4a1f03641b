#!/bin/bash
# 2 GPUs of one host: SP 2 --overlap over copy engines with the fused QK-norm + RoPE kernel, dev 1024², compiled
# bf16, 50 steps, CUDA graph, alternating on one machine: the attention's output permuted then sent (`:ce`) against
# sent as it lies and landing in the layout the next linear reads (`:celandout`, 0.4% faster on 4 GPUs).
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpus.txt
NPROC=2 JOB_S=120 bash bench/scripts/alternate_plans.sh sp2_land_output sp2:overlap:ce sp2:overlap:celandout \
  sp2:overlap:ce sp2:overlap:celandout
