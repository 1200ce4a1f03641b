#!/bin/bash
# Eleventh session, 4 GPUs of one host: Ulysses' q, k, v landing in head order (2-D copies on the copy engines, no
# permute kernel after; `:ce`) against landing rank by rank and permuted (`:ceflat`), SP 4 --overlap, dev 1024²,
# compiled bf16, 50 steps, CUDA graph, alternating on one machine; first the GPU test of the 2-D copy.
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpus.txt
timeout 40 python3 -m pytest -q -m gpu tests/test_copy_engine.py > $OUT/gpu_test.txt 2>&1
bash bench/scripts/alternate_plans.sh landing sp4:overlap:ce sp4:overlap:ceflat sp4:overlap:ce sp4:overlap:ceflat
tail -2 $OUT/gpu_test.txt
