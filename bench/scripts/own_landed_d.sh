#!/bin/bash
# Sixteenth session, 2 GPUs, after own_landed_b.sh: the send buffers of the own-landed path kept by the exchange
# (two per shape) instead of allocated per exchange; SP 2 --overlap over copy engines in a CUDA graph, dev 1024²,
# 50 steps, compiled bf16, one plan per job, alternating with the previous path (:ceowncopy): time and peak memory.
# About 4 minutes. The kept send buffers changed nothing measurable (peak 64.0 GiB against 63.9) and were
# reverted after this call (bench/RESULTS.md).
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > $OUT/gpus.txt
R="python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench/parallel.py --model flux.2-dev --compile --steps 50 --sizes 1024 --cuda-graph"
timeout 110 $R --plans sp2:overlap:ce --out /tmp/n1.json > /tmp/n1.log 2>&1
timeout 90 $R --plans sp2:overlap:ce:ceowncopy --out /tmp/n2.json > /tmp/n2.log 2>&1
timeout 90 $R --plans sp2:overlap:ce --out /tmp/n3.json > /tmp/n3.log 2>&1
for i in 1 2 3; do grep -h -i -e error -e Traceback /tmp/n$i.log | head -3; done
python3 -c "import json,glob; rows=[r for f in sorted(glob.glob('/tmp/n*.json')) for r in json.load(open(f))]; json.dump(rows, open('$OUT/sp2_kept_send.json','w'), indent=1); [print(r['plan'], round(r['total_s'],3), r.get('check_max_abs_diff'), r.get('check_compiled_max_abs_diff'), r.get('graph_max_abs_diff'), round(r['peak_mem_gib_max_rank'],2)) for r in rows]"
cat $OUT/gpus.txt
