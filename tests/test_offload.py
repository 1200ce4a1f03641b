"""fluxrt.memory: block streaming (exact on the CPU, same bookkeeping as on CUDA), the planner on the real presets'
sizes (arithmetic and the meta device only), placing a plan, `--quant` / `--vram` through the CLI on the embedded
model, and the GPU benchmark's dry run.
"""

from __future__ import annotations

import copy
import json
import re
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, TINY_TRANSFORMER, tiny_flux2
from PIL import Image

from fluxrt.config import PRESETS
from fluxrt.memory import Plan, parse_size, plan_memory, resident_indices, stream_blocks, streamer_of
from fluxrt.memory.apply import memory_plan, place_transformer
from fluxrt.memory.plan import FOUR_BIT, text_encoder_sizes, transformer_sizes
from fluxrt.models.transformer import Flux2
from fluxrt.quant.fp8 import quantize_transformer
from fluxrt.request import RequestError

ALL_SCHEMES = ("fp8", "nf4", "int4")  # the planner's view of an install with every quantized layer
DEV, KLEIN_4B = PRESETS["flux.2-dev"], PRESETS["flux.2-klein-4b"]


def inputs(cfg=TINY_TRANSFORMER, n_img=16, n_txt=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(1, n_img, 128, generator=g), torch.randn(1, n_txt, cfg.context_in_dim, generator=g)
    ids, cids = torch.zeros(1, n_img, 4), torch.zeros(1, n_txt, 4)
    ids[..., 1], cids[..., 3] = torch.arange(n_img), torch.arange(n_txt)
    return x, ids, torch.full((1,), 0.5), ctx, cids, torch.full((1,), 4.0)


# -------------------------------------------------------------------------------------------- sizes, parsing
@pytest.mark.parametrize("text, n", [("24GB", 24 * 10**9), ("12GiB", 12 * 2**30), ("24000MB", 24 * 10**9),
                                     ("7.5 GB", 7_500_000_000), ("512mib", 512 * 2**20), (1000, 1000)])  # fmt: skip
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["24", "24XB", "GB", "-1GB", "0GB", "24 G B"])
def test_parse_size_errors_name_the_value(bad):
    with pytest.raises(RequestError, match=re.escape(repr(bad))):
        parse_size(bad)


def test_resident_indices_spread_evenly():
    assert resident_indices(8, 0) == [] and resident_indices(8, 8) == resident_indices(8, 99) == list(range(8))
    assert resident_indices(8, 2) == [0, 4] and resident_indices(56, 14) == list(range(0, 56, 4))
    for n, k in [(56, 13), (25, 7), (4, 3)]:
        got = resident_indices(n, k)
        assert len(got) == k and len(set(got)) == k and all(0 <= i < n for i in got)


# ------------------------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize("prefetch, resident", [(1, 0), (2, 1), (0, 0), (3, 0), (1, 4)])
def test_streamed_model_is_exact(prefetch, resident):
    model = tiny_flux2()
    inp = inputs()
    ref = model(*inp)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    streamed = stream_blocks(copy.deepcopy(model), "cpu", prefetch, resident=resident)
    with torch.inference_mode():
        outs = [streamed(*inp) for _ in range(2)]  # the second forward uses the wrapped-around prefetch
    assert all(torch.equal(o, ref) for o in outs)
    after = streamed.state_dict()  # at rest the blocks read their host buffers: the weights are unchanged
    assert all(torch.equal(after[k], v) for k, v in state.items())
    st = streamer_of(streamed)
    assert len(st.blocks) == 4 - resident and len(st.slots) == min(prefetch + 1, 4 - resident)


def test_prefetch_is_issued_before_the_block_runs():
    streamed = stream_blocks(tiny_flux2(), "cpu", prefetch=1)
    st = streamer_of(streamed)
    st.log = []
    with torch.no_grad():
        streamed(*inputs())
        first = list(st.log)
        st.log.clear()
        streamed(*inputs())
    # block k+1 is copied while block k runs; the last block prefetches the first one for the next step
    assert first == [("load", 0), ("load", 1), ("run", 0), ("load", 2), ("run", 1), ("load", 3), ("run", 2),
                     ("load", 0), ("run", 3)]  # fmt: skip
    assert st.log == [("load", 1), ("run", 0), ("load", 2), ("run", 1), ("load", 3), ("run", 2), ("load", 0),
                      ("run", 3)]  # fmt: skip
    assert st.copied_bytes == 2 * sum(p.nbytes for p in st.parked) + st.parked[0].nbytes


