"""``alignlab_decode`` attention (alignlab/generation/hf.py) against transformers' own eager attention.

The reference is the Llama ``eager_attention_forward``: it repeats the KV heads and adds an additive mask; the
kernel under test groups the query heads per KV head and masks with a bool mask. Inputs have grouped KV heads
(SmolLM2's 9 query / 3 KV heads), a padded batch and a non-contiguous cache view, as the preallocated cache
hands them over.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from alignlab.generation.hf import HFGenerator, decode_attention


class _Attn(torch.nn.Module):
    num_key_value_groups = 3
    training = False


def _inputs(dtype: torch.dtype, q_len: int = 1):
    g = torch.Generator().manual_seed(0)
    B, H, KV, D, L = 5, 9, 3, 64, 37
    q = torch.randn(B, H, q_len, D, generator=g).to(dtype)
    cache = torch.randn(2, B, KV, L + 20, D, generator=g).to(dtype)
    k, v = cache[0, :, :, :L], cache[1, :, :, :L]  # views into a larger buffer, like _PreallocLayer's
    keep = torch.ones(B, 1, q_len, L, dtype=torch.bool)
    keep[1, ..., :11] = False  # left padding of two rows
    keep[3, ..., :4] = False
    return q, k, v, keep


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_step_equals_eager_attention(dtype, atol):
    q, k, v, keep = _inputs(dtype)
    additive = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    ref, _ = eager_attention_forward(_Attn(), q.float(), k.float(), v.float(), additive.float(), scaling=64 ** -0.5)
    out, _ = decode_attention(_Attn(), q, k, v, keep, scaling=64 ** -0.5)
    assert out.shape == ref.shape == (5, 1, 9, 64)
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)
    out_add, _ = decode_attention(_Attn(), q, k, v, additive, scaling=64 ** -0.5)  # an additive mask too
    torch.testing.assert_close(out_add.float(), ref, atol=atol, rtol=0)


def test_a_wrong_head_grouping_is_seen():
    """The comparison has the power to see heads paired with the wrong KV head (h % kv instead of h // group)."""
    q, k, v, keep = _inputs(torch.float32)
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    ref, _ = eager_attention_forward(_Attn(), q, k, v, additive, scaling=64 ** -0.5)
    perm = torch.arange(9).view(3, 3).t().reshape(-1)  # head h's query placed where h % 3 would group it
    out, _ = decode_attention(_Attn(), q[:, perm], k, v, keep, scaling=64 ** -0.5)
    assert (out - ref).abs().max() > 1e-2


def test_prefill_is_transformers_sdpa_and_the_kernel_is_the_default():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, keep = _inputs(torch.float32, q_len=4)
    torch.testing.assert_close(decode_attention(_Attn(), q, k, v, keep)[0],
                               sdpa_attention_forward(_Attn(), q, k, v, keep)[0], atol=0, rtol=0)
    assert HFGenerator(dtype="bfloat16").attn_implementation == "alignlab_decode"
    assert HFGenerator(dtype="float32", attn_implementation="sdpa").attn_implementation == "sdpa"


@pytest.mark.parametrize("dtype,min_same", [("float32", 16), ("bfloat16", 15)])
def test_generation_with_the_decode_kernel_matches_sdpa(tiny_dir, dtype, min_same):
    """Greedy generation on the tiny model: the same texts with the kernel as with transformers' sdpa (all 16 in
    fp32; bf16 rounding may flip a near-tie in one)."""
    from alignlab.data.arith import ArithDataset
    from alignlab.models import ModelSpec, load_tokenizer

    tok, spec = load_tokenizer(tiny_dir), ModelSpec(path=str(tiny_dir))
    prompts = [spec.render(tok, p.prompt) for p in ArithDataset(train_prompts=16).train(1)]
    texts = {}
    for impl in ("alignlab_decode", "sdpa"):
        gen = HFGenerator(max_new_tokens=48, dtype=dtype, attn_implementation=impl)
        texts[impl] = [s[0].text for s in gen.generate(tiny_dir, prompts, 1, seed=0, greedy=True)]
    same = sum(a == b for a, b in zip(texts["alignlab_decode"], texts["sdpa"]))
    assert same >= min_same, (same, texts)
