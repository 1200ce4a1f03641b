#!/bin/bash
# (Prepared in the tenth session; run in the eleventh, without the NCCL row, whose graphed time is known.) 4 GPUs of one host: where the ~26 ms per step that
# SP 4 --overlap over copy engines still leaves exposed at 1024² goes, without host cost. The exchanges alone and
# beside their matmuls as CUDA-graph replays, then dev 1024², compiled bf16, 50 steps, each forward a CUDA graph,
# profiled (rank 0's kernels inside the replays): SP 4 --overlap over copy engines, SP 4 over NCCL, and SP 4
# --overlap over copy engines in push mode (copies start before the barrier).
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
T="python3 -m torch.distributed.run --standalone --nproc-per-node 4"
timeout 100 $T bench/all_to_all.py --sizes 1024 2048 --cuda-graph --out $OUT/all_to_all_graph.json > /tmp/e0.log 2>&1
grep -v '^{' /tmp/e0.log | grep -v -i warn | tail -12 > $OUT/errors_e0.txt
R="$T bench/parallel.py --model flux.2-dev --compile --steps 50 --sizes 1024 --cuda-graph --profile-steps 2"
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpus.txt
timeout 150 $R --plans sp4:overlap:ce --out $OUT/sp4_overlap_ce_graph_profile.json > /tmp/e1.log 2>&1
timeout 150 $R --plans sp4:overlap:cepush --out $OUT/sp4_overlap_cepush_graph_profile.json > /tmp/e3.log 2>&1
for i in 1 3; do grep -v '^{' /tmp/e$i.log | grep -v -i warn | tail -12 > $OUT/errors_e$i.txt; done
grep -h '"s_per_step"' /tmp/e[13].log | python3 -c "import sys,json; [print(r['plan'], r['total_s'], r.get('graph_max_abs_diff'), r.get('profile',{}).get('compute_idle_ms_per_step')) for r in map(json.loads, sys.stdin)]"
