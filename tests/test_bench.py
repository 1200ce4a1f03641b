"""The GPU benchmarks' logic, run on the CPU with --dry-run (tiny preset, tiny sizes, fp32).

What the dry run can check here: every implementation produces a row, ours and diffusers' builds get identical
weights (their fp32 outputs agree to rounding), compiled rows equal eager, fp8 rows carry a measured error, the
JSON is written, diffusers' rows are skipped with a message when it is missing, and the end-to-end skeleton
(random Mistral3 text encoder, sampler, VAE) runs and builds its text encoder correctly on the meta device.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import REPO_ROOT, spawn_cpu

sys.path.insert(0, str(REPO_ROOT / "bench"))
import common
import e2e
import transformer_step


@pytest.fixture(autouse=True)
def _restore_dynamo_config():
    """The benchmarks raise dynamo's recompile limits process-wide; put them back for the other tests.

    Plain getattr/setattr, not monkeypatch: monkeypatch's undo left torch's config module without the
    `accumulated_*` keys in forked children (torch 2.13), which broke later compiled tests in the same run."""
    cfg = torch._dynamo.config
    names = ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
             "accumulated_cache_size_limit", "fail_on_recompile_limit_hit", "fail_on_cache_limit_hit")  # fmt: skip
    saved = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
    torch._dynamo.reset()
    yield
    for n, v in saved.items():
        setattr(cfg, n, v)
    torch._dynamo.reset()


def test_transformer_step_dry_run(tmp_path):
    out = tmp_path / "step.json"
    argv = ["--dry-run", "--cases", "tiny:64:1", "--compile-backend", "eager", "--out", str(out)]  # dynamo only
    result = transformer_step.main(argv)
    saved = json.loads(out.read_text())
    rows = {r["impl"]: r for r in saved["rows"]}
    assert set(rows) == set(transformer_step.IMPLS) and len(result["rows"]) == len(saved["rows"])
    assert "skipped" in rows["cudagraph"]["error"]  # CUDA graphs: GPU only
    timed = [r for r in rows.values() if "s_per_step" in r]
    assert all(r["s_per_step"] > 0 and r["tflops"] > 0 and r["n_img_tokens"] == 32 for r in timed)
    assert saved["ceilings"]["bf16_tflops"] > 0 and saved["env"]["device"] == "cpu"
    if common.diffusers_available():
        assert len(timed) == 6 and rows["eager"]["rel_l2_vs_diffusers"] <= 1e-5  # same weights, fp32
        assert rows["diffusers-compiled"]["ratio_vs_diffusers_compiled"] == 1.0
        assert rows["compiled"]["rel_l2_vs_diffusers"] <= 1e-5
    assert rows["compiled"]["rel_l2_vs_eager"] <= 1e-5
    assert 0.005 < rows["fp8"]["rel_l2_vs_eager"] < 0.06  # fp8 really quantizes, and stays near e4m3's floor
    assert rows["fp8-compiled"]["rel_l2_vs_eager"] == pytest.approx(rows["fp8"]["rel_l2_vs_eager"], rel=1e-3)


def test_diffusers_rows_are_skipped_without_diffusers(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(transformer_step, "diffusers_available", lambda: None)
    result = transformer_step.main(["--dry-run", "--cases", "tiny:64:0", "--impls", "eager,diffusers"])
    rows = {r["impl"]: r for r in result["rows"]}
    assert "s_per_step" in rows["eager"] and "not installed" in rows["diffusers"]["error"]
    assert "diffusers is not installed" in capsys.readouterr().out


def test_case_order_and_parsing():
    args = transformer_step.parse_args(["--models", "flux.2-klein-4b", "--sizes", "512,1024,2048", "--refs", "0,4"])
    cases = transformer_step.parse_cases(args)
    assert cases[:3] == [("flux.2-klein-4b", 1024, 0), ("flux.2-klein-4b", 512, 0), ("flux.2-klein-4b", 2048, 0)]
    assert len(cases) == 6
    with pytest.raises(SystemExit):
        transformer_step.parse_args(["--impls", "eager,tensorrt"])


def test_seeded_weights_do_not_depend_on_build_order():
    from fluxrt.config import get_preset

    cfg = get_preset("tiny").transformer
    a = common.random_flux2(cfg, torch.device("cpu"), torch.float32, seed=3)
    b = common.random_flux2(cfg, torch.device("cpu"), torch.float32, seed=3)
    c = common.random_flux2(cfg, torch.device("cpu"), torch.float32, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["single_blocks.0.linear1.weight"], sc["single_blocks.0.linear1.weight"])
    w = sa["double_blocks.1.img_mlp.0.weight"]
    assert abs(w.std().item() * w.shape[1] ** 0.5 - 1) < 0.05  # std 1/sqrt(fan_in)


def test_e2e_dry_run(tmp_path):
    out = tmp_path / "e2e.json"
    report = e2e.main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text())["total_s"] == pytest.approx(report["total_s"])
    assert set(report["stages"]) == {"text_encoder", "denoise", "vae_decode"}
    assert report["image_shape"] == [1, 3, 64, 64] and report["image_finite"]
    assert report["stages"]["denoise"]["s_per_step"] > 0


@torch.no_grad()
def test_meta_built_text_encoder_equals_a_plain_build():
    """Built on meta then materialised: the RoPE buffers must be recomputed, or every feature is wrong."""
    from transformers import MistralModel

    te = e2e.random_text_encoder(e2e.TINY_TE, e2e.TINY_MISTRAL_TEXT, torch.device("cpu"), torch.float32)
    plain = MistralModel(e2e.mistral_text_config(e2e.TINY_MISTRAL_TEXT, 3)).eval()
    plain.load_state_dict(te.decoder.state_dict(), strict=False)  # its final norm is the only extra
    plain.norm = torch.nn.Identity()
    ids, mask = e2e.prompt_batch(e2e.TINY_TE, e2e.TINY_MISTRAL_TEXT["vocab_size"], 10, "cpu")
    states = plain(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    feats = te(ids, mask)
    assert feats.shape == (1, 32, 48) and feats.std() > 0.1
    assert torch.equal(feats, torch.cat([states[k] for k in (1, 2, 3)], -1))


def test_real_text_encoder_sizes_are_the_assumed_ones():
    text = e2e.mistral_text_config(e2e.MISTRAL_SMALL_TEXT, 30)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        5120, 30, 32, 8)  # fmt: skip
    assert (text.head_dim, text.intermediate_size, text.vocab_size) == (128, 32768, 131072)


def test_attention_dry_run_and_kernel_rows(tmp_path):
    import attention_kernels as attention_bench

    out = tmp_path / "attention.json"
    res = attention_bench.main(["--dry-run", "--kernels", "sdpa,math,cudnn", "--iters", "2", "--out", str(out)])
    rows = {r["kernel"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"sdpa", "math"} and len(res["rows"]) == 2  # cuDNN is CUDA-only: no CPU row
    assert rows["sdpa"]["vs_sdpa_rel_l2"] == 0 and 0 < rows["math"]["vs_sdpa_rel_l2"] < 1e-5
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in rows.values())
    with pytest.raises(SystemExit):
        attention_bench.main(["--dry-run", "--kernels", "sdpa,nope"])


def test_cudnn_rows_are_skipped_on_cpu():
    result = transformer_step.main(["--dry-run", "--cases", "tiny:64:0", "--impls", "eager,compiled-cudnn",
                                    "--compile-backend", "eager"])  # fmt: skip
    rows = {r["impl"]: r for r in result["rows"]}
    assert "s_per_step" in rows["eager"] and "needs a CUDA device" in rows["compiled-cudnn"]["error"]


def test_vae_variants_smoke_run_and_bad_variants(tmp_path):
    """Each variant trains from its seed on the same renders and is scored on held-out ones; same seed and recipe
    give the same VAE, a different learning rate a different one; bad variants name the bad part."""
    import vae_variants

    out = tmp_path / "vae.json"
    vae_variants.main(["--scale", "smoke", "--steps", "3", "--held", "4", "--device", "cpu", "--workers", "1",
                       "--variant", "a:", "--variant", "b:", "--variant", "c:lr=5e-4,clip=0.5", "--out", str(out)])  # fmt: skip
    rows = {r["name"]: r for r in json.loads(out.read_text())["variants"]}
    assert rows["a"]["held_out_mse"] == rows["b"]["held_out_mse"] != rows["c"]["held_out_mse"]
    assert rows["c"]["lr"] == 5e-4 and rows["c"]["clip"] == 0.5 and len(rows["a"]["log"]) == 2
    with pytest.raises(SystemExit, match="'beta'"):
        vae_variants.parse_variant("x:beta=2")
    with pytest.raises(SystemExit, match="'fast' is not a float"):
        vae_variants.parse_variant("x:lr=fast")


def _parallel_bench_worker(plans: tuple[str, ...]) -> list[dict]:
    import dataclasses

    import parallel as parallel_bench
    import torch.distributed as dist

    from fluxrt.config import TINY
    from fluxrt.parallel import DistInfo

    torch.set_num_threads(1)
    cfg = dataclasses.replace(TINY.transformer, use_guidance_embed=False)  # a CFG model, as klein base
    info = DistInfo(dist.get_rank(), dist.get_world_size(), dist.get_rank(), torch.device("cpu"))
    return [parallel_bench.run_plan(p, cfg, 32, 1, info, mode="cfg") for p in plans]


def test_parallel_bench_times_cfg_models_and_batch_plans():
    """bench/parallel.py runs a CFG model in CFG mode, and a batch plan puts one CFG half on each rank, checked
    against one process first (same weights, bf16)."""
    one, batch = spawn_cpu(2, _parallel_bench_worker, ("1", "batch2"))
    assert one["mode"] == batch["mode"] == "cfg" and one["gpus"] == 1 and batch["gpus"] == 2 == batch["batch"]
    assert batch["check_max_abs_diff"] <= 0.01 * batch["check_ref_max_abs"] and batch["output_finite"]  # bf16


def _parallel_profile_worker() -> dict:
    import parallel as parallel_bench
    import torch.distributed as dist

    from fluxrt.config import TINY
    from fluxrt.parallel import DistInfo

    torch.set_num_threads(1)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), dist.get_rank(), torch.device("cpu"))
    return parallel_bench.run_plan("sp2", TINY.transformer, 32, 1, info, profile_steps=2)


def test_parallel_bench_profiles_a_plan_with_its_collectives():
    """--profile-steps bins a Ulysses plan's work per step; its all-to-alls land in the collective bin."""
    res = spawn_cpu(2, _parallel_profile_worker)  # rank 0's
    prof = res["profile"]
    assert prof["steps"] == 2 and prof["source"] == "cpu" and prof["wall_ms_per_step"] > 0
    assert prof["categories"]["collective"]["calls_per_step"] >= 2 * 2  # q,k,v and output, >= 2 blocks
    assert prof["categories"]["gemm"]["ms_per_step"] > 0


