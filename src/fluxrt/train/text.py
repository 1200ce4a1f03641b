"""The embedded model's text encoder: a word-level tokenizer and a tiny Qwen3 causal LM trained here.

The tokenizer carries a Qwen3-style chat template (user turn, generation prompt, empty think block when
`enable_thinking=False`), so prompts go through exactly the klein text path of FLUX.2. The LM is pretrained
with next-token prediction on chat-formatted captions and instructions, then frozen; FLUX.2 takes hidden
states of three of its layers.
"""

from __future__ import annotations

import random

import torch

from .schedule import Budget, cosine_optim, optimizer_step

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "[UNK]"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
    "{%- endif %}"
)


def build_tokenizer(corpus: list[str], max_length: int):
    """Word-level tokenizer over the lower-cased words and punctuation of `corpus` (plus chat words)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    trainer = WordLevelTrainer(special_tokens=SPECIAL, min_frequency=1)
    tok.train_from_iterator(list(corpus) + ["user assistant system"] * 2, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>", eos_token="<|im_end|>",
        model_max_length=max_length, padding_side="right",
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_lm(vocab_size: int, hidden: int = 128, layers: int = 6, seed: int = 0):
    """A tiny Qwen3ForCausalLM (the klein text-encoder family) with random weights.

    The token embeddings are untied from the output layer, drawn with unit variance and frozen (see
    `pretrain_lm`). In the caption corpus every colour (shape, size, row...) word appears in exactly the same
    contexts, so next-token prediction with tied, trained embeddings pulls them together: the first run's LM
    gave "red" and "blue" embeddings at cosine 0.95 and the flow model could not tell the colours apart.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
        tie_word_embeddings=False, rms_norm_eps=1e-6,
    )  # fmt: skip
    lm = Qwen3ForCausalLM(cfg)
    # unit-variance rows (norm ~ sqrt(hidden)): as large as the residual stream, so a word's identity survives
    torch.nn.init.normal_(lm.model.embed_tokens.weight, std=1.0)
    return lm


def chat_texts(tokenizer, prompts: list[str]) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        for p in prompts
    ]


def pretrain_lm(lm, tokenizer, corpus: list[str], budget: Budget, batch: int, device, lr=3e-3, seed=0, log=print):
    """Next-token prediction on chat-formatted prompts drawn from `corpus`; returns (frozen lm, last loss).

    The token embeddings stay as initialised (frozen): they are what keeps exchangeable words distinct.
    """
    rng = random.Random(seed)
    lm.to(device).train()
    lm.model.embed_tokens.weight.requires_grad_(False)
    params = [p for p in lm.parameters() if p.requires_grad]
    opt, sched = cosine_optim(params, lr, budget, warmup=50, floor=0.02, weight_decay=0.01)
    loss, step = torch.tensor(0.0), 0
    while budget.running(step):
        prompts = [rng.choice(corpus) for _ in range(batch)]
        enc = tokenizer(chat_texts(tokenizer, prompts), padding="longest", return_tensors="pt").to(device)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = lm(**enc, labels=labels).loss
        optimizer_step(opt, sched, loss)
        step = budget.tick(step, log, 200, lambda: f"lm loss {loss.item():.3f}")
    return lm.eval().requires_grad_(False), float(loss.detach())
