#!/bin/bash
# Sixteenth session, one H100 (nvidia-h100-x1): the GPU tests of the fused kernel and the copy-engine transport,
# then bench/sustained.py: the products of one SP 2 rank alone, with the least elementwise traffic after each
# linear, and with that traffic on a second stream (the floors under issue 7's 2-GPU target on this card). About
# 3 minutes.
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > $OUT/gpus.txt
timeout 120 python3 -m pytest -q -m gpu tests/test_norm_rope.py tests/test_copy_engine.py -p no:cacheprovider --tb=short > $OUT/gpu_tests.txt 2>&1
tail -3 $OUT/gpu_tests.txt
timeout 120 python3 bench/sustained.py --workloads products,products-ew,products-ew-side --shard 2 --seconds 10 --idle-s 3 --out $OUT/sustained_sp2_ew.json 2>&1 | grep -v -e USDT -e Warn -e _warn
cat $OUT/gpus.txt
