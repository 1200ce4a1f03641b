#!/bin/bash
# (Prepared in the twelfth session for the next one; not yet run.) One H200: issue 5's end-to-end benchmark (text
# encoder truncated at layer 30, 50 steps, VAE decode at 1024²) with the fused kernel, fp8 and bf16, all stages
# resident. About 4 minutes.
export PYTHONPATH=src
timeout 200 python3 bench/e2e.py --impl fp8-compiled --resident --out $OUT/e2e_fp8.json > /tmp/a.log 2>&1
timeout 200 python3 bench/e2e.py --impl compiled --resident --out $OUT/e2e_bf16.json > /tmp/b.log 2>&1
tail -6 /tmp/a.log /tmp/b.log
