#!/bin/bash
# Eleventh session, 4 GPUs of one host: Ulysses' q, k, v landing in head order (2-D copies on the copy engines, no
# permute kernel after; `:ce`) against landing rank by rank and permuted (`:ceflat`), SP 4 --overlap, dev 1024²,
# compiled bf16, 50 steps, CUDA graph, alternating on one machine; first the GPU test of the 2-D copy.
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpus.txt
timeout 40 python3 -m pytest -q -m gpu tests/test_copy_engine.py > $OUT/gpu_test.txt 2>&1
R="python3 -m torch.distributed.run --standalone --nproc-per-node 4 bench/parallel.py --model flux.2-dev --compile --steps 50 --sizes 1024 --cuda-graph"
i=0
for plan in sp4:overlap:ce sp4:overlap:ceflat sp4:overlap:ce sp4:overlap:ceflat; do
  i=$((i+1)); timeout 78 $R --plans $plan --out /tmp/l$i.json > /tmp/l$i.log 2>&1
  grep -v '^{' /tmp/l$i.log | grep -v -i warn | grep -v '^\*\|OMP_NUM' | tail -3 >> $OUT/errors.txt
done
python3 -c "import json,glob; rows=[r for f in sorted(glob.glob('/tmp/l*.json')) for r in json.load(open(f))]; json.dump(rows, open('$OUT/landing.json','w'), indent=1); [print(r['plan'], round(r['total_s'],3), r.get('check_max_abs_diff'), r.get('graph_max_abs_diff')) for r in rows]"
tail -2 $OUT/gpu_test.txt
