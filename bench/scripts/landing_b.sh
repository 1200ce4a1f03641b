#!/bin/bash
# (Prepared in the eleventh session for the next one; not yet run.) 4 GPUs of one host: the attention's output
# landing in the (B, L, H) layout the next linear reads (`:celandout`: no permute kernel before or after its
# exchange; rows of 3 KB per 2-D copy at 1024², which copy engines may move less well than whole chunks) against
# `:ce` (q, k, v landing in head order only, the default), SP 4 --overlap, dev 1024², compiled bf16, 50 steps,
# CUDA graph, alternating on one machine; then the micro-benchmark as graph replays.
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpus.txt
R="python3 -m torch.distributed.run --standalone --nproc-per-node 4 bench/parallel.py --model flux.2-dev --compile --steps 50 --sizes 1024 --cuda-graph"
i=0
for plan in sp4:overlap:ce sp4:overlap:celandout sp4:overlap:ce sp4:overlap:celandout; do
  i=$((i+1)); timeout 80 $R --plans $plan --out /tmp/m$i.json > /tmp/m$i.log 2>&1
  grep -v '^{' /tmp/m$i.log | grep -v -i warn | grep -v '^\*\|OMP_NUM' | tail -3 >> $OUT/errors.txt
done
python3 -c "import json,glob; rows=[r for f in sorted(glob.glob('/tmp/m*.json')) for r in json.load(open(f))]; json.dump(rows, open('$OUT/landing_output.json','w'), indent=1); [print(r['plan'], round(r['total_s'],3), r.get('check_max_abs_diff'), r.get('graph_max_abs_diff')) for r in rows]"
