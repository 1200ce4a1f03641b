#!/bin/bash
# (Prepared in the twelfth session for the next one; not yet run.) One GPU: one dev block of each kind compiled
# with the fused QK-norm + RoPE kernel, without and with inductor's multi-kernel (persistent or looped reductions
# picked at run time: the LayerNorm over 6144 channels is looped by default, 3.1 ms per dev 1024² step at ~2 TB/s).
export PYTHONPATH=src
timeout 200 python3 bench/block_kernels.py --variants nr,nr-mk,nr,nr-mk --out $OUT/blocks_mk.json > /tmp/b.log 2>&1
grep -v USDT /tmp/b.log | cut -c1-400
