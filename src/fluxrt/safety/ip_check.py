"""Copyright / public-figure check: the reference's single-token yes/no question to a chat LM (FLUX2_REFERENCE.md 10.1).

Contract: `ContentFilter(model, tokenizer, processor=None)`; `.check_text(prompt) -> Verdict`,
`.check_image(img) -> Verdict`. `Verdict.flagged` is True when the model answers "yes".

How: chat = system SYSTEM_PROMPT_CONTENT_FILTER + one user turn (text: PROMPT_TEXT_INTEGRITY with the prompt;
image: [PROMPT_IMAGE_INTEGRITY, the image resized to about 512x512 px, PROMPT_IMAGE_INTEGRITY_FOLLOW_UP]), rendered
with the generation prompt; one forward pass; every logit of the last position except those of the "yes" and
"no" tokens is set to min - 1, and the greedy (argmax) token is the answer. That is `generate(max_new_tokens=1,
do_sample=False)` with the reference's logits processor, without the generate machinery.

`model` is any Hugging Face causal LM (or VLM) whose forward returns `.logits` (B, L, vocab). For FLUX.2 [dev] it is
Mistral Small 3.x *with* its LM head (and its vision tower for images): fluxrt's text encoder keeps only the first
30 decoder layers and no head, so it cannot answer; `load_content_filter` loads the full model from local files.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from fluxrt.system_messages import (
    PROMPT_IMAGE_INTEGRITY,
    PROMPT_IMAGE_INTEGRITY_FOLLOW_UP,
    PROMPT_TEXT_INTEGRITY,
    SYSTEM_PROMPT_CONTENT_FILTER,
)

log = logging.getLogger(__name__)

IMAGE_PIXELS = 512 * 512  # the reference resizes a checked image to about 512^2 px, keeping its aspect


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    answer: str  # "yes" | "no"
    margin: float  # logit(yes) - logit(no); > 0 means "yes"


def yes_no_token_ids(tokenizer) -> tuple[int, int]:
    """The ids of "yes" and "no", each of which must be a single token (as in the Mistral and Qwen vocabularies)."""
    ids = []
    for word in ("yes", "no"):
        toks = tokenizer.encode(word, add_special_tokens=False)
        if len(toks) != 1:
            raise ValueError(f"{word!r} is {len(toks)} tokens ({toks}) for this tokenizer; the yes/no check needs one")
        ids.append(int(toks[0]))
    if ids[0] == ids[1]:
        raise ValueError(f"'yes' and 'no' map to the same token id {ids[0]}")
    return ids[0], ids[1]


def mask_to_yes_no(logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """Every logit except yes/no set to min - 1 (the reference's logits processor). logits: (B, vocab)."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[[yes_id, no_id]] = True
    floor = logits.min(dim=-1, keepdim=True).values - 1
    return torch.where(keep, logits, floor)


def resize_for_check(img: Image.Image) -> Image.Image:
    """Scale by f = sqrt(512^2 / (w h)) to (int(f w), int(f h)), PIL default filter; small images grow too."""
    f = math.sqrt(IMAGE_PIXELS / (img.width * img.height))
    return img.convert("RGB").resize((int(f * img.width), int(f * img.height)))


def text_chat(prompt: str) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT_CONTENT_FILTER},
        {"role": "user", "content": PROMPT_TEXT_INTEGRITY.format(prompt=prompt)},
    ]


def image_chat() -> list[dict]:
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT_CONTENT_FILTER}]},
        {"role": "user", "content": [
            {"type": "text", "text": PROMPT_IMAGE_INTEGRITY},
            {"type": "image"},
            {"type": "text", "text": PROMPT_IMAGE_INTEGRITY_FOLLOW_UP},
        ]},
    ]  # fmt: skip


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


class ContentFilter:
    """Asks `model` whether a prompt or image raises copyright / public-figure concerns."""

    def __init__(self, model, tokenizer, processor=None):
        self.model = model.eval() if hasattr(model, "eval") else model
        self.tokenizer = tokenizer
        self.processor = processor
        self.yes_id, self.no_id = yes_no_token_ids(tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _answer(self, inputs: dict) -> Verdict:
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        logits = self.model(**inputs).logits[:, -1].float()  # (1, vocab): the next token after the chat
        masked = mask_to_yes_no(logits, self.yes_id, self.no_id)
        token = int(masked.argmax(dim=-1)[0])
        margin = float(logits[0, self.yes_id] - logits[0, self.no_id])
        return Verdict(flagged=token == self.yes_id, answer="yes" if token == self.yes_id else "no", margin=margin)

    def check_text(self, prompt: str) -> Verdict:
        enc = self.tokenizer.apply_chat_template(
            text_chat(prompt), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        verdict = self._answer({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        log.info("content filter, prompt sha256:%s (%d chars): %s", _digest(prompt), len(prompt), verdict.answer)
        return verdict

    def check_image(self, img: Image.Image) -> Verdict:
        if self.processor is None:
            raise ValueError("checking an image needs the model's processor (the VLM's image preprocessing)")
        text = self.processor.apply_chat_template(image_chat(), add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=text, images=[resize_for_check(img)], return_tensors="pt")
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(next(self.model.parameters()).dtype)
        verdict = self._answer(dict(inputs))
        log.info("content filter, image %dx%d: %s", img.width, img.height, verdict.answer)
        return verdict


def load_content_filter(path_or_repo: str | Path, device="cpu", dtype: torch.dtype = torch.bfloat16,
                        images: bool = True) -> ContentFilter:  # fmt: skip
    """The full chat model (LM head included) from local files: a folder or a repo id in the local HF cache.

    FLUX.2 [dev]: "mistralai/Mistral-Small-3.2-24B-Instruct-2506" (about 48 GB in bf16). `images=False` loads the
    text model only (enough for prompts).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    from fluxrt.loading.hub import resolve

    path = resolve(path_or_repo)
    auto = AutoModelForImageTextToText if images else AutoModelForCausalLM
    model = auto.from_pretrained(path, local_files_only=True, dtype=dtype, device_map=str(torch.device(device)))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True) if images else None
    return ContentFilter(model.eval().requires_grad_(False), tokenizer, processor)
