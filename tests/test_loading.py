"""Loading: every supported layout round-trips tiny random weights bit-exactly; detection; strict errors.

Full-size variants are detected from the spec manifests' {name: shape} dicts (exactly what a header holds).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import TINY_AE, TINY_TRANSFORMER, assert_same_state, load_manifest, tiny_autoencoder, tiny_flux2
from safetensors.torch import load_file, save_file

from fluxrt.config import DEV, KLEIN_4B, KLEIN_9B, TINY, AutoEncoderConfig
from fluxrt.loading import checkpoint, keymaps
from fluxrt.loading.checkpoint import (
    CheckpointError,
    inspect_checkpoint,
    load_autoencoder,
    load_transformer,
    save_bfl,
    save_diffusers,
    save_diffusers_pipeline,
)
from fluxrt.loading.detect import detect_shapes, pick_preset
from fluxrt.loading.info import describe

# ------------------------------------------------------------------------------------------ detection (shapes)


@pytest.mark.parametrize(
    "manifest, cfg, presets",
    [
        ("flux2-dev", DEV, ("flux.2-dev",)),
        ("flux2-klein-4b", KLEIN_4B, ("flux.2-klein-4b", "flux.2-klein-base-4b")),
        ("flux2-klein-9b", KLEIN_9B, ("flux.2-klein-9b", "flux.2-klein-9b-kv", "flux.2-klein-base-9b")),
        ("diffusers-flux2-dev-transformer", DEV, ("flux.2-dev",)),
        ("diffusers-flux2-klein-4b-transformer", KLEIN_4B, ("flux.2-klein-4b", "flux.2-klein-base-4b")),
        ("diffusers-flux2-klein-9b-transformer", KLEIN_9B,
         ("flux.2-klein-9b", "flux.2-klein-9b-kv", "flux.2-klein-base-9b")),
    ],
)  # fmt: skip
def test_detect_full_size_transformers_from_shapes(manifest, cfg, presets):
    found = detect_shapes(load_manifest(manifest))
    assert list(found) == ["transformer"]
    d = found["transformer"]
    assert d.config == cfg and d.presets == presets and d.variant == presets[0]
    assert d.layout == ("diffusers" if manifest.startswith("diffusers") else "bfl")


@pytest.mark.parametrize("manifest", ["flux2-ae", "diffusers-flux2-vae"])
def test_detect_full_size_vae_from_shapes(manifest):
    d = detect_shapes(load_manifest(manifest))["vae"]
    assert d.config == AutoEncoderConfig() and d.variant == "flux.2-ae"


def test_detect_all_in_one_prefixed_shapes():
    shapes = {"model.diffusion_model." + k: s for k, s in load_manifest("flux2-klein-4b").items()}
    shapes |= {"vae." + k: s for k, s in load_manifest("flux2-ae").items()}
    shapes |= {"text_encoders.qwen3_4b.model.embed_tokens.weight": (151936, 2560)}
    found = detect_shapes(shapes)
    assert found["transformer"].prefix == "model.diffusion_model." and found["transformer"].config == KLEIN_4B
    assert found["vae"].prefix == "vae." and found["vae"].config == AutoEncoderConfig()
    assert found["transformer"].layout == "prefixed"


def test_detect_unknown_size_builds_a_config():
    model = tiny_flux2()
    d = detect_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()})["transformer"]
    assert d.config == TINY_TRANSFORMER and d.variant == "custom" and d.presets == ()
    no_guidance = dataclasses.replace(TINY_TRANSFORMER, use_guidance_embed=False, depth=0, mlp_ratio=2.0)
    shapes = {k: tuple(v.shape) for k, v in tiny_flux2(no_guidance).state_dict().items()}
    assert detect_shapes(shapes)["transformer"].config == no_guidance


def test_pick_preset_uses_names_only_among_shape_twins():
    twins = ("flux.2-klein-4b", "flux.2-klein-base-4b")
    assert pick_preset(twins) is None
    assert pick_preset(twins, ["black-forest-labs/FLUX.2-klein-base-4B"]) == "flux.2-klein-base-4b"
    assert pick_preset(twins, ["flux-2-klein-4b.safetensors"]) == "flux.2-klein-4b"
    assert pick_preset(("flux.2-dev",), ["anything"]) == "flux.2-dev"


# ------------------------------------------------------------------------------------------------ round trips


def _same_model(a, b):
    assert_same_state(dict(a.state_dict()), dict(b.state_dict()))


def test_bfl_single_file_round_trip(tmp_path):
    model = tiny_flux2()
    path = save_bfl(model, tmp_path / "flux2-tiny.safetensors")
    loaded, cfg = load_transformer(path)
    _same_model(model, loaded)
    assert cfg == TINY_TRANSFORMER and loaded.cfg == TINY_TRANSFORMER and not loaded.training


def test_tiny_preset_is_recognised(tmp_path):
    model = tiny_flux2(TINY.transformer)
    loaded, spec = load_transformer(save_bfl(model, tmp_path / "t.safetensors"))
    assert spec is TINY
    _same_model(model, loaded)


@pytest.mark.parametrize("shard_bytes", [None, 150_000])
def test_diffusers_component_folder_round_trip(tmp_path, shard_bytes):
    model = tiny_flux2()
    folder = save_diffusers(model, tmp_path / "transformer", shard_bytes=shard_bytes)
    shards = sorted(folder.glob("*.safetensors"))
    assert (len(shards) > 1) == bool(shard_bytes)
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").exists() == bool(shard_bytes)
    loaded, cfg = load_transformer(folder)
    _same_model(model, loaded)
    assert cfg == TINY_TRANSFORMER


def test_diffusers_loading_streams_one_block_at_a_time(tmp_path, monkeypatch):
    model = tiny_flux2()
    folder = save_diffusers(model, tmp_path / "transformer")
    seen = []
    real = keymaps.transformer_diffusers_to_bfl
    monkeypatch.setattr(keymaps, "transformer_diffusers_to_bfl", lambda sd: seen.append(sorted(sd)) or real(sd))
    loaded, _ = load_transformer(folder)
    _same_model(model, loaded)
    blocks = [{k.split(".")[1] for k in group} for group in seen if "blocks" in group[0]]
    assert len(seen) == 1 + 2 + 2 and all(len(b) == 1 for b in blocks)  # misc, 2 double, 2 single blocks


def test_diffusers_pipeline_folder_round_trip(tmp_path):
    model, ae = tiny_flux2(), tiny_autoencoder()
    folder = save_diffusers_pipeline(tmp_path / "pipe", transformer=model, vae=ae, shard_bytes=200_000)
    assert json.loads((folder / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKLFlux2"]
    _same_model(model, load_transformer(folder)[0])
    loaded_ae = load_autoencoder(folder)  # GroupNorm groups come from vae/config.json
    assert loaded_ae.cfg == TINY_AE
    _same_model(ae, loaded_ae)


def test_bfl_ae_round_trip(tmp_path):
    ae = tiny_autoencoder()
    loaded = load_autoencoder(save_bfl(ae, tmp_path / "ae.safetensors"))
    assert loaded.cfg == TINY_AE
    _same_model(ae, loaded)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_prefixed_file_round_trip(tmp_path, prefix):
    model = tiny_flux2()
    path = tmp_path / "comfy.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded, cfg = load_transformer(path)
    assert cfg == TINY_TRANSFORMER
    _same_model(model, loaded)
    assert inspect_checkpoint(path).layout == "prefixed"


@pytest.mark.parametrize("vae_prefix", ["vae.", "first_stage_model."])
def test_all_in_one_file_takes_only_its_component(tmp_path, vae_prefix):
    model, ae = tiny_flux2(), tiny_autoencoder()
    sd = {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}
    sd |= {vae_prefix + k: v for k, v in ae.state_dict().items()}
    sd |= {"text_encoders.qwen3.model.embed_tokens.weight": torch.randn(10, 16)}
    path = tmp_path / "all_in_one.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    _same_model(model, load_transformer(path)[0])
    _same_model(ae, load_autoencoder(path, config=TINY_AE))  # no metadata: GroupNorm groups must be given
    info = inspect_checkpoint(path)
    assert set(info.components) == {"transformer", "vae"} and info.components["vae"].prefix == vae_prefix


def _fake_hub(root, repo, folder_writer):
    """models--org--name/refs/main + snapshots/<hash>/ laid out like the hub cache."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    folder_writer(base / "snapshots" / commit)
    return commit


