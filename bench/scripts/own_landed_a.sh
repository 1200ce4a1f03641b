#!/bin/bash
# Sixteenth session, 2 GPUs: the GPU tests of the fused kernel (its own-chunk redirect), then SP 2 --overlap over
# copy engines in a CUDA graph, dev 1024², 50 steps, compiled bf16, the single blocks' own q, k, v heads written
# where they land (default) against packed then copied (:ceowncopy), alternating, one plan per job; the first job
# also profiles 2 steps and writes rank 0's trace (bench/trace_gaps.py bins its idle time). Then, on one of the
# cards, the products of one SP 2 rank alone, with the least elementwise traffic after each linear, and with that
# traffic on a second stream (bench/sustained.py). About 8 minutes.
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > $OUT/gpus.txt
timeout 60 python3 -m pytest -q -m gpu tests/test_norm_rope.py -p no:cacheprovider 2>&1 | tail -2
R="python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench/parallel.py --model flux.2-dev --compile --steps 50 --sizes 1024 --cuda-graph"
timeout 140 $R --plans sp2:overlap:ce --profile-steps 2 --trace $OUT/sp2_trace.json.gz --out /tmp/j1.json > /tmp/j1.log 2>&1
timeout 100 $R --plans sp2:overlap:ce:ceowncopy --out /tmp/j2.json > /tmp/j2.log 2>&1
timeout 100 $R --plans sp2:overlap:ce --out /tmp/j3.json > /tmp/j3.log 2>&1
timeout 100 $R --plans sp2:overlap:ce:ceowncopy --out /tmp/j4.json > /tmp/j4.log 2>&1
for i in 1 2 3 4; do grep -h -i -e error -e Traceback /tmp/j$i.log | head -3; done
python3 -c "import json,glob; rows=[r for f in sorted(glob.glob('/tmp/j*.json')) for r in json.load(open(f))]; json.dump(rows, open('$OUT/sp2_own_landed.json','w'), indent=1); [print(r['plan'], round(r['total_s'],3), r.get('check_max_abs_diff'), r.get('graph_max_abs_diff'), round(r['peak_mem_gib_max_rank'],1)) for r in rows]"
test -f $OUT/sp2_trace.json.gz && python3 bench/trace_gaps.py $OUT/sp2_trace.json.gz --steps 2 --out $OUT/sp2_gaps.json
timeout 110 python3 bench/sustained.py --workloads products,products-ew,products-ew-side --shard 2 --seconds 10 --idle-s 3 --out $OUT/sustained_sp2_ew.json 2>&1 | grep -v -e USDT -e Warn -e _warn
cat $OUT/gpus.txt
