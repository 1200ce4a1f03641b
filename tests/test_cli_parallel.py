"""`fluxrt generate` over several ranks (CPU, gloo) makes the single-process image; only rank 0 writes and prints.

The embedded model at 128x128 with 4 steps (4 heads: Ulysses over 2 ranks; ring for the reference case). Parallel
and single-process images are compared after uint8 rounding and the watermark: the velocity differs by fp32
summation order only (~1e-6), so at most a few channel values may round the other way, by 1.
Measured: max |diff| 1, mean 2e-5 (t2i Ulysses and reference + ring alike).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fluxrt import cli
from fluxrt.config import PRESETS
from fluxrt.parallel.plan import Plan, choose_plan

ARGS = ["--seed", "1", "--size", "128x128", "--steps", "4", "--quiet"]
PROMPT = "a big red circle on a white background"
MAX_DIFF, MEAN_DIFF = 2, 1e-3  # uint8 levels; measured 1 and 2e-5


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _assert_same_image(a, b) -> None:
    d = np.abs(_pixels(a) - _pixels(b))
    print(f"parallel vs single process: max |diff| {d.max()}, mean {d.mean():.2e}")
    assert d.shape == (128, 128, 3) and d.max() <= MAX_DIFF and d.mean() <= MEAN_DIFF


def _fluxrt(*argv, cwd, launcher=()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, *launcher, "-m", "fluxrt", "generate", *argv]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Single-process images (in this process): text-to-image, and an edit of it with it as the reference."""
    d = tmp_path_factory.mktemp("single")
    assert cli.main(["generate", PROMPT, *ARGS, "--out", str(d / "t2i.png")]) == 0
    assert cli.main(["generate", "make the circle blue", "--ref", str(d / "t2i.png"), *ARGS, "--seed", "2",
                     "--out", str(d / "ref.png")]) == 0  # fmt: skip
    return d


@pytest.mark.parametrize("plan", [[], ["--parallel", "sp", "--overlap"]], ids=["auto", "sp-overlap"])
def test_gpus_flag_text_to_image_equals_single_process(single, tmp_path, plan):
    out = _fluxrt(PROMPT, *ARGS, "--gpus", "2", *plan, "--out", str(tmp_path / "p.png"), cwd=tmp_path)
    assert out.stdout.split() == [str(tmp_path / "p.png")]  # one path, printed once
    _assert_same_image(tmp_path / "p.png", single / "t2i.png")


def test_gpus_flag_with_reference_and_ring_equals_single_process(single, tmp_path):
    _fluxrt("make the circle blue", "--ref", str(single / "t2i.png"), *ARGS, "--seed", "2", "--gpus", "2",
            "--parallel", "ring", "--out", str(tmp_path / "p.png"), cwd=tmp_path)  # fmt: skip
    _assert_same_image(tmp_path / "p.png", single / "ref.png")


def test_batch_plan_splits_images_over_ranks(tmp_path):
    """`--parallel batch --num-images 2`: one image's rows per rank, the same two images as one process makes."""
    assert cli.main(["generate", PROMPT, *ARGS, "--num-images", "2", "--out", str(tmp_path / "one.png")]) == 0
    out = _fluxrt(PROMPT, *ARGS, "--num-images", "2", "--gpus", "2", "--parallel", "batch",
                  "--out", str(tmp_path / "two.png"), cwd=tmp_path)  # fmt: skip
    one, two = sorted(tmp_path.glob("one_*.png")), sorted(tmp_path.glob("two_*.png"))
    assert len(one) == len(two) == 2 and out.stdout.split() == [str(p) for p in two]
    for a, b in zip(one, two):
        _assert_same_image(b, a)


def test_tensor_parallel_fp8_is_close_to_single_process_fp8(tmp_path):
    """`--quant fp8 --parallel tp`: fp8 layers quantized whole, then sharded. Row shards scale activations per
    rank, so the image is close to, not equal to, one process's fp8 image (measured 44.0 dB; fp8 vs bf16 41.6)."""
    assert cli.main(["generate", PROMPT, *ARGS, "--quant", "fp8", "--out", str(tmp_path / "one.png")]) == 0
    _fluxrt(PROMPT, *ARGS, "--quant", "fp8", "--gpus", "2", "--parallel", "tp", "--out", str(tmp_path / "tp.png"),
            cwd=tmp_path)  # fmt: skip
    mse = ((_pixels(tmp_path / "tp.png") - _pixels(tmp_path / "one.png")).astype(float) ** 2).mean()
    assert 10 * np.log10(255**2 / max(mse, 1e-12)) > 38