def test_parallel_bench_refuses_unknown_plan_variants_with_the_known_ones():
    import parallel as parallel_bench

    from fluxrt.config import TINY
    from fluxrt.parallel import DistInfo

    info = DistInfo(0, 2, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown plan variant 'fast' in 'sp2:ce:fast'; known: overlap, ce, cepull, ceflat, ceperm, unfused, stack"):
        parallel_bench.run_plan("sp2:ce:fast", TINY.transformer, 32, 1, info)


def test_step_cache_bench_counts_skipped_steps_and_compares_images(tmp_path):
    """bench/step_cache.py on the embedded model: a huge threshold skips every step after the first (2 of 3), and
    the images it makes are not the exact ones."""
    import step_cache

    out = tmp_path / "sc.json"
    step_cache.main(["--n", "2", "--size", "64", "--steps", "3", "--thresholds", "1e9", "--out", str(out)])
    res = json.loads(out.read_text())
    row = res["thresholds"]["1000000000.0"]
    assert res["steps"] == 3 and len(res["exact_runs_s"]) == 2
    assert row["skipped_fraction"] == pytest.approx(2 / 3) and row["identical_images"] == 0
    assert len(row["per_image_db"]) == 2 and row["min_db"] < 60


def test_parallel_generate_passes_its_flags_through_the_command_lines_checks(tmp_path):
    """bench/parallel_generate.py --flags: the parallel runs take `fluxrt generate` options, checked as the command
    line checks them (`Launch.from_args`): --overlap runs on CPU ranks and gives one process's image; the
    copy-engine transport is refused there, with the device named."""
    import parallel_generate

    out = tmp_path / "pg.json"
    base = ["--gpus", "2", "--plans", "sp", "--size", "64", "--steps", "1", "--device", "cpu", "--out", str(out)]
    parallel_generate.main([*base, "--flags=--overlap"])
    rows = json.loads(out.read_text())["rows"]
    assert [r["plan"] for r in rows] == ["1 process", "sp2"] and rows[1]["flags"] == "--overlap"
    assert rows[1]["max_abs"] <= 1, rows[1]
    with pytest.raises(ValueError, match="needs CUDA GPUs.*cpu"):
        parallel_generate.main([*base, "--flags=--transport copy-engine"])


def test_step_ab_rounds_alternate_and_every_variant_is_timed(tmp_path):
    import step_ab

    out = tmp_path / "ab.json"
    result = step_ab.main(["--dry-run", "--variants", "unfused,fused", "--out", str(out)])  # 2 rounds
    saved = json.loads(out.read_text())
    assert [r["order"] for r in saved["rounds"]] == [["unfused", "fused"], ["fused", "unfused"]]
    assert all(r["s_per_step"]["unfused"] > 0 and r["s_per_step"]["fused"] > 0 for r in saved["rounds"])
    s = result["summary"]
    assert s["unfused"]["ratio_to_first"] == 1.0 and s["fused"]["rel_l2_vs_first"] == 0.0  # CPU: the same ops
    with pytest.raises(SystemExit):
        step_ab.main(["--dry-run", "--variants", "unfused,fast"])


def test_block_kernels_dry_run_times_and_profiles_each_variant(tmp_path):
    import block_kernels

    out, code = tmp_path / "blocks.json", tmp_path / "code.txt"
    block_kernels.main(["--dry-run", "--blocks", "single", "--variants", "base,nr", "--out", str(out),
                        "--code", str(code)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["block"], r["variant"]) for r in rows] == [("single", "base"), ("single", "nr")]
    for r in rows:
        assert r["ms"] > 0 and r["first_call_s"] > 0 and r["top_kernels"] and r["rel_l2_vs_eager"] < 1e-5
    assert "# ===== single block, variant base" in code.read_text()


def test_step_products_are_the_forward_s_linears_and_attentions_with_their_shapes():
    import sustained

    from fluxrt.config import get_preset

    cfg = get_preset("flux.2-dev").transformer
    products = sustained.step_products(cfg, 1024)  # recorded from a meta-device forward of the full-size model
    attn = [p for p in products if p.name == "attention"]
    assert len(attn) == cfg.depth + cfg.depth_single_blocks
    assert {(p.m, p.k, p.n, p.d) for p in attn} == {(48, 4608, 4608, 128)}
    lin = {p.name: (p.m, p.k, p.n) for p in products if p.name != "attention"}
    assert lin["single_blocks.47.linear1"] == (4608, 6144, 3 * 6144 + 2 * 18432)
    assert lin["double_blocks.0.txt_attn.qkv"] == (512, 6144, 3 * 6144)
    assert lin["double_stream_modulation_img.lin"][0] == 1
    # the same FLOPs as the benchmarks' formula (which leaves out the embedders of t and guidance, the modulations
    # and the final layer's adaLN: all batch-1 products)
    big = sum(p.flops for p in products if p.name == "attention" or p.m > 1)
    assert big == pytest.approx(common.step_flops(cfg, 512, 4096), rel=1e-6)
    # one rank of Ulysses over 2 GPUs: half of every stream's tokens, half the heads, the batch-1 products whole
    half = {p.name: (p.m, p.k, p.n, p.d) for p in sustained.step_products(cfg, 1024, shard=2)}
    assert half["single_blocks.47.linear1"][0] == 2304 and half["double_blocks.0.txt_attn.qkv"][0] == 256
    assert half["attention"] == (24, 4608, 4608, 128) and half["double_stream_modulation_img.lin"][0] == 1


def test_elementwise_traffic_counts_the_least_bytes_each_block_s_elementwise_work_moves():
    import sustained

    from fluxrt.config import get_preset

    cfg = get_preset("flux.2-dev").transformer
    d, tokens = cfg.hidden_size, 4608  # 1024²: 4096 image + 512 text tokens
    # per token, in units of the hidden width: a single block moves q, k, v through norm + RoPE (read 3, write 3),
    # SwiGLU (read 2 x 3, write 3) and the residual + next modulation (read 2, write 2): 19; a double block the same
    # per stream plus the second residual + modulation (4) between attention and MLP: 23
    want = tokens * d * (cfg.depth_single_blocks * 19 + cfg.depth * 23)
    got = [sustained.elementwise_traffic(p) for p in sustained.step_products(cfg, 1024)]
    assert sum(got) == want
    half = sum(map(sustained.elementwise_traffic, sustained.step_products(cfg, 1024, shard=2)))
    assert half == want // 2
    assert sustained.elementwise_traffic(sustained.Product("attention", 48, 4608, 4608, 128)) == 0


def test_sustained_dry_run_times_and_profiles_every_workload(tmp_path):
    import sustained

    out = tmp_path / "sustained.json"
    sustained.main(["--dry-run", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert list(saved["workloads"]) == list(sustained.WORKLOADS)
    for name, row in saved["workloads"].items():
        assert row["units"] >= 2 and row["sustained"]["tflops"] > 0, name
        assert row["profile"]["categories"]["gemm"]["calls_per_step"] > 0, name
    products = saved["workloads"]["products"]["profile"]["categories"]
    calls = products["attention"]["calls_per_step"]  # on the CPU each call shows as the op and its kernel op
    assert calls > 0 and calls % 4 == 0  # the tiny preset's 2 double + 2 single blocks
    with pytest.raises(SystemExit):
        sustained.main(["--dry-run", "--workloads", "square,cube"])


def test_gpu_samples_are_parsed_and_averaged_per_window():
    import sustained

    lines = ["2026/11/27 15:00:00.000, 1980, 450.5, 50, 0x0000000000000000",
             "2026/11/27 15:00:01.000, 1755, 699.9, 60, 0x0000000000000004",
             "2026/11/27 15:00:02.000, 1695, 700.1, 62, 0x0000000000000004",
             "2026/11/27 15:00:03.000, [N/A], 700.0, 63, 0x0000000000000020", "garbage",
             "2026/11/27 15:00:09.000, 1700, 690.0, 60"]  # a driver without the reasons field  # fmt: skip
    samples = [s for s in map(sustained.parse_sample, lines) if s is not None]
    assert len(samples) == 5 and "clocks.sm" not in samples[3][1] and "reasons" not in samples[4][1]
    t0 = samples[0][0]
    w = sustained.window_stats(samples, t0 + 0.5, t0 + 3.5)
    assert w["samples"] == 3 and w["sm_mhz"] == pytest.approx(1725) and w["power_w"] == pytest.approx(700.0)
    assert w["power_capped"] == pytest.approx(2 / 3) and w["thermal"] == pytest.approx(1 / 3)


def test_nvidia_smi_query_falls_back_to_the_clock_event_field_the_driver_knows(tmp_path, monkeypatch):
    import os

    import sustained

    fake = tmp_path / "nvidia-smi"  # an old driver: knows clocks_throttle_reasons, not clocks_event_reasons
    fake.write_text('#!/bin/sh\ncase "$*" in *clocks_event_reasons*) exit 6;; esac\necho ok\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    sustained._smi_query.cache_clear()
    try:
        cmd = sustained._smi_query("00000000:1B:00.0")
        assert cmd[:3] == ["nvidia-smi", "-i", "00000000:1B:00.0"]
        assert cmd[3] == "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
        fake.write_text("#!/bin/sh\nexit 9\n")  # a driver that answers nothing: no samples, no error
        sustained._smi_query.cache_clear()
        assert sustained._smi_query("00000000:1B:00.0") is None
    finally:
        sustained._smi_query.cache_clear()


def test_trace_gaps_bins_the_idle_time_between_compute_kernels_by_neighbours_and_by_what_ran_beside(tmp_path):
    import gzip

    import trace_gaps

    def ev(stream, ts, dur, name, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": stream, "args": {"stream": stream}}

    gemm, fused = "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "triton_poi_fused_add_mul_0"
    events = [ev(7, 0, 100, gemm), ev(8, 90, 15, fused),  # a graph's kernels on two streams: busy 0-105
              ev(20, 95, 13, "c10d::symmetric_memory::barrier_kernel"),  # covers 105-108 of the gap 105-110
              ev(7, 110, 40, gemm),  # busy 110-150, then a gap 150-160 that a copy-engine copy half covers
              ev(21, 150, 5, "Memcpy PtoP (Device -> Device)", "gpu_memcpy"),
              ev(9, 160, 10, fused),
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500, "tid": 1}]  # fmt: skip
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    rep = trace_gaps.main([str(path), "--steps", "1", "--out", str(tmp_path / "gaps.json")])
    assert rep["gaps_per_step"] == 2 and rep["span_ms_per_step"] == pytest.approx(0.170)
    assert rep["idle_ms_per_step"] == pytest.approx(0.015) and rep["compute_busy_ms_per_step"] == pytest.approx(0.155)
    assert rep["pairs"]["triton -> gemm"]["ms_per_step"] == pytest.approx(0.005)  # the last kernel to end, not A
    assert rep["pairs"]["gemm -> triton"]["ms_per_step"] == pytest.approx(0.010)
    during = rep["during_ms_per_step"]
    assert during["barrier"] == pytest.approx(0.003) and during["copy"] == pytest.approx(0.005)
    assert during["nothing"] == pytest.approx(0.007)
    assert json.loads((tmp_path / "gaps.json").read_text())["gaps_per_step"] == 2
    with pytest.raises(ValueError, match="no kernels"):
        trace_gaps.gaps(trace_gaps.device_events({"traceEvents": events[-1:]}))