def test_repo_id_resolves_offline_from_hf_cache(tmp_path, monkeypatch):
    model, ae = tiny_flux2(), tiny_autoencoder()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    commit = _fake_hub(tmp_path / "hub", "acme/tiny-flux2",
                       lambda d: save_diffusers_pipeline(d, transformer=model, vae=ae))  # fmt: skip
    _same_model(model, load_transformer("acme/tiny-flux2")[0])
    _same_model(model, load_transformer(f"acme/tiny-flux2@{commit}")[0])
    _same_model(ae, load_autoencoder("ACME/Tiny-Flux2"))  # hub ids are case-insensitive
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_transformer("acme/absent")


def test_hf_home_fallback_and_bfl_snapshot(tmp_path, monkeypatch):
    model, ae = tiny_flux2(), tiny_autoencoder()
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def bfl_snapshot(d):
        save_bfl(model, d / "flux2-tiny.safetensors")
        save_bfl(ae, d / "ae.safetensors")

    _fake_hub(tmp_path / "hf" / "hub", "acme/tiny-bfl", bfl_snapshot)
    _same_model(model, load_transformer("acme/tiny-bfl")[0])
    _same_model(ae, load_autoencoder("acme/tiny-bfl"))


# ----------------------------------------------------------------------------------------------------- dtypes


