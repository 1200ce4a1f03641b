"""Text encoders: prompts -> per-token features taken from intermediate layers of a causal LM.

Contract (FLUX2_REFERENCE.md section 6, DIFFUSERS_FLUX2.md section 2.2):
    TextEncoder.encode(prompts) -> (B, max_length, len(output_layers) * hidden_size), in the LM's dtype, with
    feat[b, t, c * H + d] = hidden_states[output_layers[c]][b, t, d]
    where hidden_states[0] is the embedding output and hidden_states[k] the output of decoder layer k, before
    the final norm. Every one of the max_length positions comes back, padding included: the DiT sees them all,
    unmasked. The attention mask is used only inside the LM.

Families:
    "mistral3" (dev): chat [system(SYSTEM_MESSAGE), user(prompt)] with `{"type": "text"}` content items, every
        literal "[IMG]" removed from the prompt, tokenized by `apply_chat_template`. Left padding (the Pixtral
        processor's Llama tokenizer class pads left). Layers 10/20/30 of 40, hidden 5120.
    "qwen3" (klein): chat [user(prompt)], no system turn, rendered with `enable_thinking=False` (an empty think
        block after the assistant header), then tokenized as text. Right padding with <|endoftext|>.
        Layers 9/18/27 of 36.

Truncation: layers deeper than max(output_layers) never influence the output, so they are dropped (by default
while loading, so their weights are never materialised) and the final norm becomes the identity. With the
norm gone, hidden_states[k] keeps meaning "output of decoder layer k" even for the last kept layer.

Loading reads local files only (`local_files_only=True`): a directory, or a repo id resolved in the local
Hugging Face cache. Only the bare decoder (embeddings + layers) is loaded: no LM head, no vision tower.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from fluxrt.config import MISTRAL_SMALL, QWEN3_8B, TextEncoderConfig
from fluxrt.loading.errors import CheckpointError
from fluxrt.system_messages import SYSTEM_MESSAGE

log = logging.getLogger(__name__)

# What the reference tokenizers do; a tokenizer that pads on the other side gives different features.
EXPECTED_PADDING_SIDE = {"mistral3": "left", "qwen3": "right"}
IMAGE_TOKEN = "[IMG]"  # removed from dev prompts, as the reference does, so text can never ask for image slots

# Mistral3 checkpoints store the LM under one of these prefixes (transformers >= 5 / the original llava layout).
_MISTRAL3_KEY_MAPPING = {r"^model\.language_model\.": "", r"^language_model\.model\.": ""}
# Checkpoint parts the bare decoder does not hold: LM head, vision tower, projector.
_UNUSED_KEY = re.compile(r"^(model\.)?(lm_head|vision_tower|multi_modal_projector|language_model\.lm_head)\b")
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def mistral3_chats(prompts: list[str], system_message: str = SYSTEM_MESSAGE) -> list[list[dict]]:
    """One [system, user] conversation per prompt, content as text items, "[IMG]" removed from the prompt."""
    return [
        [
            {"role": "system", "content": [{"type": "text", "text": system_message}]},
            {"role": "user", "content": [{"type": "text", "text": p.replace(IMAGE_TOKEN, "")}]},
        ]
        for p in prompts
    ]


def tokenize_mistral3(tokenizer, prompts: list[str], max_length: int, system_message: str = SYSTEM_MESSAGE):
    """(input_ids, attention_mask), each (B, max_length) int64, via the tokenizer's (or processor's) template."""
    enc = tokenizer.apply_chat_template(
        mistral3_chats(prompts, system_message), add_generation_prompt=False, tokenize=True, return_dict=True,
        return_tensors="pt", padding="max_length", truncation=True, max_length=max_length,
    )  # fmt: skip
    return enc["input_ids"], enc["attention_mask"]


def tokenize_qwen3(tokenizer, prompts: list[str], max_length: int):
    """(input_ids, attention_mask), each (B, max_length): user-only chat, empty think block, then plain tokenizing."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        for p in prompts
    ]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def decoder_of(model: nn.Module) -> nn.Module:
    """The bare decoder stack (embed_tokens, layers, norm) inside an HF causal LM, VLM or base model."""
    module = model
    for _ in range(4):
        if hasattr(module, "layers") and hasattr(module, "embed_tokens"):
            return module
        inner = getattr(module, "language_model", None)
        module = inner if inner is not None else getattr(module, "model", None)
        if module is None:
            break
    raise TypeError(f"cannot find a decoder (embed_tokens + layers) inside {type(model).__name__}")


def _set_num_layers(config, num_layers: int) -> None:
    """Shrink an HF text config in place to its first `num_layers` layers."""
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:num_layers]


