"""`fluxrt` end to end through `fluxrt.cli.main([...])` on the embedded model (64x64, 2 steps, CPU).

Generation tests reuse one loaded pipeline (`_load` is replaced by a stand-in that checks what it is asked
for); one subprocess run of `python -m fluxrt generate` loads the model for real. Error-path tests replace
`_load` by one that fails, proving that bad input is rejected before any weights are read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_pipeline import embedded_pipeline, shape

import fluxrt.cli as cli
import fluxrt.outputs as outputs
from fluxrt.outputs import read_exif_tags, read_metadata
from fluxrt.pipeline import Sample
from fluxrt.request import image_sha256
from fluxrt.safety import watermark

FAST = ["--size", "64x64", "--steps", "2", "--quiet"]


@pytest.fixture
def run(monkeypatch, capsys):
    """run(*argv) -> (exit code, stdout, stderr) with the shared embedded pipeline."""
    loads = []

    def load(ref, args, record):
        assert ref.spec.name == "fluxrt-shapes"
        loads.append(ref.name)
        return embedded_pipeline()

    monkeypatch.setattr(cli, "_load", load)

    def invoke(*argv):
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    invoke.loads = loads
    return invoke


@pytest.fixture
def run_no_load(monkeypatch, capsys):
    def refuse(*a):
        raise AssertionError("the model was loaded before the request was validated")

    monkeypatch.setattr(cli, "_load", refuse)

    def invoke(*argv):
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


@pytest.fixture
def refs(tmp_path) -> list[Path]:
    paths = []
    for i, (color, size) in enumerate([("red", (96, 96)), ("blue", (200, 130)), ("green", (80, 160))]):
        paths.append(tmp_path / f"ref{i}.png")
        shape(color, size, (8, 8, 64, 64)).save(paths[-1])
    return paths


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_text_to_image_writes_png_with_metadata(run, tmp_path):
    out = tmp_path / "out" / "circle.png"
    code, stdout, err = run("generate", "a red circle", "--seed", 3, "--out", out, *FAST)
    assert code == 0, err
    assert stdout.strip() == str(out) and err == ""
    rec = read_metadata(out)
    assert {k: rec[k] for k in ("model", "prompt", "seed", "steps", "guidance", "width", "height", "refs")} == {
        "model": "fluxrt-shapes", "prompt": "a red circle", "seed": 3, "steps": 2, "guidance": 4.0, "width": 64,
        "height": 64, "refs": [],
    }  # fmt: skip
    assert rec["fluxrt_version"] and Image.open(out).format == "PNG"
    assert read_exif_tags(out) == {"Software": "AI generated;flux2", "Make": "fluxrt"}  # not BFL's model


def test_default_output_names_and_num_images(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run("generate", "a blue square", "--seed", 40, "--num-images", 2, *FAST)
    assert code == 0, err
    assert stdout.split() == [os.path.join("outputs", "40_0.png"), os.path.join("outputs", "41_1.png")]
    assert [read_metadata(p)["seed"] for p in stdout.split()] == [40, 41]


def test_one_reference(run, tmp_path, refs):
    out = tmp_path / "edit.png"
    code, _, err = run("generate", "make it blue", "--ref", refs[0], "--seed", 1, "--out", out, *FAST)
    assert code == 0, err
    assert read_metadata(out)["refs"] == [{"sha256": image_sha256(Image.open(refs[0])), "size": [96, 96]}]


def test_three_references_and_match_image_size(run, tmp_path, refs):
    out = tmp_path / "combo.png"
    argv = ["generate", "combine them", "--seed", 2, "--out", out, "--steps", 2, "--quiet", "--match-image-size", 1]
    code, _, err = run(*argv, *[a for r in refs for a in ("--ref", r)])
    assert code == 0, err
    assert Image.open(out).size == (192, 128)  # reference 1 is 200x130, floored to multiples of 16
    assert [r["size"] for r in read_metadata(out)["refs"]] == [[96, 96], [200, 130], [80, 160]]


def test_from_reproduces_an_image_bit_exactly(run, tmp_path, refs):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    code, _, err = run("generate", "make it blue", "--ref", refs[0], "--seed", 9, "--out", first, *FAST)
    assert code == 0, err
    code, _, err = run("generate", "--from", first, "--ref", refs[0], "--out", again, "--quiet")
    assert code == 0, err
    assert np.array_equal(pixels(first), pixels(again))
    assert read_metadata(first) == read_metadata(again)
    assert first.read_bytes() == again.read_bytes()  # no timestamp: the same request writes the same bytes
    code, _, err = run("generate", "--from", first, "--ref", refs[1], "--out", tmp_path / "x.png", "--quiet")
    assert code == 2 and "refs[0] has sha256" in err
    code, _, err = run("generate", "--from", first, "--out", tmp_path / "x.png", "--quiet")
    assert code == 2 and "0 reference images given" in err and "made with 1" in err


@pytest.mark.parametrize("target, fmt, pil_format", [("x.jpg", None, "JPEG"), ("x.img/", "webp", "WEBP")])
def test_jpeg_and_webp_carry_the_metadata(run, tmp_path, target, fmt, pil_format):
    argv = ["generate", "a green triangle", "--seed", 5, "--out", f"{tmp_path}/{target}", *FAST]
    code, stdout, err = run(*argv, *(["--format", fmt] if fmt else []))
    assert code == 0, err
    path = Path(stdout.strip())
    assert Image.open(path).format == pil_format and path.suffix in (".jpg", ".webp")
    assert read_metadata(path)["prompt"] == "a green triangle" and read_metadata(path)["seed"] == 5
    assert read_exif_tags(path)["Software"] == "AI generated;flux2"


def test_no_partial_file_when_saving_fails(run, tmp_path, monkeypatch):
    def broken(image, f, fmt, record):
        f.write(b"\x89PNG half an image")
        raise OSError("disk full")

    monkeypatch.setattr(outputs, "encode_image", broken)
    folder = tmp_path / "out"
    code, stdout, err = run("generate", "a red circle", "--seed", 1, "--out", folder / "a.png", *FAST)
    assert code == 1 and "disk full" in err and stdout == ""
    assert list(folder.iterdir()) == []  # neither the image nor the temporary file is left


def test_existing_output_is_kept_unless_overwrite(run, tmp_path):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    code, _, err = run("generate", "a red circle", "--seed", 1, "--out", out, *FAST)
    assert code == 2 and str(out) in err and "--overwrite" in err and out.read_bytes() == b"precious"
    assert run.loads == []  # refused before loading the model
    code, _, err = run("generate", "a red circle", "--seed", 1, "--out", out, "--overwrite", *FAST)
    assert code == 0 and read_metadata(out)["seed"] == 1


def _many_refs(tmp_path, n, size=(64, 64)) -> list[str]:
    path = tmp_path / f"ref_{size[0]}x{size[1]}.png"
    Image.new("RGB", size, "red").save(path)
    return [a for _ in range(n) for a in ("--ref", str(path))]


BAD = [
    (["--size", "100x64"], "100"),
    (["--size", "72x64"], "72"),
    (["--size", "abc"], "abc"),
    (["--size", "32x32"], "32"),
    (["--size", "1024x64"], "1024x64"),
    (["--seed", "-1"], "-1"),
    (["--seed", "99999999999999999999"], "99999999999999999999"),
    (["--seed", "x1"], "x1"),
    (["--steps", "0"], "steps 0"),
    (["--steps", "500"], "steps 500"),
    (["--model", "flux.2-klein-4b", "--steps", "10"], "steps 10"),
    (["--model", "flux.2-klein-4b", "--guidance", "3"], "guidance 3"),
    (["--guidance", "25"], "guidance 25"),
    (["--num-images", "17"], "17"),
    (["--negative", "blurry"], "blurry"),
    (["--ref", "/no/such/file.png"], "/no/such/file.png"),
    (["--model", "no-such-model"], "no-such-model"),
    (["--format", "gif"], "gif"),
    (["--out", "x.gif"], ".gif"),
    (["--out", "x.png", "--format", "jpeg"], "jpeg"),
    (["--match-image-size", "0"], "match_image_size 0"),
    (["--from", "/no/such/image.png"], "/no/such/image.png"),
    (["--device", "nonsense:7"], "nonsense:7"),
    (["--cache", "0"], "'0'"),
    (["--cache", "fast"], "'fast'"),
    (["--cuda-graph", "--device", "cpu"], "--cuda-graph needs a CUDA GPU; the transformer runs on cpu"),
]


@pytest.mark.parametrize("extra, needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(run_no_load, tmp_path, extra, needle):
    code, stdout, err = run_no_load("generate", "a red circle", *extra)
    assert code == 2 and stdout == ""
    assert err.startswith("fluxrt: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert needle in err, err


def test_cuda_graph_refuses_the_step_cache_with_its_threshold():
    from fluxrt.pipeline import check_cuda_graph
    from fluxrt.request import RequestError

    check_cuda_graph("cuda", None)  # allowed
    with pytest.raises(RequestError, match="does not combine with --cache 0.1 "):
        check_cuda_graph("cuda", 0.1)


@pytest.mark.parametrize(
    "prompt, refs, needle",
    [("", 0, "''"), ("a red circle", 11, "11 reference images"), ("a red circle", -1, "32x32")],
)
def test_bad_prompt_and_references_exit_2(run_no_load, tmp_path, prompt, refs, needle):
    ref_args = _many_refs(tmp_path, refs) if refs > 0 else _many_refs(tmp_path, 1, (32, 32)) if refs < 0 else []
    code, _, err = run_no_load("generate", prompt, *ref_args)
    assert code == 2 and err.startswith("fluxrt: error: ") and needle in err, err


def test_preset_without_files_names_repo_and_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code = cli.main(["generate", "a cat", "--model", "flux.2-dev", "--steps", "2", "--size", "64x64"])
    err = capsys.readouterr().err
    assert code == 2 and "black-forest-labs/FLUX.2-dev" in err and str(tmp_path / "hub") in err


def test_help_shows_examples(capsys):
    for command in ("generate", "info", "models"):
        assert cli.main([command, "--help"]) == 0
        assert "examples:" in capsys.readouterr().out
    assert cli.main([]) == 2 and capsys.readouterr().err.startswith("fluxrt: error: ")


def test_info_and_models(capsys, tmp_path, monkeypatch):
    assert cli.main(["info", "fluxrt-shapes"]) == 0
    out = capsys.readouterr().out
    assert "variant:    fluxrt-shapes" in out and "flow.safetensors" in out
    assert cli.main(["info", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "fluxrt-shapes" in out and "embedded (" in out
    assert "not downloaded (black-forest-labs/FLUX.2-dev)" in out and "steps 4   guidance 1    (fixed)" in out


def test_python_dash_m_entry_point(tmp_path):
    out = tmp_path / "sub.png"
    proc = subprocess.run(
        [sys.executable, "-m", "fluxrt", "generate", "a red circle", "--seed", "4", "--out", str(out), *FAST,
         "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and read_metadata(out)["seed"] == 4
    # the real load gives the same pixels as the shared in-process pipeline
    same = embedded_pipeline().generate([Sample("a red circle", 4)], 64, 64, 2, 4.0)[0]
    assert np.array_equal(pixels(out), np.asarray(watermark.embed(same)))  # the CLI watermarks every output


def test_outputs_carry_the_invisible_watermark(tmp_path):
    out = tmp_path / "wm.png"
    assert cli.main(["generate", "a blue square", "--seed", "1", "--out", str(out), "--size", "128x128",
                     "--steps", "2", "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    found, accuracy = watermark.detect(Image.open(out))
    assert found and accuracy > 0.9


def test_progress_bar_only_on_a_terminal(run, tmp_path, monkeypatch):
    code, _, err = run("generate", "a red circle", "--seed", 1, "--out", tmp_path / "a.png", "--size", "64x64",
                       "--steps", 2)  # fmt: skip
    assert code == 0 and err == ""  # captured stderr is not a TTY: no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = run("generate", "a red circle", "--seed", 1, "--out", tmp_path / "b.png", "--size", "64x64",
                       "--steps", 2)  # fmt: skip
    assert code == 0 and "denoising" in err and "/2 [" in err  # a bar over 2 steps, with time estimates
    code, _, err = run("generate", "a red circle", "--seed", 1, "--out", tmp_path / "c.png", *FAST)
    assert code == 0 and err == ""  # --quiet


def test_flagged_output_is_neither_saved_nor_returned(tmp_path, monkeypatch, capsys):
    import fluxrt.safety.nsfw as nsfw
    from fluxrt.safety import SafetyPolicy

    class Flagging:  # a planted positive: every image scores above the threshold
        def __init__(self, threshold=0.85, backend="auto"):
            self.threshold = threshold

        def score(self, img):
            return 0.99

    monkeypatch.setattr(nsfw, "NSFWChecker", Flagging)
    monkeypatch.setattr(SafetyPolicy, "default_for", classmethod(lambda cls, name: cls(ip_check=False, c2pa=False)))
    out = tmp_path / "flagged.png"
    code = cli.main(["generate", "a red circle", "--seed", "2", "--out", str(out), *FAST, "--device", "cpu"])
    assert code == 3 and not out.exists()
    assert "NSFW classifier score 0.990 > 0.85" in capsys.readouterr().err


def test_c2pa_signed_output_verifies_and_tampering_is_caught(tmp_path, capsys):
    import json

    from fluxrt.safety.provenance import make_test_ca, verify

    chain, key = make_test_ca(tmp_path / "ca")
    src, out = tmp_path / "src.png", tmp_path / "signed.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(src)
    args = ["generate", "make it blue", "--ref", str(src), "--seed", "5", "--out", str(out), *FAST, "--device", "cpu",
            "--c2pa-cert", str(chain), "--c2pa-key", str(key)]  # fmt: skip
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(["verify", str(out), "--trust", str(tmp_path / "ca" / "ca.pem")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["c2pa"]["trusted"] and report["c2pa"]["model"] == "fluxrt-shapes"
    assert len(report["c2pa"]["ingredients"]) == 1 and report["fluxrt"]["seed"] == 5
    data = bytearray(out.read_bytes())  # flip bytes inside the image data, keep the manifest
    idat = data.index(b"IDAT") + 40
    data[idat : idat + 8] = bytes(8)
    (tmp_path / "tampered.png").write_bytes(bytes(data))
    assert not verify(tmp_path / "tampered.png", tmp_path / "ca" / "ca.pem")["valid"]


def test_c2pa_needs_both_files_and_a_supported_format(tmp_path, capsys):
    code = cli.main(["generate", "x", "--out", str(tmp_path / "a.png"), *FAST, "--c2pa-cert", "c.pem"])
    assert code == 2 and "--c2pa-key" in capsys.readouterr().err
    code = cli.main(["generate", "x", "--out", str(tmp_path / "a.webp"), *FAST, "--c2pa-cert", "c", "--c2pa-key", "k"])
    assert code == 2 and "'webp'" in capsys.readouterr().err and not (tmp_path / "a.webp").exists()


def test_step_cache_is_applied_recorded_and_kept_by_from(tmp_path, capsys):
    """--cache loads the embedded model with the step cache (a huge threshold skips every step after the first),
    the record says so, and --from makes the same image with the same cache."""
    first, again, exact = tmp_path / "c.png", tmp_path / "again.png", tmp_path / "exact.png"
    base = ["generate", "a red circle", "--seed", "3", "--size", "64x64", "--steps", "3", "--quiet", "--device", "cpu"]
    assert cli.main([*base, "--cache", "1e9", "--out", str(first)]) == 0
    assert cli.main([*base, "--out", str(exact)]) == 0
    assert cli.main(["generate", "--from", str(first), "--out", str(again), "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    record = read_metadata(first)
    assert record["step_cache"] == 1e9 and record["step_cache_skipped"] == "2/3"
    assert "step_cache" not in read_metadata(exact)
    assert np.array_equal(pixels(first), pixels(again)) and not np.array_equal(pixels(first), pixels(exact))
