#!/bin/bash
# Sixteenth session, 2 GPUs, after own_landed_a.sh: the GPU tests of the fused kernel, then SP 2 --overlap over
# copy engines in a CUDA graph, dev 1024², 50 steps, compiled bf16, one plan per job, alternating: the new default
# (every block's own q, k, v heads written where they land, token-major), the previous default (:ceowncopy) and
# the new path landing head-major (:ceheadmajor). Each job's check now also compares the compiled plan with one
# process. The first job profiles 2 steps and writes rank 0's trace. About 8 minutes.
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > $OUT/gpus.txt
timeout 60 python3 -m pytest -q -m gpu tests/test_norm_rope.py -p no:cacheprovider 2>&1 | tail -1
R="python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench/parallel.py --model flux.2-dev --compile --steps 50 --sizes 1024 --cuda-graph"
timeout 130 $R --plans sp2:overlap:ce --profile-steps 2 --trace $OUT/sp2_trace.json.gz --out /tmp/k1.json > /tmp/k1.log 2>&1
timeout 100 $R --plans sp2:overlap:ce:ceowncopy --out /tmp/k2.json > /tmp/k2.log 2>&1
timeout 100 $R --plans sp2:overlap:ce:ceheadmajor --out /tmp/k3.json > /tmp/k3.log 2>&1
timeout 100 $R --plans sp2:overlap:ce --out /tmp/k4.json > /tmp/k4.log 2>&1
timeout 100 $R --plans sp2:overlap:ce:ceowncopy --out /tmp/k5.json > /tmp/k5.log 2>&1
for i in 1 2 3 4 5; do grep -h -i -e error -e Traceback /tmp/k$i.log | head -3; done
python3 -c "import json,glob; rows=[r for f in sorted(glob.glob('/tmp/k*.json')) for r in json.load(open(f))]; json.dump(rows, open('$OUT/sp2_own_landed_b.json','w'), indent=1); [print(r['plan'], round(r['total_s'],3), r.get('check_max_abs_diff'), r.get('check_compiled_max_abs_diff'), r.get('graph_max_abs_diff'), round(r['peak_mem_gib_max_rank'],1)) for r in rows]"
test -f $OUT/sp2_trace.json.gz && python3 bench/trace_gaps.py $OUT/sp2_trace.json.gz --steps 2 --out $OUT/sp2_gaps.json
cat $OUT/gpus.txt
