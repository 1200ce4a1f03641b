"""fluxrt.accel: compiling the transformer changes nothing but speed.

CPU tests on the tiny preset in fp32: one inductor compile of the blocks (the real code generator, ~15 s on two
cores), and the cheap "aot_eager" backend for the rest (whole-model fullgraph capture, references, recompile
counting), which traces exactly what inductor would receive. GPU tests (marker gpu) cover inductor in bf16,
torch's CUDA graphs and the manual CUDAGraphStep.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_flow
from PIL import Image
from torch._dynamo.testing import CompileCounterWithBackend

from fluxrt.accel import CompilerMissing, CUDAGraphStep, compile_transformer, decompile, is_compiled, optimize
from fluxrt.quant.fp8 import Fp8Linear
from fluxrt.sampling.latents import grid_ids, text_ids

FP32_TOL = 1e-5  # compiled vs eager, fp32, max abs difference (measured ~1e-6 with inductor, 0 with aot_eager)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def step_inputs(cfg, refs: int = 0, seed: int = 0, n_txt: int = 12, device="cpu", dtype=torch.float32):
    """(x, x_ids, t, ctx, ctx_ids, guidance) for a 4x6 image plus `refs` 2x3 references."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([grid_ids(4, 6)] + [grid_ids(2, 3, 10 * (i + 1)) for i in range(refs)])[None]
    x = torch.randn(1, ids.shape[1], cfg.in_channels, generator=g)
    ctx = torch.randn(1, n_txt, cfg.context_in_dim, generator=g)
    t = torch.rand(1, generator=g)
    guidance = torch.full((1,), 4.0) if cfg.use_guidance_embed else None
    vals = (x.to(dtype), ids, t, ctx.to(dtype), text_ids(n_txt)[None], guidance)
    return tuple(None if v is None else v.to(device) for v in vals)


def run(model, inp):
    with torch.no_grad():
        return model(*inp)


def test_inductor_compiled_blocks_match_eager():
    model = tiny_flow(guidance_embed=True)
    inp = step_inputs(model.cfg)
    eager = run(model, inp)
    counter = CompileCounterWithBackend("inductor")
    compile_transformer(model, backend=counter)
    compiled = run(model, inp)
    diff = (compiled - eager).abs().max().item()
    print(f"inductor blocks vs eager: max abs {diff:.2e} (output scale {eager.abs().max():.2f})")
    assert is_compiled(model) and counter.frame_count == 2  # one graph per block class, shared by its blocks
    assert eager.abs().max() > 0.5 and diff <= FP32_TOL


@pytest.mark.parametrize("guidance, refs", [(True, 0), (False, 2)], ids=["dev-no-refs", "klein-two-refs"])
def test_whole_model_is_one_graph_and_matches_eager(guidance, refs):
    """fullgraph=True raises at the first graph break, so passing proves Flux2.forward has none."""
    model = tiny_flow(guidance_embed=guidance)
    inp = step_inputs(model.cfg, refs)
    eager = run(model, inp)
    counter = CompileCounterWithBackend("aot_eager")
    compile_transformer(model, scope="model", fullgraph=True, backend=counter)  # fullgraph: a break raises
    compiled = run(model, inp)
    assert counter.frame_count == 1 and counter.op_count > 100
    assert (compiled - eager).abs().max().item() <= FP32_TOL


def test_same_shapes_do_not_recompile_new_shapes_do():
    model = tiny_flow(guidance_embed=True)
    counter = CompileCounterWithBackend("aot_eager")
    compile_transformer(model, backend=counter)
    run(model, step_inputs(model.cfg, seed=0))
    assert counter.frame_count == 2
    second = run(model, step_inputs(model.cfg, seed=1))  # new values (t, x, ctx), same shapes
    other = tiny_flow(guidance_embed=True)  # a fresh build reuses the blocks' graphs as well
    compile_transformer(other, backend=counter)
    run(other, step_inputs(model.cfg, seed=2))
    assert counter.frame_count == 2
    decompile(model)
    assert not is_compiled(model)
    assert torch.equal(second, run(model, step_inputs(model.cfg, seed=1)))  # aot_eager: bit-identical to eager
    compile_transformer(model, backend=counter)
    run(model, step_inputs(model.cfg, refs=1))  # longer image sequence: static shapes compile again
    assert counter.frame_count == 4


def test_kv_reference_path_compiles_and_matches_eager():
    """klein-9B-KV: extract (step 0) and cached steps through compiled blocks equal the eager model."""
    model = tiny_flow(guidance_embed=False)
    x, ids, t, ctx, ctx_ids, g = step_inputs(model.cfg)
    ref, ref_ids = torch.randn(1, 6, 128), grid_ids(2, 3, 10)[None]
    with torch.no_grad():
        eager0, kv = model.forward_kv_extract(x, ids, ref, ref_ids, t, ctx, ctx_ids, g)
        eager1 = model(0.5 * x, ids, 0.5 * t, ctx, ctx_ids, g, kv=kv)
        compile_transformer(model, backend="eager")  # dynamo only: one graph per block here, keep it cheap
        out0, kv = model.forward_kv_extract(x, ids, ref, ref_ids, t, ctx, ctx_ids, g)
        out1 = model(0.5 * x, ids, 0.5 * t, ctx, ctx_ids, g, kv=kv)
    assert (out0 - eager0).abs().max() <= FP32_TOL and (out1 - eager1).abs().max() <= FP32_TOL


