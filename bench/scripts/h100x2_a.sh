#!/bin/bash
# Fifteenth session, 2 x H100 (the cards of SGLang's published 12.8 s, TP 2): dev 1024², 50 steps, compiled, the
# current defaults: SP 2 --overlap over copy engines in a CUDA graph (bf16, then fp8 linears), TP 2 (bf16, no
# graph, as the sixth session's 2-GPU TP row); then bench/sustained.py on one of the cards: the 8192³ product and
# the products of one SP 2 rank, held for 10 s (the floor on this card). About 6 minutes.
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > $OUT/gpus.txt
R="python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench/parallel.py --model flux.2-dev --compile --steps 50 --sizes 1024"
timeout 150 $R --cuda-graph --plans sp2:overlap:ce --out $OUT/sp2.json > /tmp/a.log 2>&1
timeout 130 $R --cuda-graph --fp8 --plans sp2:overlap:ce --out $OUT/sp2_fp8.json > /tmp/b.log 2>&1
timeout 150 $R --plans tp2 --out $OUT/tp2.json > /tmp/c.log 2>&1
timeout 100 python3 bench/sustained.py --workloads square,products --shard 2 --seconds 10 --idle-s 3 --out $OUT/sustained_sp2.json 2>&1 | grep -v -e USDT -e Warn -e _warn
cat $OUT/gpus.txt
grep -h -i -e error -e Traceback /tmp/a.log /tmp/b.log /tmp/c.log | head -5
for f in $OUT/sp2.json $OUT/sp2_fp8.json $OUT/tp2.json; do
  python3 -c "import json,sys; [print(r['plan'], r['size'], r['impl'], round(r['total_s'],3), r.get('check_max_abs_diff'), round(r['peak_mem_gib_max_rank'],1)) for r in json.load(open(sys.argv[1]))]" $f
done