def truncate_decoder(decoder: nn.Module, num_layers: int) -> nn.Module:
    """Keep the first `num_layers` decoder layers and replace the final norm by the identity, in place.

    The identity matters: transformers reports the *normed* last state as hidden_states[-1], so without it
    hidden_states[num_layers] would no longer be the raw output of layer `num_layers`.
    """
    if not 1 <= num_layers <= len(decoder.layers):
        raise ValueError(f"cannot keep {num_layers} layers of a decoder with {len(decoder.layers)}")
    decoder.layers = decoder.layers[:num_layers]
    _set_num_layers(decoder.config, num_layers)
    decoder.norm = nn.Identity()
    return decoder


class TextEncoder(nn.Module):
    """A frozen LM decoder plus its tokenizer; `encode(prompts)` gives FLUX.2 text features.

    Built from an in-memory HF model (causal LM, Mistral3 VLM or bare decoder) and tokenizer (or Pixtral
    processor). With `truncate=True` the decoder is truncated **in place** to max(output_layers) layers.
    `system_message` is the dev system turn (default: the reference string with its line break); qwen3 has none.
    """

    def __init__(self, model: nn.Module, tokenizer, config: TextEncoderConfig, *, system_message: str | None = None,
                 truncate: bool = True):  # fmt: skip
        super().__init__()
        if config.family == "qwen3" and system_message is not None:
            raise ValueError(f"the qwen3 (klein) encoder has no system message, got {system_message!r}")
        self.config = config
        self.tokenizer = tokenizer
        self.system_message = SYSTEM_MESSAGE if system_message is None else system_message
        self.decoder = decoder_of(model).eval()
        self._check_decoder(truncate)
        _warn_padding_side(tokenizer, config.family)

    def _check_decoder(self, truncate: bool) -> None:
        depth, hidden = len(self.decoder.layers), self.decoder.config.hidden_size
        if hidden != self.config.hidden_size:
            raise ValueError(f"decoder hidden size {hidden} != config.hidden_size {self.config.hidden_size}")
        if min(self.config.output_layers) < 1 or max(self.config.output_layers) > depth:
            raise ValueError(f"output_layers {self.config.output_layers} out of range for a {depth}-layer decoder")
        if truncate:  # also at max == depth: the final norm must go so hidden_states[-1] stays raw
            truncate_decoder(self.decoder, max(self.config.output_layers))

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    def tokenize(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each (B, max_length), on the CPU."""
        prompts = _check_prompts(prompts)
        if self.config.family == "mistral3":
            return tokenize_mistral3(self.tokenizer, prompts, self.config.max_length, self.system_message)
        return tokenize_qwen3(self.tokenizer, prompts, self.config.max_length)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, L, len(output_layers) * hidden) features."""
        out = self.decoder(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            output_hidden_states=True, use_cache=False,
        )  # fmt: skip
        states = [out.hidden_states[k] for k in self.config.output_layers]  # each (B, L, H)
        return torch.stack(states, dim=2).flatten(2)  # (B, L, C, H) -> (B, L, C*H): per token [h_k1 | h_k2 | ...]

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts -> (B, max_length, len(output_layers) * hidden_size) features, in the decoder's dtype."""
        return self(*self.tokenize(prompts))


def _check_prompts(prompts: str | list[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    return prompts


def _warn_padding_side(tokenizer, family: str) -> None:
    side = getattr(getattr(tokenizer, "tokenizer", tokenizer), "padding_side", None)  # a processor wraps one
    if side != EXPECTED_PADDING_SIDE[family]:
        log.warning("%s tokenizer pads on the %s, the reference pads on the %s: features will differ",
                    family, side, EXPECTED_PADDING_SIDE[family])  # fmt: skip


# ---------------------------------------------------------------- loading from local files


def resolve_local(path_or_repo: str | os.PathLike) -> Path:
    """A local checkpoint directory, or the local HF-cache snapshot of a repo id (`fluxrt.loading.hub`)."""
    from fluxrt.loading.hub import resolve

    path = resolve(path_or_repo)
    if not path.is_dir():
        raise CheckpointError(f"a text encoder needs a folder of HF files, got the file {str(path)!r}")
    return path


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the load report and progress bar; `_check_loading_info` judges the keys instead."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _check_loading_info(info: dict, num_layers: int, path: Path) -> None:
    """Missing or mismatched keys are errors; unexpected ones only from dropped layers, LM head or vision."""

    def dropped(key: str) -> bool:
        layer = _LAYER_KEY.search(key)
        return bool(_UNUSED_KEY.match(key)) or (layer is not None and int(layer.group(1)) >= num_layers)

    bad = {
        "missing": sorted(info.get("missing_keys", ())),
        "mismatched": sorted(str(k) for k in info.get("mismatched_keys", ())),
        "unexpected": sorted(k for k in info.get("unexpected_keys", ()) if not dropped(k)),
    }
    if any(bad.values()):
        raise CheckpointError(f"text encoder weights in {path} do not fit the decoder: {bad}")


def load_decoder(path: Path, family: str, *, num_layers: int | None, device, dtype: torch.dtype) -> nn.Module:
    """The bare decoder of a local HF checkpoint, its first `num_layers` layers only (None: all)."""
    from transformers import AutoConfig, AutoModel

    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    text_config = getattr(hf_config, "text_config", hf_config)  # Mistral3Config nests the LM config
    expected = {"mistral3": "mistral", "qwen3": "qwen3"}[family]
    if text_config.model_type != expected:
        raise CheckpointError(f"{path} holds a {text_config.model_type!r} LM, family {family!r} needs {expected!r}")
    keep = text_config.num_hidden_layers if num_layers is None else num_layers
    if not 1 <= keep <= text_config.num_hidden_layers:
        raise ValueError(f"cannot keep {keep} layers of the {text_config.num_hidden_layers} in {path}")
    _set_num_layers(text_config, keep)
    mapping = _MISTRAL3_KEY_MAPPING if family == "mistral3" else None
    with _quiet_transformers():
        decoder, info = AutoModel.from_pretrained(
            path, config=text_config, local_files_only=True, dtype=dtype, device_map=str(torch.device(device)),
            key_mapping=mapping, output_loading_info=True,
        )  # fmt: skip
    _check_loading_info(info, keep, path)
    return decoder.eval().requires_grad_(False)


def load_tokenizer(path: Path, family: str):
    """The tokenizer of a local checkpoint. For mistral3 the Pixtral processor's chat template wins if it has one.

    (BFL loads the whole processor; for text-only prompts it tokenizes exactly like its tokenizer, given the same
    template, and the tokenizer alone needs no image stack.)
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    legacy = path / "chat_template.json"  # the processor's template file when there is no chat_template.jinja
    if family == "mistral3" and legacy.is_file() and not (path / "chat_template.jinja").is_file():
        tokenizer.chat_template = json.loads(legacy.read_text())["chat_template"]
    if not tokenizer.chat_template:
        raise CheckpointError(f"the tokenizer in {path} has no chat template")
    return tokenizer


def _family_config(config: TextEncoderConfig | str) -> TextEncoderConfig:
    if isinstance(config, TextEncoderConfig):
        return config
    defaults = {"mistral3": MISTRAL_SMALL, "qwen3": QWEN3_8B}
    if config not in defaults:
        raise ValueError(f"unknown text encoder family {config!r}; known: {', '.join(defaults)}")
    return defaults[config]


def load_text_encoder(
    path_or_repo: str | os.PathLike | None, config: TextEncoderConfig | str, *, device="cpu",
    dtype: torch.dtype = torch.bfloat16, tokenizer_path: str | os.PathLike | None = None, truncate: bool = True,
    system_message: str | None = None,
) -> TextEncoder:  # fmt: skip
    """Load a TextEncoder from local files only.

    `path_or_repo`: a checkpoint directory or a repo id in the local HF cache; None means `config.repo_id`.
    `config`: a TextEncoderConfig, or a family name ("mistral3" | "qwen3") whose hidden size is then read from
    the checkpoint. `tokenizer_path`: where the tokenizer lives; default `config.tokenizer_repo_id` when the
    weights come from `config.repo_id` (dev: the 3.1 processor with the 3.2 weights), else the weights directory.
    With `truncate`, layers past max(output_layers) are never materialised.
    """
    from_family = isinstance(config, str)
    config = _family_config(config)
    weights = resolve_local(config.repo_id if path_or_repo is None else path_or_repo)
    if tokenizer_path is None:
        tokenizer_path = config.tokenizer_repo_id if path_or_repo is None else weights
    tokenizer = load_tokenizer(resolve_local(tokenizer_path), config.family)
    num_layers = max(config.output_layers) if truncate else None
    decoder = load_decoder(weights, config.family, num_layers=num_layers, device=device, dtype=dtype)
    if from_family:  # a bare family name says nothing about the width: take the checkpoint's
        config = dataclasses.replace(config, hidden_size=decoder.config.hidden_size)
    return TextEncoder(decoder, tokenizer, config, system_message=system_message, truncate=truncate)
