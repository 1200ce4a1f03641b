#!/bin/bash
# Eleventh session, 4 GPUs of one host: does splitting the double blocks' all-to-alls (`OverlappedDoubleBlock`,
# now part of --overlap) pay? dev 1024², compiled bf16, 50 steps, each forward a CUDA graph, one plan per job,
# alternating: copy engines (push) with the new --overlap, with the single blocks' overlap alone, and NCCL with the
# new --overlap (the same-machine baseline); then copy engines on 2 of the GPUs.
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
T="python3 -m torch.distributed.run --standalone --nproc-per-node"
R="bench/parallel.py --model flux.2-dev --compile --steps 50 --sizes 1024 --cuda-graph"
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpus.txt
i=0
for plan in sp4:overlap:ce sp4:overlapsingle:ce sp4:overlap sp4:overlap:ce sp4:overlapsingle:ce; do
  i=$((i+1)); timeout 95 $T 4 $R --plans $plan --out /tmp/g$i.json > /tmp/g$i.log 2>&1
  grep -v '^{' /tmp/g$i.log | grep -v -i warn | grep -v '^\*\|OMP_NUM' | tail -4 >> $OUT/errors.txt
done
i=$((i+1)); CUDA_VISIBLE_DEVICES=0,1 timeout 95 $T 2 $R --plans sp2:overlap:ce --out /tmp/g$i.json > /tmp/g$i.log 2>&1
grep -v '^{' /tmp/g$i.log | grep -v -i warn | grep -v '^\*\|OMP_NUM' | tail -4 >> $OUT/errors.txt
python3 -c "import json,glob; rows=[r for f in sorted(glob.glob('/tmp/g*.json')) for r in json.load(open(f))]; json.dump(rows, open('$OUT/double_overlap.json','w'), indent=1); [print(r['plan'], r['gpus'], round(r['total_s'],3), r.get('check_max_abs_diff'), r.get('graph_max_abs_diff')) for r in rows]"
