#!/bin/bash
# 4 GPUs of one host, dev 1024², compiled bf16, 50 steps, one job each, same machine: is the copy-engine exchange's
# host cost what is left? Each rank's whole forward replayed as one CUDA graph (--cuda-graph): SP 4 --overlap over
# copy engines, SP 4 over NCCL; then SP 4 over NCCL without a graph (the same-machine baseline).
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
R="python3 -m torch.distributed.run --standalone --nproc-per-node 4 bench/parallel.py --model flux.2-dev --compile --steps 50 --sizes 1024"
timeout 140 $R --plans sp4:overlap:ce --cuda-graph --out $OUT/sp4_overlap_ce_graph.json > /tmp/d1.log 2>&1
timeout 140 $R --plans sp4 --cuda-graph --out $OUT/sp4_nccl_graph.json > /tmp/d2.log 2>&1
timeout 120 $R --plans sp4 --out $OUT/sp4_nccl.json > /tmp/d3.log 2>&1
for i in 1 2 3; do grep -v '^{' /tmp/d$i.log | grep -v -i warn | tail -12 > $OUT/errors_d$i.txt; done
grep -h '"s_per_step"' /tmp/d[123].log | python3 -c "import sys,json; [print(r['plan'], r.get('cuda_graph'), r['total_s'], r['s_per_step'], r.get('check_max_abs_diff'), r.get('graph_max_abs_diff'), r.get('graph_ref_max_abs')) for r in map(json.loads, sys.stdin)]"
tail -5 $OUT/errors_d1.txt
