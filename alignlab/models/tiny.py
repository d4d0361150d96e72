"""The embedded tiny model: a Llama-architecture causal LM with its own BPE tokenizer.

Digits are single tokens (arithmetic stays learnable); words carry their leading space.
Saved as a normal Hugging Face directory so it runs the same code path as Qwen2.5.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5-style ChatML template so prompts are built exactly as for real models.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PIECES = r" ?[A-Za-z]+| ?[0-9]|\n|[^\sA-Za-z0-9]| "


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512):
    """Train a small BPE over ``corpus`` and wrap it as a ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior="isolated")
    tok.decoder = decoders.Fuse()
    alphabet = [chr(c) for c in range(32, 127)] + ["\n"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4, intermediate: int = 384,
                max_positions: int = 512, seed: int = 0, eos_token_id: int = 2, pad_token_id: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None)
    return LlamaForCausalLM(cfg)
