#!/bin/bash
# Eleventh session, 4 GPUs of one host: `fluxrt generate --gpus 4` with the copy-engine transport, --overlap,
# --compile and --cuda-graph, through the command line's own checks (bench/parallel_generate.py --flags), on the
# embedded model at 512², against one process's image; then dev 2048² over copy engines (push) in a CUDA graph.
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpus.txt
G="python3 bench/parallel_generate.py --gpus 4 --plans sp --size 512"
timeout 150 $G --flags="--overlap --transport copy-engine --compile --cuda-graph" --out $OUT/pg_ce_graph.json > /tmp/p1.log 2>&1
timeout 100 $G --flags="--overlap --transport copy-engine" --out $OUT/pg_ce.json > /tmp/p2.log 2>&1
tail -4 /tmp/p1.log /tmp/p2.log > $OUT/pg_logs.txt 2>&1
timeout 170 python3 -m torch.distributed.run --standalone --nproc-per-node 4 bench/parallel.py --model flux.2-dev \
  --compile --steps 50 --sizes 2048 --cuda-graph --plans sp4:overlap:ce --out $OUT/sp4_ce_graph_2048.json > /tmp/p3.log 2>&1
grep -v '^{' /tmp/p3.log | grep -v -i warn | grep -v '^\*\|OMP_NUM' | tail -4 > $OUT/errors.txt
grep -h '"rows"' -A0 $OUT/pg_*.json > /dev/null; python3 -c "
import json,glob
for f in sorted(glob.glob('$OUT/pg_*.json')):
    for r in json.load(open(f))['rows']: print(f.split('/')[-1], r)
for r in json.load(open('$OUT/sp4_ce_graph_2048.json')): print(r['plan'], r['size'], round(r['total_s'],3), r.get('graph_max_abs_diff'))
"
