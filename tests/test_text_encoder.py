"""Text encoders on tiny random Mistral3 / Qwen3 models with tokenizers built offline (tests/fixtures_text.py).

Oracles: diffusers 0.42.1's own prompt-embedding functions on the same weights (parity), a direct forward of the
untruncated model, and the token layout the reference chat templates produce.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import pytest
import torch

pytest.importorskip("transformers")

from fixtures_text import build_mistral_tokenizer, build_qwen3_tokenizer, tiny_mistral3, tiny_qwen3  # noqa: E402

from fluxrt import system_messages as sm  # noqa: E402
from fluxrt.config import TINY_TEXT, TextEncoderConfig  # noqa: E402
from fluxrt.loading.errors import CheckpointError  # noqa: E402
from fluxrt.models import text_encoder as te  # noqa: E402
from fluxrt.models.text_encoder import TextEncoder, load_text_encoder, resolve_local  # noqa: E402

# The system message alone is ~47 tokens with the fixture vocabulary, so dev tests need a longer window.
MISTRAL_TINY = TextEncoderConfig("mistral3", "tiny", "tiny", 16, (1, 2, 3), max_length=64)
QWEN3_TINY = TINY_TEXT  # the "tiny" preset: qwen3, hidden 16, layers (1, 2, 3), 32 tokens
PROMPTS = ["a dog is dancing", "a photo of a red fox sitting in the snow, golden hour light", "cat"]
LONG = "the quick brown fox jumps over the lazy dog " * 8


@pytest.fixture(scope="module")
def mistral():
    return tiny_mistral3(num_layers=4), build_mistral_tokenizer()


@pytest.fixture(scope="module")
def qwen3():
    return tiny_qwen3(num_layers=4), build_qwen3_tokenizer()


def _encoder(pair, config, **kw) -> TextEncoder:
    model, tok = pair
    return TextEncoder(copy.deepcopy(model), tok, config, **kw)  # the encoder truncates in place: keep the fixture


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- parity with diffusers 0.42.1


@pytest.mark.parity
@pytest.mark.parametrize("message", [sm.SYSTEM_MESSAGE, sm.SYSTEM_MESSAGE_DIFFUSERS])
def test_mistral3_matches_diffusers(mistral, message):
    from diffusers import Flux2Pipeline

    model, tok = mistral
    ref = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
        model, tok, PROMPTS + [LONG], max_sequence_length=64, system_message=message, hidden_states_layers=(1, 2, 3)
    )  # full 4-layer model, final norm in place
    ours = _encoder(mistral, MISTRAL_TINY, system_message=message).encode(PROMPTS + [LONG])
    assert ours.shape == ref.shape == (4, 64, 48)
    assert ours.dtype == ref.dtype
    assert _maxdiff(ours, ref) == 0.0


@pytest.mark.parity
def test_qwen3_matches_diffusers(qwen3):
    from diffusers import Flux2KleinPipeline

    model, tok = qwen3
    ref = Flux2KleinPipeline._get_qwen3_prompt_embeds(
        model, tok, PROMPTS + [LONG], max_sequence_length=32, hidden_states_layers=(1, 2, 3)
    )
    ours = _encoder(qwen3, QWEN3_TINY).encode(PROMPTS + [LONG])
    assert ours.shape == ref.shape == (4, 32, 48)
    assert _maxdiff(ours, ref) == 0.0


@pytest.mark.parity
def test_system_messages_equal_diffusers_copy():
    from diffusers.pipelines.flux2 import system_messages as d

    assert sm.SYSTEM_MESSAGE == d.SYSTEM_MESSAGE  # 0.42.1 ships the reference string, line break included
    assert sm.SYSTEM_MESSAGE_UPSAMPLING_T2I == d.SYSTEM_MESSAGE_UPSAMPLING_T2I
    assert sm.SYSTEM_MESSAGE_UPSAMPLING_I2I == d.SYSTEM_MESSAGE_UPSAMPLING_I2I


# ---------------------------------------------------------------- features: layers, order, truncation


@pytest.mark.parametrize("family", ["mistral3", "qwen3"])
def test_features_are_raw_layer_outputs_in_config_order(mistral, qwen3, family):
    pair, config = (mistral, MISTRAL_TINY) if family == "mistral3" else (qwen3, QWEN3_TINY)
    config = dataclasses.replace(config, output_layers=(3, 1))  # unusual order: catches a sort or an off-by-one
    enc = _encoder(pair, config)
    ids, mask = enc.tokenize(PROMPTS)
    with torch.no_grad():
        hs = pair[0](input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    feats = enc(ids, mask)  # (B, L, 2 * 16)
    assert torch.equal(feats[..., :16], hs[3]) and torch.equal(feats[..., 16:], hs[1])
    assert torch.isfinite(feats).all()  # fully padded rows included


@pytest.mark.parametrize("family", ["mistral3", "qwen3"])
def test_truncated_model_equals_full_model(mistral, qwen3, family):
    pair, config = (mistral, MISTRAL_TINY) if family == "mistral3" else (qwen3, QWEN3_TINY)
    full = _encoder(pair, config, truncate=False)
    cut = _encoder(pair, config)
    assert len(full.decoder.layers) == 4 and len(cut.decoder.layers) == 3
    assert cut.decoder.config.num_hidden_layers == 3 and isinstance(cut.decoder.norm, torch.nn.Identity)
    assert torch.equal(cut.encode(PROMPTS), full.encode(PROMPTS))


def test_truncation_at_the_last_layer_drops_the_final_norm(qwen3):
    # layer 3 of a 3-layer decoder is hidden_states[-1], which transformers reports *after* the final norm
    model, tok = qwen3
    three = tiny_qwen3(num_layers=3)
    three.load_state_dict(model.state_dict(), strict=False)  # same first three layers
    ours = TextEncoder(three, tok, QWEN3_TINY).encode(PROMPTS)
    assert torch.equal(ours, _encoder(qwen3, QWEN3_TINY, truncate=False).encode(PROMPTS))


def test_output_layers_out_of_range(qwen3):
    with pytest.raises(ValueError, match=r"\(1, 5\)"):
        _encoder(qwen3, dataclasses.replace(QWEN3_TINY, output_layers=(1, 5)))


def test_hidden_size_mismatch(qwen3):
    with pytest.raises(ValueError, match="32"):
        _encoder(qwen3, dataclasses.replace(QWEN3_TINY, hidden_size=32))


# ---------------------------------------------------------------- tokens: layout, padding, truncation


def test_mistral3_token_layout_and_left_padding(mistral):
    tok = mistral[1]
    enc = _encoder(mistral, MISTRAL_TINY)
    ids, mask = enc.tokenize(["a dog"])
    sys_ids = tok("You are", add_special_tokens=False).input_ids
    body = [tok.convert_tokens_to_ids(t) for t in ("<s>", "[SYSTEM_PROMPT]")]
    body += tok(sm.SYSTEM_MESSAGE, add_special_tokens=False).input_ids
    body += [tok.convert_tokens_to_ids(t) for t in ("[/SYSTEM_PROMPT]", "[INST]")]
    body += tok("a dog", add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("[/INST]")]
    pad = 64 - len(body)
    assert ids.shape == mask.shape == (1, 64) and pad > 0
    assert ids[0].tolist() == [tok.pad_token_id] * pad + body  # left padded, exactly one BOS
    assert mask[0].tolist() == [0] * pad + [1] * len(body)
    assert ids[0, pad + 2 : pad + 2 + len(sys_ids)].tolist() == sys_ids


def test_qwen3_token_layout_and_right_padding(qwen3):
    tok = qwen3[1]
    ids, mask = _encoder(qwen3, QWEN3_TINY).tokenize(["a dog"])
    text = "<|im_start|>user\na dog<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    body = tok(text).input_ids
    assert "<think>" in tok.convert_ids_to_tokens(body) and tok.bos_token is None
    assert ids[0].tolist() == body + [tok.convert_tokens_to_ids("<|endoftext|>")] * (32 - len(body))
    assert mask[0].tolist() == [1] * len(body) + [0] * (32 - len(body))


@pytest.mark.parametrize("family", ["mistral3", "qwen3"])
def test_truncation_to_max_length(mistral, qwen3, family):
    pair, config = (mistral, MISTRAL_TINY) if family == "mistral3" else (qwen3, QWEN3_TINY)
    ids, mask = _encoder(pair, config).tokenize([LONG, "cat"])
    assert ids.shape == (2, config.max_length) and bool(mask[0].all()) and not bool(mask[1].all())
    end = pair[1].convert_tokens_to_ids("[/INST]" if family == "mistral3" else "</think>")
    assert end not in ids[0].tolist() and end in ids[1].tolist()  # truncation cuts the end (right side)


def test_img_literal_is_removed(mistral):
    enc = _encoder(mistral, MISTRAL_TINY)
    img = mistral[1].convert_tokens_to_ids("[IMG]")
    ids, _ = enc.tokenize(["a [IMG]dog[IMG]"])
    assert img not in ids[0].tolist()
    assert torch.equal(ids, enc.tokenize(["a dog"])[0])


def test_system_message_variant_changes_tokens_and_features(mistral):
    ref = _encoder(mistral, MISTRAL_TINY)
    variant = _encoder(mistral, MISTRAL_TINY, system_message=sm.SYSTEM_MESSAGE_DIFFUSERS)
    assert not torch.equal(ref.tokenize(PROMPTS)[0], variant.tokenize(PROMPTS)[0])
    assert _maxdiff(ref.encode(PROMPTS), variant.encode(PROMPTS)) > 1e-3


def test_padding_side_mismatch_warns(caplog):
    with caplog.at_level(logging.WARNING, logger=te.__name__):
        TextEncoder(tiny_mistral3(), build_mistral_tokenizer(padding_side="right"), MISTRAL_TINY)
    assert "pads on the right" in caplog.text


def test_bad_arguments(qwen3):
    with pytest.raises(ValueError, match="system message"):
        _encoder(qwen3, QWEN3_TINY, system_message="hi")
    enc = _encoder(qwen3, QWEN3_TINY)
    with pytest.raises(TypeError, match=r"\[\]"):
        enc.encode([])
    assert enc.encode("one prompt").shape == (1, 32, 48)


def test_system_message_strings():
    assert sm.SYSTEM_MESSAGE.count("\n") == 1 and "object\nattribution" in sm.SYSTEM_MESSAGE
    assert sm.SYSTEM_MESSAGE_DIFFUSERS == sm.SYSTEM_MESSAGE.replace("object\nattribution", "object attribution")
    assert sm.SYSTEM_PROMPT_CONTENT_FILTER.startswith("\nYou are Mistral Small 3")
    assert sm.SYSTEM_PROMPT_CONTENT_FILTER.endswith("public personas.\n")
    assert sm.PROMPT_IMAGE_INTEGRITY.endswith('"yes" or "no"') and sm.PROMPT_IMAGE_INTEGRITY.startswith("Task:")
    filled = sm.PROMPT_TEXT_INTEGRITY.format(prompt="P")
    assert "-----\nP\n-----" in filled and filled.endswith("includes public figures?")


# ---------------------------------------------------------------- loading from local files


def _save(tmp_path, pair, name):
    model, tok = pair
    path = tmp_path / name
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["mistral3", "qwen3"])
def test_load_truncates_and_matches_in_memory(tmp_path, capsys, mistral, qwen3, family):
    pair, config = (mistral, MISTRAL_TINY) if family == "mistral3" else (qwen3, QWEN3_TINY)
    path = _save(tmp_path, pair, family)
    loaded = load_text_encoder(path, config, dtype=torch.float32)
    assert len(loaded.decoder.layers) == 3 and not hasattr(loaded.decoder, "lm_head")
    assert loaded.decoder.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert torch.equal(loaded.encode(PROMPTS), _encoder(pair, config, truncate=False).encode(PROMPTS))
    assert "LOAD REPORT" not in capsys.readouterr().err  # dropped-layer keys are judged by us, not printed


def test_load_untruncated_keeps_all_layers(tmp_path, qwen3):
    loaded = load_text_encoder(_save(tmp_path, qwen3, "q"), QWEN3_TINY, dtype=torch.float32, truncate=False)
    assert len(loaded.decoder.layers) == 4
    assert torch.equal(loaded.encode(PROMPTS), _encoder(qwen3, QWEN3_TINY).encode(PROMPTS))


def test_load_original_llava_key_layout(tmp_path, mistral):
    # Mistral-Small-3.x files on the hub use "language_model.model.*"; transformers 5 saves "model.language_model.*".
    from safetensors.torch import load_file, save_file

    path = _save(tmp_path, mistral, "m")
    renames = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
               ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector.")]
    state = load_file(path / "model.safetensors")
    for old, new in renames:
        state = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    loaded = load_text_encoder(path, MISTRAL_TINY, dtype=torch.float32)
    assert torch.equal(loaded.encode(PROMPTS), _encoder(mistral, MISTRAL_TINY).encode(PROMPTS))


def test_load_from_hf_cache_with_separate_tokenizer_repo(tmp_path, monkeypatch, mistral):
    cache = tmp_path / "hub"
    for repo, files in (("org/weights", "model"), ("org/tok", "tok")):
        repo_dir = cache / ("models--" + repo.replace("/", "--"))
        (repo_dir / "refs").mkdir(parents=True)
        (repo_dir / "refs" / "main").write_text("abc123\n")
        snap = repo_dir / "snapshots" / "abc123"
        mistral[0].save_pretrained(snap) if files == "model" else mistral[1].save_pretrained(snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    config = dataclasses.replace(MISTRAL_TINY, repo_id="org/weights", tokenizer_repo_id="org/tok")
    loaded = load_text_encoder(None, config, dtype=torch.float32)  # weights from one repo, tokenizer from another
    assert torch.equal(loaded.encode(PROMPTS), _encoder(mistral, MISTRAL_TINY).encode(PROMPTS))
    assert resolve_local("org/tok") == cache / "models--org--tok" / "snapshots" / "abc123"
    with pytest.raises(CheckpointError, match="org/missing"):
        resolve_local("org/missing")
    with pytest.raises(CheckpointError, match="folder of HF files"):
        resolve_local(cache / "models--org--tok" / "refs" / "main")


def test_processor_chat_template_file_wins(tmp_path, mistral):
    path = _save(tmp_path, mistral, "m")
    (path / "chat_template.jinja").unlink(missing_ok=True)
    template = "{{ bos_token }}X{% for m in messages %}{{ m['content'][0]['text'] }}{% endfor %}"
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert te.load_tokenizer(path, "mistral3").chat_template == template


def test_load_errors(tmp_path, qwen3):
    path = _save(tmp_path, qwen3, "q")
    with pytest.raises(ValueError, match="'qwen3' LM"):
        load_text_encoder(path, MISTRAL_TINY, dtype=torch.float32)
    with pytest.raises(ValueError, match="27"):  # the family default wants layers 9/18/27 of a 36-layer model
        load_text_encoder(path, "qwen3", dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown text encoder family 'llama'"):
        load_text_encoder(path, "llama")
    with pytest.raises(ValueError, match="model.norm.weight"):
        te._check_loading_info({"missing_keys": {"model.norm.weight"}}, 3, path)
    te._check_loading_info({"unexpected_keys": ["model.layers.3.mlp.up_proj.weight", "lm_head.weight"]}, 3, path)
    with pytest.raises(ValueError, match="layers.2"):
        te._check_loading_info({"unexpected_keys": ["model.layers.2.mlp.up_proj.weight"]}, 3, path)


def test_load_by_family_name_reads_hidden_size(tmp_path):
    model, tok = tiny_qwen3(num_layers=27, hidden=16), build_qwen3_tokenizer()
    path = tmp_path / "q27"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    loaded = load_text_encoder(path, "qwen3", dtype=torch.float32)
    assert loaded.config.hidden_size == 16 and loaded.config.output_layers == (9, 18, 27)
    assert len(loaded.decoder.layers) == 27
    assert loaded.encode(["a dog"]).shape == (1, 512, 48)
