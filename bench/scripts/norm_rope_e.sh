#!/bin/bash
# Twelfth session, 2 GPUs: the fused kernel writing q, k (and copying v) straight into Ulysses' send buffer
# (sp.pack_qkv, now the default under --overlap) against writing new q, k tensors that are then stacked with v
# (:stack), SP 2 --overlap over copy engines in a CUDA graph, dev 1024², compiled bf16, 50 steps, alternating;
# first the fused kernels' GPU tests.
export PYTHONPATH=src
timeout 60 python3 -m pytest -q -m gpu tests/test_norm_rope.py > $OUT/gpu_test.txt 2>&1
NPROC=2 JOB_S=120 bash bench/scripts/alternate_plans.sh sp2_send sp2:overlap:ce sp2:overlap:ce:stack sp2:overlap:ce sp2:overlap:ce:stack
tail -3 $OUT/gpu_test.txt
