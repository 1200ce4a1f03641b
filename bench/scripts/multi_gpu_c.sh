#!/bin/bash
# As run on 2026-11-27: its multi-plan compiled jobs ran out of memory after the first plan (see multi_gpu_d.sh,
# one plan per job, and bench/RESULTS.md); kept as the record of what produced those rows.
# Three jobs at once on separate GPUs of one 4-GPU host. GPUs 0, 1: dev compiled bf16 Ulysses SP 2 and SP 2 with
# --overlap at 1024² (profiled 3 steps) and 2048², 50 steps. GPU 2: issue 5's dev cases against diffusers
# (2048², 1024² with 4 references, 512²). GPU 3: klein 4B and 9B against diffusers. diffusers from carried wheels.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=src:/tmp/site
R="python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench/parallel.py --model flux.2-dev --compile --steps 50"
S="python3 bench/transformer_step.py --time-budget-s 480"
(CUDA_VISIBLE_DEVICES=0,1 timeout 270 $R --sizes 1024 --plans sp2 sp2:overlap --profile-steps 3 --out $OUT/dev1024_bf16_2gpu.json > $OUT/dev1024_bf16_2gpu.log 2>&1
 CUDA_VISIBLE_DEVICES=0,1 timeout 280 $R --sizes 2048 --plans sp2 sp2:overlap --out $OUT/dev2048_bf16_2gpu.json > $OUT/dev2048_bf16_2gpu.log 2>&1) &
CUDA_VISIBLE_DEVICES=2 timeout 560 $S --cases flux.2-dev:2048:0,flux.2-dev:1024:4,flux.2-dev:512:0 --impls eager,compiled,fp8-compiled,diffusers,diffusers-compiled --out $OUT/step_dev.json > $OUT/step_dev.log 2>&1 &
CUDA_VISIBLE_DEVICES=3 timeout 560 $S --cases flux.2-klein-4b:1024:0,flux.2-klein-9b:1024:0,flux.2-klein-4b:512:0,flux.2-klein-9b:512:0,flux.2-klein-4b:2048:0 --impls eager,compiled,cudagraph,fp8-compiled,diffusers,diffusers-compiled --out $OUT/step_klein.json > $OUT/step_klein.log 2>&1 &
wait