def test_slots_hold_every_streamed_block_when_there_are_enough():
    streamed = stream_blocks(tiny_flux2(), "cpu", prefetch=3)  # 4 slots for 4 blocks: each is copied once
    with torch.no_grad():
        for _ in range(3):
            streamed(*inputs())
    assert streamer_of(streamed).loads == 4


@pytest.mark.parametrize("scheme", ["fp8", "nf4", "int4"])
def test_quantized_blocks_stream_exactly(scheme):
    from fluxrt.quant import quantize

    model = quantize(tiny_flux2(), scheme)  # fp8: Fp8Linear buffers `weight` + `weight_scale`; 4-bit: packed codes
    inp = inputs()
    ref = model(*inp)
    streamed = stream_blocks(copy.deepcopy(model), "cpu", 1, resident=1)
    with torch.no_grad():
        assert torch.equal(streamed(*inp), ref) and torch.equal(streamed(*inp), ref)


def test_non_persistent_streaming_leaves_nothing_on_the_device_between_calls():
    model = tiny_flux2()
    inp = inputs()
    ref = model(*inp)
    streamed = stream_blocks(copy.deepcopy(model), "cpu", 1, persistent=False)
    st = streamer_of(streamed)
    with torch.no_grad():
        out = streamed(*inp)
    assert torch.equal(out, ref)
    assert st.slots == [] and st.rest is not None  # slots freed, the modules outside the blocks parked too
    host = st.rest.host
    base, end = host.data_ptr(), host.data_ptr() + host.numel()
    assert base <= streamed.img_in.weight.data_ptr() < end  # at rest img_in reads the parked buffer


def test_stream_blocks_refuses_a_second_time():
    streamed = stream_blocks(tiny_flux2(), "cpu")
    with pytest.raises(ValueError, match="already streamed"):
        stream_blocks(streamed, "cpu")


