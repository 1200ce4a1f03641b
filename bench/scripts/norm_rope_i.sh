#!/bin/bash
# (Prepared in the twelfth session for the next one; not yet run.) 2 GPUs: where SP 2's time goes now (issue 7's
# 2-GPU target, 11 s; 11.88 s measured): SP 2 --overlap over copy engines with the fused kernel in a CUDA graph,
# dev 1024², 50 steps, rank 0's kernels profiled over 2 steps; then the same plan with fp8 linears.
export PYTHONPATH=src
R="python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench/parallel.py --model flux.2-dev --compile --steps 50 --sizes 1024 --cuda-graph"
timeout 150 $R --plans sp2:overlap:ce --profile-steps 2 --out $OUT/sp2_profile.json > /tmp/a.log 2>&1
timeout 150 $R --plans sp2:overlap:ce --fp8 --out $OUT/sp2_fp8.json > /tmp/b.log 2>&1
grep '^{' /tmp/a.log /tmp/b.log | cut -c1-600
