#!/bin/bash
# Usage: alternate_plans.sh NAME PLAN... : each plan as its own job, in the order given (alternate A B A B to pair
# them on one machine), dev 1024², compiled bf16, 50 steps, each forward a CUDA graph, $NPROC ranks (default 4),
# each job at most $JOB_S seconds (default 80); the rows go to $OUT/NAME.json, the tail of each job's log to
# $OUT/errors.txt. Used by landing_a.sh, landing_b.sh and norm_rope_c.sh.
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
name=$1; shift
rm -f /tmp/alt*.json /tmp/alt*.log  # a warm machine keeps the last call's rows
R="python3 -m torch.distributed.run --standalone --nproc-per-node ${NPROC:-4} bench/parallel.py --model flux.2-dev --compile --steps 50 --sizes 1024 --cuda-graph"
i=0
for plan in "$@"; do
  i=$((i+1)); timeout ${JOB_S:-80} $R --plans $plan --out /tmp/alt$i.json > /tmp/alt$i.log 2>&1
  grep -v '^{' /tmp/alt$i.log | grep -v -i warn | grep -v '^\*\|OMP_NUM' | tail -3 >> $OUT/errors.txt
done
python3 -c "import json,glob; rows=[r for f in sorted(glob.glob('/tmp/alt*.json')) for r in json.load(open(f))]; json.dump(rows, open('$OUT/$name.json','w'), indent=1); [print(r['plan'], round(r['total_s'],3), r.get('check_max_abs_diff'), r.get('graph_max_abs_diff')) for r in rows]"
