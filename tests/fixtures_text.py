"""Offline builders for tiny text-encoder stand-ins: byte-level BPE tokenizers and random causal LMs.

Nothing here touches the network. The tokenizers are trained in milliseconds on a handful of sentences and
wrapped into a transformers fast tokenizer with a chat template written to produce the same *layout* as the
real ones (the special-token ids and the vocabulary are of course different):

- Mistral Small 3.x (tekken, Pixtral processor): ``<s>[SYSTEM_PROMPT]sys[/SYSTEM_PROMPT][INST]user[/INST]``,
  message content given as a string or as ``[{"type": "text", "text": ...}]`` items, left padding with
  ``<pad>``, a post-processor that adds ``<s>`` like the real one (the chat template writes ``<s>`` itself, and
  ``apply_chat_template`` tokenizes without special tokens, so exactly one BOS must come out).
- Qwen3: ``<|im_start|>user\\nprompt<|im_end|>\\n<|im_start|>assistant\\n`` and, with ``enable_thinking=False``,
  an empty ``<think>\\n\\n</think>\\n\\n`` block; right padding with ``<|endoftext|>``, no BOS.

The models are random `Mistral3ForConditionalGeneration` (with a tiny Pixtral vision tower) and
`Qwen3ForCausalLM`, seeded, small enough that a forward over 32 tokens takes milliseconds on CPU.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 512  # model vocabulary; the tokenizers below stay well under it

CORPUS = [
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object",
    "relationships, object attribution and actions without speculation.",
    "a dog is dancing on the moon",
    "a photo of a red fox sitting in the snow, golden hour light",
    "a cat wearing a tiny hat, studio portrait",
    "the quick brown fox jumps over the lazy dog",
]

# Tekken puts its control tokens first; the order here mirrors the real ids for the first few.
MISTRAL_SPECIALS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
    "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
]  # fmt: skip
QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

MISTRAL_CHAT_TEMPLATE = (
    "{%- macro text_of(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- elif item['type'] in ['image', 'image_url'] -%}[IMG]"
    "{%- else -%}{{ raise_exception('unsupported content item type ' + item['type']) }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}[SYSTEM_PROMPT]{{ text_of(message['content']) }}[/SYSTEM_PROMPT]"
    "{%- elif message['role'] == 'user' -%}[INST]{{ text_of(message['content']) }}[/INST]"
    "{%- elif message['role'] == 'assistant' -%}{{ text_of(message['content']) }}{{ eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def _byte_bpe(specials: list[str], vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE trained on CORPUS; every special token becomes one unsplittable id, in list order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB_SIZE
    return tok


def build_mistral_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """Mistral-Small-3.x-style tokenizer: system/user chat with content items, left padding, BOS post-processor."""
    tok = _byte_bpe(MISTRAL_SPECIALS)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side=padding_side, chat_template=MISTRAL_CHAT_TEMPLATE,
    )  # fmt: skip


def build_qwen3_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """Qwen3-style tokenizer: ChatML template with `enable_thinking`, right padding with <|endoftext|>, no BOS."""
    tok = _byte_bpe(QWEN3_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side=padding_side,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )  # fmt: skip


def tiny_mistral3(num_layers: int = 4, hidden: int = 16, seed: int = 0):
    """A random Mistral3ForConditionalGeneration with a 1-layer Pixtral tower, in eval mode, float32."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = dict(
        model_type="mistral", vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=37,
        max_position_embeddings=512, num_attention_heads=4, num_hidden_layers=num_layers, num_key_value_heads=2,
        rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=6,
    )  # fmt: skip
    vision = dict(
        model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
        image_size=30, patch_size=6, num_channels=3,
    )  # fmt: skip
    config = Mistral3Config(
        text_config=text, vision_config=vision, image_seq_length=4, vision_feature_layer=-1, image_token_index=5
    )
    torch.manual_seed(seed)
    return Mistral3ForConditionalGeneration(config).eval()


def tiny_qwen3(num_layers: int = 4, hidden: int = 16, seed: int = 0):
    """A random Qwen3ForCausalLM, in eval mode, float32."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=16, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()