def test_dtype_cast_and_keep(tmp_path):
    model = tiny_flux2()
    path = save_bfl(model, tmp_path / "t.safetensors")
    bf16, _ = load_transformer(path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    ref = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert_same_state(ref, dict(bf16.state_dict()))
    half_path = save_bfl(bf16, tmp_path / "bf16.safetensors")
    kept, _ = load_transformer(half_path)  # dtype=None keeps the file's dtype
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}


def test_vae_defaults_to_fp32_and_keeps_bn_stats_fp32(tmp_path):
    ae = tiny_autoencoder()
    path = save_bfl(ae, tmp_path / "ae.safetensors")
    assert {p.dtype for p in load_autoencoder(path).parameters()} == {torch.float32}
    half = load_autoencoder(path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.bn.running_mean.dtype == half.bn.running_var.dtype == torch.float32
    assert half.bn.num_batches_tracked.dtype == torch.int64


def test_missing_num_batches_tracked_is_filled(tmp_path):
    ae = tiny_autoencoder()
    sd = {k: v for k, v in ae.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(sd, str(tmp_path / "ae.safetensors"))
    loaded = load_autoencoder(tmp_path / "ae.safetensors", config=TINY_AE)
    assert int(loaded.bn.num_batches_tracked) == 0


# ----------------------------------------------------------------------------------------------------- errors


def _edit(path, fn):
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))


def test_renamed_key_names_file_and_keys(tmp_path):
    path = save_bfl(tiny_flux2(), tmp_path / "renamed.safetensors")
    _edit(path, lambda sd: sd.update({"single_blocks.1.linear9.weight": sd.pop("single_blocks.1.linear2.weight")}))
    with pytest.raises(CheckpointError) as e:
        load_transformer(path)
    msg = str(e.value)
    assert "renamed.safetensors" in msg and "single_blocks.1.linear2.weight" in msg
    assert "single_blocks.1.linear9.weight" in msg and "1 missing, 1 unexpected" in msg


def test_missing_key_names_file_and_key(tmp_path):
    path = save_bfl(tiny_flux2(), tmp_path / "missing.safetensors")
    _edit(path, lambda sd: sd.pop("double_blocks.0.txt_attn.norm.key_norm.scale"))
    with pytest.raises(CheckpointError, match=r"(?s)missing\.safetensors.*double_blocks\.0\.txt_attn\.norm\.key_norm"):
        load_transformer(path)


def test_diffusers_renamed_key_is_reported(tmp_path):
    folder = save_diffusers(tiny_flux2(), tmp_path / "transformer")
    _edit(folder / "diffusion_pytorch_model.safetensors",
          lambda sd: sd.update({"proj_out.weight_x": sd.pop("proj_out.weight")}))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"(?s)final_layer\.linear\.weight.*proj_out\.weight_x"):
        load_transformer(folder)


