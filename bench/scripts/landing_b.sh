#!/bin/bash
# (Prepared in the eleventh session for the next one; not yet run.) 4 GPUs of one host: the attention's output
# landing in the (B, L, H) layout the next linear reads (`:celandout`: no permute kernel before or after its
# exchange; rows of 3 KB per 2-D copy at 1024², which copy engines may move less well than whole chunks) against
# `:ce` (q, k, v landing in head order only, the default), SP 4 --overlap, dev 1024², compiled bf16, 50 steps,
# CUDA graph, alternating on one machine.
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpus.txt
bash bench/scripts/alternate_plans.sh landing_output sp4:overlap:ce sp4:overlap:celandout sp4:overlap:ce sp4:overlap:celandout
