#!/bin/bash
# Eleventh session, one GPU: inductor's max-autotune (GEMM templates, epilogue fusion; no CUDA graphs) against the
# default compile, dev 1024², no reference, bf16 and fp8, with diffusers' compiled step in the same call (issue 5);
# first the GPU test of the --cuda-graph pipeline.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=src:/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpus.txt
timeout 90 python3 -m pytest -q -m gpu tests/test_accel.py -k cuda_graph_pipeline > $OUT/gpu_test.txt 2>&1
S="python3 bench/transformer_step.py --cases flux.2-dev:1024:0"
timeout 190 $S --impls compiled,fp8-compiled,diffusers-compiled --time-budget-s 170 --out $OUT/step_default.json > /tmp/a.log 2>&1
timeout 300 $S --impls compiled,fp8-compiled --compile-mode max-autotune-no-cudagraphs --time-budget-s 280 --out $OUT/step_max_autotune.json > /tmp/b.log 2>&1
tail -5 /tmp/a.log /tmp/b.log > $OUT/logs.txt
python3 -c "
import json
for f in ['step_default','step_max_autotune']:
    try: rows=json.load(open('$OUT/'+f+'.json'))
    except Exception as e: print(f, e); continue
    rows = rows.get('rows', rows) if isinstance(rows, dict) else rows
    for r in rows: print(f, r.get('impl'), r.get('s_per_step'), r.get('ratio_vs_diffusers_compiled'), r.get('first_call_s'), r.get('error'))
"
tail -3 $OUT/gpu_test.txt
