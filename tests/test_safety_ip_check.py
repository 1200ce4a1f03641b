"""Copyright / public-figure check: yes/no masking, the chat it asks, and both answers from tiny random LMs whose
LM head is biased toward "yes" or "no"."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from fixtures_text import build_mistral_tokenizer, build_qwen3_tokenizer, tiny_mistral3, tiny_qwen3

from fluxrt.safety import ip_check
from fluxrt.system_messages import PROMPT_TEXT_INTEGRITY, SYSTEM_PROMPT_CONTENT_FILTER

FAMILIES = {"qwen3": (build_qwen3_tokenizer, tiny_qwen3), "mistral3": (build_mistral_tokenizer, tiny_mistral3)}


def yes_no_tokenizer(family: str):
    tok = FAMILIES[family][0]()
    tok.add_tokens(["yes", "no"])  # the tiny BPE splits them; Mistral's and Qwen's vocabularies have them whole
    return tok


def biased_model(family: str, tok, bias: dict[str, float]):
    """The tiny LM with its head replaced by the same weights plus a bias on chosen tokens."""
    model = FAMILIES[family][1]()
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        for word, b in bias.items():
            head.bias[tok.convert_tokens_to_ids(word)] = b
    model.lm_head = head
    return model


def test_mask_keeps_only_yes_and_no():
    logits = torch.tensor([[5.0, -2.0, 3.0, 9.0, 0.5]])
    out = ip_check.mask_to_yes_no(logits, yes_id=2, no_id=4)
    assert out.tolist() == [[-3.0, -3.0, 3.0, -3.0, 0.5]]  # everything else at min - 1


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("answer", ["yes", "no"])
def test_answer_follows_the_biased_head(family, answer):
    tok = yes_no_tokenizer(family)
    other = "no" if answer == "yes" else "yes"
    # "<unk>"/"<|endoftext|>" gets a far bigger bias: the mask must keep the answer to yes/no anyway
    distractor = tok.convert_ids_to_tokens(0)
    model = biased_model(family, tok, {answer: 20.0, other: -20.0, distractor: 1000.0})
    verdict = ip_check.ContentFilter(model, tok).check_text("Mickey Mouse shaking hands with a senator")
    assert verdict.answer == answer and verdict.flagged is (answer == "yes")
    assert (verdict.margin > 0) is (answer == "yes")


def test_unbiased_answer_is_the_argmax_of_yes_and_no():
    tok = yes_no_tokenizer("qwen3")
    model = biased_model("qwen3", tok, {})
    f = ip_check.ContentFilter(model, tok)
    enc = tok.apply_chat_template(ip_check.text_chat("a red square"), add_generation_prompt=True, tokenize=True,
                                  return_dict=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        last = model(**enc).logits[0, -1]
    expect = "yes" if last[f.yes_id] > last[f.no_id] else "no"
    assert f.check_text("a red square").answer == expect


def test_the_chat_is_the_reference_one():
    chat = ip_check.text_chat("Darth Vader {in} a kitchen")
    assert chat[0] == {"role": "system", "content": SYSTEM_PROMPT_CONTENT_FILTER}
    assert chat[1]["role"] == "user"
    assert chat[1]["content"] == PROMPT_TEXT_INTEGRITY.replace("{prompt}", "Darth Vader {in} a kitchen")
    rendered = build_mistral_tokenizer().apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<s>[SYSTEM_PROMPT]\nYou are Mistral Small 3") and rendered.endswith("[/INST]")
    image_turn = ip_check.image_chat()[1]["content"]
    assert [c["type"] for c in image_turn] == ["text", "image", "text"]


def test_yes_and_no_must_be_single_tokens():
    with pytest.raises(ValueError, match="'yes' is .* tokens"):
        ip_check.ContentFilter(tiny_qwen3(), build_qwen3_tokenizer())


def test_image_check_needs_a_processor_and_resizes_like_the_reference():
    tok = yes_no_tokenizer("qwen3")
    with pytest.raises(ValueError, match="processor"):
        ip_check.ContentFilter(tiny_qwen3(), tok).check_image(Image.new("RGB", (64, 64)))
    assert ip_check.resize_for_check(Image.new("RGB", (1024, 512))).size == (724, 362)
    assert ip_check.resize_for_check(Image.new("RGB", (256, 256))).size == (512, 512)  # small images grow