def test_fp8_model_compiles_as_one_graph():
    model = optimize(tiny_flow(guidance_embed=True), fp8=True)
    inp = step_inputs(model.cfg)
    eager = run(model, inp)
    counter = CompileCounterWithBackend("aot_eager")
    compile_transformer(model, backend=counter)  # fullgraph blocks: Fp8Linear traces without a break
    assert (run(model, inp) - eager).abs().max().item() <= FP32_TOL and counter.frame_count == 2
    assert isinstance(model.single_blocks[0].linear1, Fp8Linear)


def test_guards_on_arguments_and_devices():
    model = tiny_flow(guidance_embed=True)
    with pytest.raises(ValueError, match="reduce-overhead"):
        compile_transformer(model, "reduce-overhead")  # CUDA graphs on a CPU model
    with pytest.raises(ValueError, match="unknown compile mode"):
        compile_transformer(model, "fastest")
    with pytest.raises(ValueError, match="unknown compile scope"):
        compile_transformer(model, scope="layers")
    with pytest.raises(ValueError, match="no double_blocks"):
        compile_transformer(torch.nn.Linear(4, 4))
    assert not is_compiled(model)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            CUDAGraphStep(model)


def test_missing_cpu_compiler_is_a_clear_error_at_compile_time():
    model = tiny_flow(guidance_embed=True)
    # config.patch, not monkeypatch: undoing a monkeypatch of inductor's config proxy deletes the option for good
    with torch._inductor.config.patch({"cpp.cxx": ("no-such-c++-compiler",)}):
        with pytest.raises(CompilerMissing, match="needs a C\\+\\+ compiler.*no-such-c\\+\\+-compiler.*without --compile"):
            compile_transformer(model)
    assert not is_compiled(model)
    assert torch._inductor.config.cpp.cxx != ("no-such-c++-compiler",)  # restored


def test_generate_compile_flag_compiles_the_blocks_and_changes_nothing(monkeypatch, tmp_path):
    """`fluxrt generate --compile` reaches `optimize` through Pipeline.load; the cheap aot_eager backend stands in
    for inductor (which test_inductor_compiled_blocks_match_eager runs), so this checks the wiring and the image."""
    import fluxrt.accel
    from fluxrt import cli

    compiled = []

    def spy(model, *args, **kwargs):
        compiled.append(model)
        return compile_transformer(model, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(fluxrt.accel, "compile_transformer", spy)
    argv = ["generate", "a big red circle on a white background", "--seed", "1", "--size", "64x64", "--steps", "3",
            "--quiet", "--out"]  # fmt: skip
    assert cli.main([*argv, str(tmp_path / "eager.png")]) == 0 and not compiled
    assert cli.main([*argv, str(tmp_path / "compiled.png"), "--compile"]) == 0
    assert len(compiled) == 1 and is_compiled(compiled[0])
    images = [np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("eager", "compiled")]
    assert np.abs(images[0] - images[1]).max() <= 1  # aot_eager: the eager kernels (uint8 rounding at most)


# ------------------------------------------------------------------------------------------------ GPU only
def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_compile_modes_and_cuda_graph_match_eager():
    model = tiny_flow(guidance_embed=True).cuda().to(torch.bfloat16)
    inp = step_inputs(model.cfg, refs=1, device="cuda", dtype=torch.bfloat16)
    eager = run(model, inp)
    graphed = CUDAGraphStep(model)
    outs = []
    for seed in (1, 2):  # replays with new values must follow them
        new = step_inputs(model.cfg, refs=1, seed=seed, device="cuda", dtype=torch.bfloat16)
        outs.append(run(graphed, new))
        assert _rel(outs[-1], run(model, new)) < 1e-3  # the same kernels (cuBLAS may pick others in capture)
    assert graphed.num_graphs == 1 and _rel(outs[0], outs[1]) > 0.1
    compile_transformer(model)
    assert _rel(run(model, inp), eager) < 1e-2  # bf16: fused kernels round differently
    graphed_compiled = CUDAGraphStep(model)
    assert _rel(run(graphed_compiled, inp), eager) < 1e-2
    decompile(model)
    torch._dynamo.reset()
    compile_transformer(model, "reduce-overhead")
    for _ in range(3):  # torch's CUDA graph trees record on the second call and replay after
        out = run(model, inp).clone()
    assert _rel(out, eager) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
def test_gpu_named_attention_kernels_compute_sdpa(kernel):
    from fluxrt.models.attention import attention, attention_backend

    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, 600, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    with attention_backend("math"):
        ref = attention(q, k, v)
    with attention_backend(kernel):
        out = attention(q, k, v)
    assert out.shape == ref.shape and _rel(out, ref) < 1e-2
    model = tiny_flow().cuda().to(torch.bfloat16)
    inp = step_inputs(model.cfg, refs=1, device="cuda", dtype=torch.bfloat16)
    eager = run(model, inp)
    with attention_backend(kernel):
        compile_transformer(model)
        assert _rel(run(model, inp), eager) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graph_pipeline_makes_the_same_image():
    """`Pipeline.load(cuda_graph=True)` (`fluxrt generate --cuda-graph`): the sampler calls the graph with guidance
    by keyword; one capture for one size, replayed every step; the image equals the un-graphed one."""
    from fluxrt.pipeline import Pipeline, Sample

    samples = [Sample("a red circle", 1), Sample("a blue square", 2)]
    images = []
    for graph in (False, True):
        pipe = Pipeline.load(device="cuda", cuda_graph=graph)
        images.append([np.asarray(im).astype(int) for im in pipe.generate(samples, 256, 256, 6, 4.0)])
    assert type(pipe.transformer).__name__ == "CUDAGraphStep" and pipe.transformer.num_graphs == 1
    for plain, graphed in zip(*images):
        assert np.abs(plain - graphed).max() <= 2  # cuBLAS may pick other kernels inside a capture