def test_torchrun_writes_one_file_from_rank_zero(single, tmp_path):
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    out = _fluxrt(PROMPT, *ARGS, "--out", "imgs/", cwd=tmp_path, launcher=launcher)
    files = sorted(p.name for p in (tmp_path / "imgs").iterdir())
    assert files == ["1_0.png"] and out.stdout.split() == ["imgs/1_0.png"]
    _assert_same_image(tmp_path / "imgs" / "1_0.png", single / "t2i.png")


# ---- the plan and the options, no processes -----------------------------------------------------------------


def test_plan_choice():
    cfg = PRESETS["fluxrt-shapes"].transformer  # 4 heads
    dev = PRESETS["flux.2-dev"].transformer  # 48 heads
    assert choose_plan(cfg, 2) == Plan(2, 1, "ulysses") and choose_plan(cfg, 3) == Plan(3, 1, "ring")
    assert choose_plan(cfg, 1, "tp") == Plan(1, 1, "ulysses")
    assert choose_plan(dev, 8, "sptp") == Plan(4, 2, "ulysses") and choose_plan(dev, 4, "ring2tp2").name == "ring2tp2"
    assert choose_plan(dev, 4, "tp").name == "tp4" and choose_plan(dev, 6, "auto").name == "sp6"
    with pytest.raises(ValueError, match="divide the 4 heads"):
        choose_plan(cfg, 3, "sp")
    with pytest.raises(ValueError, match="needs 4 ranks, the run has 2"):
        choose_plan(cfg, 2, "sp2tp2")
    with pytest.raises(ValueError, match="unknown parallel plan 'fast'"):
        choose_plan(cfg, 2, "fast")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpus", "2", "--parallel", "sp3"], "plan sp3 needs 3 ranks"),
        (["--gpus", "3", "--parallel", "tp"], "tensor parallelism over 3 ranks"),
        (["--gpus", "0"], "--gpus must be at least 1"),
        (["--gpus", "2", "--parallel", "batch"], "--num-images 1 runs a forward of 1 row"),
        (["--gpus", "2", "--parallel", "tp", "--overlap"], "plan tp2 has none"),
        (["--gpus", "2", "--parallel", "ring", "--overlap"], "plan ring2 has none"),
        (["--gpus", "2", "--parallel", "ring", "--transport", "copy-engine"], "plan ring2 has none"),
        (["--gpus", "2", "--device", "cpu", "--cuda-graph"], "--cuda-graph needs a CUDA GPU; the transformer runs on cpu"),
        (["--gpus", "2", "--device", "cpu", "--transport", "copy-engine"], "needs CUDA GPUs (symmetric memory); this run's ranks are on cpu"),
    ],
)
def test_bad_parallel_options_fail_before_loading(argv, message, tmp_path, capsys):
    assert cli.main(["generate", PROMPT, *argv, "--out", str(tmp_path / "x.png")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_help_says_cpu_ranks_use_gloo(capsys):
    cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--gpus N" in text and "N CPU processes over gloo" in text and "--parallel PLAN" in text


def test_gpus_flag_with_the_step_cache_equals_single_process_with_it(tmp_path):
    """`--cache 0.3 --gpus 2` (Ulysses): the ranks skip the steps one process skips, and the record says how many."""
    from fluxrt.outputs import read_metadata

    args = [PROMPT, *ARGS, "--steps", "8", "--cache", "0.3"]
    assert cli.main(["generate", *args, "--out", str(tmp_path / "one.png")]) == 0
    _fluxrt(*args, "--gpus", "2", "--parallel", "sp", "--out", str(tmp_path / "two.png"), cwd=tmp_path)
    one, two = read_metadata(tmp_path / "one.png"), read_metadata(tmp_path / "two.png")
    assert two["step_cache"] == 0.3 and two["step_cache_skipped"] == one["step_cache_skipped"] != "0/8"
    _assert_same_image(tmp_path / "two.png", tmp_path / "one.png")
