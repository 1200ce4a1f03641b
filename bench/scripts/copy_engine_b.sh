#!/bin/bash
# 4 GPUs of one host, dev at $SIZE (default 1024), compiled bf16, 50 steps: Ulysses SP 4 over NCCL, and with
# --overlap over copy engines (`--transport copy-engine`); one job each, same machine.
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
SIZE=${SIZE:-1024}; LIMIT=${LIMIT:-130}
R="python3 -m torch.distributed.run --standalone --nproc-per-node 4 bench/parallel.py --model flux.2-dev --compile --steps 50 --sizes $SIZE --profile-steps 2"
timeout $LIMIT $R --plans sp4:overlap:ce --out $OUT/sp4_overlap_ce_$SIZE.json > /tmp/b1.log 2>&1
timeout $LIMIT $R --plans sp4 --out $OUT/sp4_nccl_$SIZE.json > /tmp/b2.log 2>&1
for i in 1 2; do grep -v '^{' /tmp/b$i.log | grep -v warn | tail -20 > $OUT/errors_b${i}_$SIZE.txt; done
grep -h '"s_per_step"' /tmp/b[12].log | python3 -c "import sys,json; [print(json.loads(l)['plan'], json.loads(l)['size'], json.loads(l)['total_s'], json.loads(l)['s_per_step'], json.loads(l).get('check_max_abs_diff')) for l in sys.stdin]"