def test_wrong_spec_reports_both_shapes(tmp_path):
    path = save_bfl(tiny_flux2(), tmp_path / "t.safetensors")
    wrong = dataclasses.replace(TINY_TRANSFORMER, context_in_dim=48)
    with pytest.raises(CheckpointError, match=r"txt_in\.weight: file \[64, 32\] vs model \[64, 48\]"):
        load_transformer(path, spec=wrong)
    klein_like = save_bfl(tiny_flux2(dataclasses.replace(TINY_TRANSFORMER, use_guidance_embed=False)),
                          tmp_path / "k.safetensors")  # fmt: skip
    with pytest.raises(CheckpointError, match="missing: guidance_in"):
        load_transformer(klein_like, spec=TINY_TRANSFORMER)
    with pytest.raises(CheckpointError, match="flux.2-dev"):  # a preset name works as spec, and is checked
        load_transformer(path, spec="flux.2-dev")


@pytest.mark.parametrize("name", ["model.bin", "model.ckpt", "model.pt"])
def test_pickle_files_are_refused(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        load_transformer(path)


def test_folder_with_only_pickle_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickle"):
        load_transformer(tmp_path)


def test_garbage_and_missing_paths(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_transformer(bad)
    with pytest.raises(CheckpointError, match="no such file"):
        load_transformer(tmp_path / "nope" / "x.safetensors")


def test_vae_file_is_not_a_transformer(tmp_path):
    path = save_bfl(tiny_autoencoder(), tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match=r"no transformer tensors here \(found vae"):
        load_transformer(path)


def test_quantized_files_are_refused(tmp_path):
    path = save_bfl(tiny_flux2(), tmp_path / "fp8.safetensors")
    _edit(path, lambda sd: sd.update({"img_in.weight_scale": torch.ones(64)}))
    with pytest.raises(CheckpointError, match="quantized"):
        load_transformer(path)


# ------------------------------------------------------------------------------------------------ inspect/info


def test_inspect_and_describe(tmp_path):
    model, ae = tiny_flux2(), tiny_autoencoder()
    folder = save_diffusers_pipeline(tmp_path / "pipe", transformer=model, vae=ae)
    info = inspect_checkpoint(folder)
    t = info.components["transformer"]
    n = sum(p.numel() for p in model.parameters())
    assert t.layout == "diffusers" and t.container == "diffusers" and t.num_params == n
    assert t.dtypes == {"float32": n} and t.num_bytes == 4 * n and t.variant == "custom"
    assert info.components["vae"].num_params == sum(v.numel() for v in ae.state_dict().values()) - 1
    text = describe(folder)
    assert "custom" in text and f"{n:,}" in text and "diffusers" in text and "vae:" in text


def test_describe_names_the_preset(tmp_path):
    path = save_bfl(tiny_flux2(TINY.transformer), tmp_path / "tiny.safetensors")
    text = describe(path)
    assert "variant:    tiny" in text and "bfl" in text and "float32 100.0%" in text


def test_checkpoint_module_exports_writers():
    assert checkpoint.save_bfl is save_bfl and checkpoint.save_diffusers is save_diffusers


def test_folder_with_several_flow_files_needs_a_choice(tmp_path):
    a, b = tiny_flux2(TINY.transformer, seed=1), tiny_flux2(TINY.transformer, seed=2)
    save_bfl(a, tmp_path / "a.safetensors")
    save_bfl(b, tmp_path / "b.safetensors")
    save_bfl(tiny_autoencoder(), tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match=r"several files hold a transformer: a\.safetensors, b\.safetensors"):
        load_transformer(tmp_path)
    loaded, spec = load_transformer(tmp_path, spec=dataclasses.replace(TINY, flow_file="b.safetensors"))
    _same_model(b, loaded)
    assert spec.flow_file == "b.safetensors"
    with pytest.raises(CheckpointError, match="several files"):  # inspect does not hide the ambiguity
        inspect_checkpoint(tmp_path)


def test_inspect_vae_only_folder(tmp_path):
    save_bfl(tiny_autoencoder(), tmp_path / "ae.safetensors")
    info = inspect_checkpoint(tmp_path)
    assert list(info.components) == ["vae"] and info.variant == "custom"
    assert info.components["vae"].config == TINY_AE


def test_vae_with_wrong_config_reports_shapes(tmp_path):
    path = save_bfl(tiny_autoencoder(), tmp_path / "ae.safetensors")
    with pytest.raises(
        CheckpointError, match=r"(?s)flux\.2-ae AutoEncoderConfig.*shape mismatch: decoder\.\S+: file \["
    ):
        load_autoencoder(path, config="flux.2-dev")
