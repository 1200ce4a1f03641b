#!/bin/bash
# 4 GPUs of one host: does --overlap pay once NCCL's send/recv kernels take fewer SMs? Dev 1024², compiled bf16,
# 50 steps, Ulysses SP 4 with --overlap under NCCL_MAX_P2P_NCHANNELS=8, then NCCL's default, then 4; one job each.
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
R="python3 -m torch.distributed.run --standalone --nproc-per-node 4 bench/parallel.py --model flux.2-dev --compile --steps 50 --sizes 1024 --profile-steps 3"
NCCL_MAX_P2P_NCHANNELS=8 timeout 110 $R --plans sp4:overlap --out $OUT/sp4_overlap_p2p8.json > /tmp/f1.log 2>&1
timeout 110 $R --plans sp4:overlap --out $OUT/sp4_overlap_default.json > /tmp/f2.log 2>&1
NCCL_MAX_P2P_NCHANNELS=4 timeout 110 $R --plans sp4:overlap --out $OUT/sp4_overlap_p2p4.json > /tmp/f3.log 2>&1
NCCL_MAX_P2P_NCHANNELS=8 timeout 110 $R --plans sp4 --out $OUT/sp4_p2p8.json > /tmp/f4.log 2>&1
grep -h '"s_per_step"' /tmp/f*.log | python3 -c "import sys,json; [print(json.loads(l)['plan'], json.loads(l)['s_per_step'], json.loads(l)['nccl_env'] if 'nccl_env' in l else '') for l in sys.stdin]"
