#!/bin/bash
# 4 GPUs of one host, the current defaults (fused QK-norm + RoPE, copy engines pushing, q, k, v and the attention's
# output landing in place), SP 4 --overlap in a CUDA graph, dev, 50 steps: 2048² bf16, then 1024² fp8 linears
# (the README's 4-GPU numbers at 2048² and in fp8 were measured before these changes). About 5 minutes.
export PYTHONPATH=src
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpus.txt
R="python3 -m torch.distributed.run --standalone --nproc-per-node 4 bench/parallel.py --model flux.2-dev --compile --steps 50 --cuda-graph --plans sp4:overlap:ce"
timeout 200 $R --sizes 2048 --out $OUT/sp4_2048.json > /tmp/a.log 2>&1
timeout 150 $R --sizes 1024 --fp8 --out $OUT/sp4_fp8.json > /tmp/b.log 2>&1
grep -v '^{' /tmp/a.log /tmp/b.log | grep -v -i warn | grep -v '^\*\|OMP_NUM' | tail -4
python3 -c "import json; [print(r['plan'], r['size'], r['impl'], round(r['total_s'],3), r.get('check_max_abs_diff'), r.get('graph_max_abs_diff'), round(r['peak_mem_gib_max_rank'],1)) for f in ('$OUT/sp4_2048.json','$OUT/sp4_fp8.json') for r in json.load(open(f))]"
