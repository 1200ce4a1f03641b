#!/bin/bash
# 4 GPUs of one host: copy-engine exchanges on high-priority streams (their barrier kernel no longer waits for the
# matmul beside it). The exchanges alone and beside their matmuls, then dev 1024², compiled bf16, 50 steps: SP 4
# over NCCL and SP 4 --overlap over copy engines, one job each, same machine.
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
T="python3 -m torch.distributed.run --standalone --nproc-per-node 4"
timeout 90 $T bench/all_to_all.py --sizes 1024 2048 --out $OUT/all_to_all_4gpu_priority.json > /tmp/c0.log 2>&1
grep -v '^{' /tmp/c0.log | grep -v warn | tail -20 > $OUT/errors_c0.txt
python3 -c "
import json
for r in json.load(open('$OUT/all_to_all_4gpu_priority.json')):
    print(r['size'], r['message'], r['transport'], 'a2a %.3f host %.3f mm %.3f together %.3f hidden %.3f' % (r['a2a_ms'], r['a2a_host_ms'], r['mm_ms'], r['together_ms'], r['hidden_ms']))"
SIZE=1024 LIMIT=130 bash bench/scripts/copy_engine_b.sh