def _tiny_qwen3_text_encoder():
    transformers = pytest.importorskip("transformers")
    import types

    from fluxrt.config import TINY_TEXT
    from fluxrt.models.text_encoder import TextEncoder

    cfg = transformers.Qwen3Config(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=8, vocab_size=128, num_hidden_layers=3,
                                   max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    lm = transformers.Qwen3Model(cfg).eval()
    return TextEncoder(lm, types.SimpleNamespace(padding_side="right"), TINY_TEXT)


@pytest.mark.slow
def test_streamed_text_encoder_is_exact():
    te = _tiny_qwen3_text_encoder()
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    ref = te(ids, mask)
    stream_blocks(te.decoder, "cpu", 1, blocks=list(te.decoder.layers), persistent=False)
    with torch.inference_mode():
        out = te(ids, mask)
    assert torch.equal(out, ref) and streamer_of(te.decoder).loads == 3


# --------------------------------------------------------------------------------------------- the planner
def test_sizes_follow_the_model_and_published_lms():
    for spec, params in [(DEV, 32_223_281_152), (KLEIN_4B, 3_875_544_576)]:
        with torch.device("meta"):
            n = sum(p.numel() for p in Flux2(spec.transformer).parameters())
        assert n == params and transformer_sizes(spec.transformer, None, 1).total == params
        fp8, nf4 = transformer_sizes(spec.transformer, "fp8", 2), transformer_sizes(spec.transformer, "nf4", 2)
        assert 0.5 * 2 * params < fp8.total < 0.8 * 2 * params  # fluxrt.quant's fp8 policy keeps some layers in bf16
        assert 0.25 * 2 * params < nf4.total < 0.35 * 2 * params  # 4.5 bits a weight, the rest (2.5%) in bf16
    # Mistral-Small-3.x's text model has 23.57B parameters over 40 layers (+ an untied LM head): 30 are kept
    te = text_encoder_sizes(DEV.text_encoder, None, 1)
    assert te.layers == 30 and 40 * te.layer + 2 * te.other == pytest.approx(23.57e9, rel=0.005)
    q4 = text_encoder_sizes(KLEIN_4B.text_encoder, None, 1)  # Qwen3-4B: 4.02B with tied embeddings, 36 layers
    assert q4.layers == 27 and 36 * q4.layer + q4.other == pytest.approx(4.02e9, rel=0.01)


def _check(plan: Plan) -> Plan:
    e = plan.estimates
    assert e["peak"] <= e["usable"] < plan.vram and e["peak"] == max(e["encode"], e["denoise"], e["decode"])
    return plan


def test_plan_dev_80gb():
    exact = _check(plan_memory(DEV, "80GB", schemes=ALL_SCHEMES))  # bf16 fits: nothing lossy is chosen
    assert exact.quant is None and not exact.streamed and exact.text_encoder == "stream"
    fp8 = _check(plan_memory(DEV, "80GB", "fp8", schemes=ALL_SCHEMES, text_encoder_quant="fp8"))
    assert fp8.quant == "fp8" and not fp8.streamed and fp8.text_encoder == "gpu" and fp8.text_encoder_quant == "fp8"
    assert fp8.estimates["transformer"] == transformer_sizes(DEV.transformer, "fp8", 2).total < 0.75 * 64.4e9


def test_plan_dev_24gb_is_4bit_and_mostly_resident():
    plan = _check(plan_memory(DEV, "24GB", schemes=ALL_SCHEMES))
    assert plan.quant in FOUR_BIT and plan.resident >= 0.9 * plan.blocks and plan.text_encoder == "stream"
    assert "fp8" not in (plan_memory(DEV, "24GB", schemes=ALL_SCHEMES).quant or "")  # fp8 (33 GB) cannot fit
    two = _check(plan_memory(DEV, "24GB", schemes=ALL_SCHEMES, gpus=2))  # the encoder moves to the second card
    assert two.text_encoder == "cuda:1" and two.resident >= plan.resident


def test_plan_dev_12gb_streams_and_klein_4b_is_resident():
    dev = _check(plan_memory(DEV, "12GB", schemes=ALL_SCHEMES))
    assert dev.streamed and 0 < dev.resident < dev.blocks and dev.text_encoder in ("stream", "offload")
    assert "streamed from pinned CPU memory" in dev.describe() and "12.0 GB" in dev.describe()
    fp8_only = _check(plan_memory(DEV, "12GB", schemes=("fp8",)))  # without 4-bit layers: fp8, more streamed
    assert fp8_only.quant == "fp8" and fp8_only.resident < dev.resident
    klein = _check(plan_memory(KLEIN_4B, "12GB", schemes=ALL_SCHEMES))
    assert not klein.streamed and klein.text_encoder in ("gpu", "stream")


def test_plan_errors_and_switches():
    with pytest.raises(RequestError, match="does not fit in 4.0 GB: even streaming every block needs about"):
        plan_memory(DEV, "4GB", schemes=ALL_SCHEMES)
    with pytest.raises(RequestError, match="unknown quant scheme 'q3'"):
        plan_memory(DEV, "24GB", "q3")
    with pytest.raises(RequestError, match="'nf4' needs fluxrt.quant.quantize"):
        plan_memory(DEV, "24GB", "nf4", schemes=("fp8",))
    stream_all = plan_memory(DEV, None, "fp8", offload="stream")
    assert stream_all.resident == 0 and stream_all.text_encoder == "default"
    assert memory_plan(DEV, "cuda", torch.bfloat16) is None  # no option: no plan
    with pytest.raises(RequestError, match="--compile does not combine with streamed blocks"):
        memory_plan(DEV, "cuda", torch.bfloat16, vram="12GB", compile=True)


def test_place_transformer_quantizes_and_streams_as_planned():
    from fluxrt.quant import quantize

    model = tiny_flux2()
    ref = quantize(copy.deepcopy(model), "fp8")  # fluxrt.quant's default fp8 policy on the whole model
    plan = Plan("tiny", 64, 64, 10**6, "cpu", "fp8", blocks=4, resident=1, prefetch=1, text_encoder="default",
                text_encoder_quant=None)  # fmt: skip
    placed = place_transformer(model, plan, "cpu")
    st = streamer_of(placed)
    assert len(st.blocks) == 3 and placed.double_blocks[0] in st.resident  # resident_indices(4, 1) == [0]
    with torch.no_grad():
        assert torch.equal(placed(*inputs()), ref(*inputs()))


# ---------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def cli_run(monkeypatch, capsys):
    """cli.main with the real Pipeline.load, whose loaders hand out copies of the cached embedded components."""
    from test_pipeline import embedded_pipeline

    from fluxrt import cli, pipeline

    pipe = embedded_pipeline()
    def copy_to(module, dev):
        return copy.deepcopy(module).to(dev)

    monkeypatch.setattr(pipeline, "load_transformer", lambda root, dev, *a: (copy_to(pipe.transformer, dev), None))
    monkeypatch.setattr(pipeline, "load_autoencoder", lambda *a, **k: copy.deepcopy(pipe.ae))
    monkeypatch.setattr(pipeline, "_load_text_encoder", lambda root, spec, dev, dtype: copy_to(pipe.text_encoder, dev))

    def invoke(*argv):
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _streaming_budget(spec, quant, **kw) -> int:
    """The largest budget (whole MB) at which the planner streams `spec`'s blocks."""
    for mb in range(200, 1, -1):
        if plan_memory(spec, mb * 10**6, quant, **kw).streamed:
            return mb
    raise AssertionError("no budget streams")


@pytest.mark.slow
def test_cli_quant_and_vram(cli_run, tmp_path):
    from fluxrt.config import SHAPES
    from fluxrt.outputs import read_metadata

    fast = ["generate", "a red circle in the center on a white background", "--seed", "3", "--size", "64x64",
            "--steps", "2", "--quiet", "--device", "cpu"]  # fmt: skip
    code, _, _ = cli_run(*fast, "--out", tmp_path / "plain.png")
    assert code == 0
    code, _, err = cli_run(*fast, "--quant", "fp8", "--out", tmp_path / "fp8.png")
    assert code == 0 and "transformer: fp8, all 7 blocks resident" in err
    plain, fp8 = _pixels(tmp_path / "plain.png"), _pixels(tmp_path / "fp8.png")
    diff = np.abs(plain - fp8)
    assert 0 < diff.mean() < 8 and np.percentile(diff, 99) < 64  # e4m3 moves pixels a little, never wholesale
    assert read_metadata(tmp_path / "fp8.png")["quant"] == "fp8"
    mb = _streaming_budget(SHAPES, "fp8", size=(64, 64), dtype=torch.float32, device="cpu")
    code, _, err = cli_run(*fast, "--quant", "fp8", "--vram", f"{mb}MB", "--out", tmp_path / "streamed.png")
    assert code == 0 and "streamed from pinned CPU memory" in err and f"within {mb}.0 MB" in err
    assert np.array_equal(_pixels(tmp_path / "streamed.png"), fp8)  # streaming is exact
    code, _, err = cli_run(*fast, "--vram", "24XB", "--out", tmp_path / "bad.png")
    assert code == 2 and "invalid memory size '24XB'" in err


# -------------------------------------------------------------------------------------------- benchmark
@pytest.mark.slow
def test_memory_benchmark_dry_run(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import memory

    out = tmp_path / "memory.json"
    result = memory.main(["--dry-run", "--steps", "1", "--warmup", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    rows = {r["case"]: r for r in saved["rows"]}
    assert list(rows) == memory.DRY_CASES.split(",") and len(result["rows"]) == len(rows) and not saved["skipped"]
    assert all("error" not in r and r["denoise"]["s_per_step"] > 0 and r["decode"]["finite"] for r in rows.values())
    full = rows["tiny:60MB:fp8+te"]["plan"]  # the 80 GB case's shape: everything resident, encoder in fp8 too
    assert full["quant"] == "fp8" and full["resident"] == full["blocks"] and full["text_encoder_quant"] == "fp8"
    streamed = rows["tiny:18MB:auto"]  # the 12 GB case's: 4-bit, blocks and text encoder streamed
    assert streamed["plan"]["quant"] in FOUR_BIT and streamed["plan"]["resident"] < streamed["plan"]["blocks"]
    assert streamed["plan"]["text_encoder"] == "stream" and streamed["encode"]["shape"] == [1, 32, 48]
    assert streamed["denoise"]["copied_gb_per_step"] > 0 and streamed["denoise"]["loads_per_step"] >= 1
    assert rows["tiny:30MB:int4"]["plan"]["quant"] == "int4" and rows["tiny:35MB:fp8"]["plan"]["quant"] == "fp8"
    assert rows["tiny:30MB:int4"]["denoise"]["ratio_vs_resident_fp8"] > 0
    assert rows["tiny-klein:50MB:auto"]["plan"]["resident"] == rows["tiny-klein:50MB:auto"]["plan"]["blocks"]


# -------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [None, "fp8"])
def test_streaming_on_cuda_is_exact(scheme):
    model = tiny_flux2().to("cuda", torch.bfloat16)
    if scheme:
        quantize_transformer(model)
    inp = [t.to("cuda", torch.bfloat16) if t.is_floating_point() else t.to("cuda") for t in inputs()]
    with torch.inference_mode():
        ref = model(*inp)
        streamed = stream_blocks(copy.deepcopy(model), "cuda", prefetch=1)
        outs = [streamed(*inp) for _ in range(3)]
    st = streamer_of(streamed)
    assert all(torch.equal(o, ref) for o in outs) and all(p.host.is_pinned() for p in st.parked)
    assert all(p.host.device.type == "cpu" for p in st.parked) and st.slots[0].device.type == "cuda"
