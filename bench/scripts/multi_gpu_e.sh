#!/bin/bash
# Two 2-GPU jobs at once on one 4-GPU host: GPUs 0, 1 run Ulysses SP 2, GPUs 2, 3 SP 2 with --overlap; dev
# compiled bf16, 1024² (profiled 3 steps) then 2048², 50 steps.
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
R="python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench/parallel.py --model flux.2-dev --compile --steps 50"
for pair in "0,1 sp2" "2,3 sp2:overlap"; do
  set -- $pair; n=${2/:/_}
  (CUDA_VISIBLE_DEVICES=$1 timeout 120 $R --sizes 1024 --plans $2 --profile-steps 3 --out $OUT/dev1024_bf16_2gpu_$n.json > $OUT/dev1024_bf16_2gpu_$n.log 2>&1
   CUDA_VISIBLE_DEVICES=$1 timeout 170 $R --sizes 2048 --plans $2 --out $OUT/dev2048_bf16_2gpu_$n.json > $OUT/dev2048_bf16_2gpu_$n.log 2>&1) &
done
wait
