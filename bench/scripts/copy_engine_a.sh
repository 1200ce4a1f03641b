#!/bin/bash
# 4 GPUs of one host: Ulysses' all-to-alls on copy engines (symmetric memory) against NCCL. First the exchanges
# alone and beside their matmuls (bench/all_to_all.py), then dev 1024², compiled bf16, 50 steps: SP 4 over NCCL,
# over copy engines, and over copy engines with --overlap; one job each (compiled plans: one per process).
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
env | grep -E '^(NCCL|TORCH_SYMM|NVSHMEM)' | sort
T="python3 -m torch.distributed.run --standalone --nproc-per-node 4"
timeout 100 $T bench/all_to_all.py --sizes 1024 2048 --out $OUT/all_to_all_4gpu.json > /tmp/a0.log 2>&1; tail -3 /tmp/a0.log
R="$T bench/parallel.py --model flux.2-dev --compile --steps 50 --sizes 1024 --profile-steps 3"
timeout 130 $R --plans sp4:ce --out $OUT/sp4_ce.json > /tmp/a1.log 2>&1; tail -2 /tmp/a1.log
timeout 130 $R --plans sp4:overlap:ce --out $OUT/sp4_overlap_ce.json > /tmp/a2.log 2>&1; tail -2 /tmp/a2.log
timeout 130 $R --plans sp4 --out $OUT/sp4_nccl.json > /tmp/a3.log 2>&1; tail -2 /tmp/a3.log
cat /tmp/a0.log | grep -v '^{' | tail -20 > $OUT/errors_a0.txt
for i in 1 2 3; do grep -v '^{' /tmp/a$i.log | tail -30 > $OUT/errors_a$i.txt; done
grep -h '"s_per_step"' /tmp/a[123].log | python3 -c "import sys,json; [print(json.loads(l)['plan'], json.loads(l)['s_per_step'], json.loads(l).get('check_max_abs_diff'), json.loads(l).get('profile',{}).get('compute_idle_ms_per_step')) for l in sys.stdin]"
