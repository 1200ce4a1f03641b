#!/bin/bash
# Sixteenth session, 4 GPUs: SP 4 --overlap over copy engines in a CUDA graph, dev, 50 steps, compiled bf16, one
# plan per job: at 1024² the new default (every block's own q, k, v heads written where they land, token-major)
# against the previous default (:ceowncopy), alternating; then 2048² with the new default. Each job's check also
# compares the compiled plan with one process. About 6 minutes.
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > $OUT/gpus.txt
R="python3 -m torch.distributed.run --standalone --nproc-per-node 4 bench/parallel.py --model flux.2-dev --compile --steps 50 --cuda-graph"
timeout 120 $R --sizes 1024 --plans sp4:overlap:ce --out /tmp/m1.json > /tmp/m1.log 2>&1
timeout 90 $R --sizes 1024 --plans sp4:overlap:ce:ceowncopy --out /tmp/m2.json > /tmp/m2.log 2>&1
timeout 90 $R --sizes 1024 --plans sp4:overlap:ce --out /tmp/m3.json > /tmp/m3.log 2>&1
timeout 140 $R --sizes 2048 --plans sp4:overlap:ce --out /tmp/m4.json > /tmp/m4.log 2>&1
for i in 1 2 3 4; do grep -h -i -e error -e Traceback /tmp/m$i.log | head -3; done
python3 -c "import json,glob; rows=[r for f in sorted(glob.glob('/tmp/m*.json')) for r in json.load(open(f))]; json.dump(rows, open('$OUT/sp4_own_landed.json','w'), indent=1); [print(r['plan'], r['size'], round(r['total_s'],3), r.get('check_max_abs_diff'), r.get('check_compiled_max_abs_diff'), r.get('graph_max_abs_diff'), round(r['peak_mem_gib_max_rank'],1)) for r in rows]"
cat $OUT/gpus.txt
