"""bench/profile_step.py: kernel names land in the right bins, the FLOP split adds up, and the dry run (CPU ops
instead of CUDA kernels) writes every variant with categories that sum to the profiled total."""

from __future__ import annotations

import json
import sys
import types

import pytest
from conftest import REPO_ROOT
from torch.autograd import DeviceType

sys.path.insert(0, str(REPO_ROOT / "bench"))
import profile_step
from test_bench import _restore_dynamo_config  # noqa: F401 - autouse: the dry run raises dynamo's limits

from fluxrt.config import get_preset

KERNELS = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel"
    "__5x_cublas": "gemm",
    "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT": "gemm",
    "void cutlass::device_kernel<at::cuda::detail::enable_3x_kernel_for_sm90_or_later<cutlass::gemm::kernel::"
    "GemmUniversal<...>>>(...)": "gemm",
    "triton_tem_fused_mm_4": "gemm",  # max-autotune's Triton matmul template
    "aten::addmm": "gemm",
    "aten::mm": "gemm",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0": "attention",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
    "cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t> >, false>(...)": "attention",
    "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "triton_per_fused_add_mul_native_layer_norm_0": "triton",
    "triton_poi_fused_addmm_gelu_3": "triton",  # an extern matmul's epilogue, named after it
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, ...>(...)":
        "elementwise",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>(...)": "elementwise",
    "Memcpy DtoD (Device -> Device)": "elementwise",
    "aten::mul": "elementwise",
    "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)": "collective",
    "_c10d_functional::all_to_all_single": "collective",
    "Torch-Compiled Region: 0/0": "other",
}  # fmt: skip


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_names_land_in_their_bins(name):
    assert profile_step.classify(name) == KERNELS[name]
    assert profile_step.classify(name.upper()) == KERNELS[name]


def test_flop_split_adds_up():
    cfg = get_preset("flux.2-dev").transformer
    f = profile_step.flop_split(cfg, 512, 4096)
    assert f["attention"] == 56 * 4 * 4608**2 * 6144 and f["attention"] + f["linear"] == f["total"]
    assert 0.1 < f["attention"] / f["total"] < 0.2


def _event(name, device_type, activity, start, end, annotation=False):
    return types.SimpleNamespace(name=name, device_type=device_type, activity_type=activity,
                                 time_range=types.SimpleNamespace(start=start, end=end), is_user_annotation=annotation)  # fmt: skip


def test_device_records_keep_only_device_work():
    events = [
        _event("aten::mm", DeviceType.CPU, "cpu_op", 0, 50),
        _event("## Call CompiledFxGraph fabc ##", DeviceType.CUDA, "gpu_user_annotation", 0, 100, annotation=True),
        _event("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT", DeviceType.CUDA, "kernel", 10, 40),
        _event("Memset (Device)", DeviceType.CUDA, "gpu_memset", 40, 41),
        _event("cudaStreamSynchronize", DeviceType.CUDA, "cuda_sync", 41, 90),
        _event("triton_poi_fused_add_0", DeviceType.CUDA, None, 50, 52),  # a torch without activity_type
        _event("## old torch annotation ##", DeviceType.CUDA, None, 0, 100, annotation=True),
    ]
    assert profile_step.device_records(events) == [
        ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT", 30), ("Memset (Device)", 1), ("triton_poi_fused_add_0", 2)]  # fmt: skip


def test_summarize_per_step():
    records = [("nvjet_a", 300.0), ("nvjet_a", 300.0), ("flash_fwd", 100.0), ("triton_poi_x", 50.0), ("foo", 50.0)]
    s = profile_step.summarize(records, steps=2, top=2)
    assert s["busy_ms_per_step"] == pytest.approx(0.4) and s["kernels_per_step"] == 2.5
    gemm = s["categories"]["gemm"]
    assert gemm["ms_per_step"] == pytest.approx(0.3) and gemm["fraction"] == pytest.approx(0.75)
    assert [k["name"] for k in s["top_kernels"]] == ["nvjet_a", "flash_fwd"]
    assert s["top_kernels"][0]["calls_per_step"] == 1.0


def test_profile_dry_run(tmp_path):
    out = tmp_path / "profile.json"
    result = profile_step.main(["--dry-run", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("bench/profile_step.py --dry-run") and saved["env"]["device"] == "cpu"
    rows = {r["impl"]: r for r in saved["rows"]}
    assert list(rows) == list(profile_step.IMPLS) and len(result["rows"]) == 5
    for r in rows.values():
        assert r["source"] == "cpu" and r["s_per_step"] > 0 and set(r["categories"]) == set(profile_step.CATEGORIES)
        cat_ms = sum(c["ms_per_step"] for c in r["categories"].values())
        assert cat_ms == pytest.approx(r["busy_ms_per_step"]) and r["busy_ms_per_step"] > 0
        assert sum(c["fraction"] for c in r["categories"].values()) == pytest.approx(1.0)
        assert r["categories"]["gemm"]["ms_per_step"] > 0 and r["categories"]["attention"]["ms_per_step"] > 0
        assert 0 < len(r["top_kernels"]) <= 25 and r["gemm_tflops"] > 0 and r["ideal_s_bf16"] > 0
        assert r["non_matmul_s"] == pytest.approx(r["s_per_step"] - (cat_ms - sum(
            r["categories"][c]["ms_per_step"] for c in ("triton", "elementwise", "other"))) / 1e3)  # fmt: skip
    assert "ideal_s_fp8" in rows["fp8-compiled"] and "ideal_s_fp8" not in rows["compiled"]


def test_autotune_is_skipped_when_the_budget_is_short(tmp_path):
    result = profile_step.main(["--dry-run", "--impls", "autotune,eager", "--time-budget-s", "100"])
    rows = {r["impl"]: r for r in result["rows"]}
    assert "s_per_step" in rows["eager"] and "skipped" in rows["autotune"]["error"]
    assert result["skipped"][0].startswith("autotune")
    args = profile_step.parse_args(["--time-budget-s", "500"])  # GPU defaults: autotune keeps room for fp8-compiled
    assert profile_step._needed({}, "autotune", ["fp8-compiled"], args) == 240 + 120
    assert profile_step._needed({"compiled": 90.0, "autotune": 400.0}, "fp8-compiled", [], args) == 90
