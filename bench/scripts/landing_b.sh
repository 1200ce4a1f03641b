#!/bin/bash
# (Run in the fourteenth session with the fused kernel, as `alternate_plans.sh variants_fused ...`: bench/RESULTS.md.
# Since then `:celandout` is what `:ce` does, and `:ceaside` was removed: it gained nothing.)
# (Prepared in the eleventh session for the next one; not yet run.) 4 GPUs of one host, SP 4 --overlap, dev 1024²,
# compiled bf16, 50 steps, CUDA graph, alternating on one machine: the default copy-engine transport (`:ce`: push,
# q, k, v landing in head order) against the two untimed variants: `:celandout` (the attention's output also lands
# in the (B, L, H) layout the next linear reads: no permute kernel before or after its exchange, but rows of 3 KB
# per 2-D copy at 1024², which copy engines may move less well than whole chunks) and `:ceaside` (each rank's own
# chunk copied on the barrier's stream, off the compute stream).
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpus.txt
bash bench/scripts/alternate_plans.sh variants sp4:overlap:ce sp4:overlap:celandout sp4:overlap:ceaside \
  sp4:overlap:ce sp4:overlap:celandout sp4:overlap:ceaside
