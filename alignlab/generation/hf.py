"""Batched sampling with a KV cache on plain ``transformers`` models (CPU or GPU).

A hand-written decode loop rather than ``model.generate``: it is faster for many short
samples, and it draws every sample's noise from a counter-based hash of (sample seed, step,
token), so a sample is reproducible whatever batch it lands in.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from alignlab._compat import cache_with_layer_class, dynamic_layer_base
from alignlab.generation import Sample, check_sampling, sample_seed, stop_token_ids
from alignlab.logging import progress
from alignlab.models import load_model, load_tokenizer, resolve_path

_M1, _M2, _M3 = 0x9E3779B97F4A7C15 - (1 << 64), 0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64)
_MASK53 = (1 << 53) - 1


def _mix(x: Tensor) -> Tensor:
    """splitmix64 finaliser on int64 tensors, in place (logical shifts emulated with masks). In place with one
    scratch buffer: a (B, 49k) int64 pass per operation is memory-bound, and this halves the passes (2.3x)."""
    y = torch.empty_like(x)
    for shift, bits, mul in ((30, 34, _M2), (27, 37, _M3), (31, 33, None)):
        torch.bitwise_right_shift(x, shift, out=y).bitwise_and_((1 << bits) - 1)
        x.bitwise_xor_(y)
        if mul is not None:
            x.mul_(mul)
    return x


def uniform_noise(seeds: Tensor, step: int, vocab: int) -> Tensor:
    """U(0,1) of shape (B, V), a pure function of (seed, step, token id), on ``seeds``' device."""
    v = torch.arange(vocab, dtype=torch.int64, device=seeds.device).add_(step * 1_000_003).mul_(_M2)
    x = _mix(seeds[:, None] * _M1 + v[None, :])
    return x.bitwise_and_(_MASK53).double().add_(0.5).div_(float(1 << 53))


DECODE_ATTENTION = "alignlab_decode"


def decode_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """transformers' ``sdpa`` attention, except for a one-token query (a decode step): two matmuls per KV-head
    group, with no ``repeat_kv`` copy of the cache. On CPU, SDPA's kernel for a single query over a padded batch
    took 4.4 ms per SmolLM2 layer in bf16 against 0.9 ms for this (2.7 against 0.7 ms in fp32); SmolLM2 sampling
    got 2.0x faster in bf16, 1.2x in fp32 (experiments/perf/README.md)."""
    if query.shape[2] != 1 or module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    B, H, _, D = query.shape
    kv = key.shape[1]
    scores = torch.matmul(query.view(B, kv, H // kv, D), key.transpose(-1, -2))  # (B, kv, group, L)
    scores = scores.float() * (scaling if scaling is not None else D ** -0.5)
    if attention_mask is not None:  # (B, 1, 1, L): bool (True attends) or additive
        scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # (B, kv, group, D); head h = kv * group + g
    return out.reshape(B, 1, H, D), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


class _PreallocLayer(dynamic_layer_base()):  # type: ignore[misc]
    """A KV-cache layer that writes each step into a preallocated buffer instead of ``torch.cat``-ing the whole
    cache (transformers' DynamicLayer copies every cached position at every step: O(T^2) bytes). Attention sees a
    view of the same length and values, so the outputs are the same; ``extra`` positions are reserved up front."""

    extra = 128
    _k: Tensor  # the preallocated buffers (set by _realloc)
    _v: Tensor
    _n: int  # cached positions

    def _views(self, n: int) -> None:
        self._n = n
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def _realloc(self, cap: int, rows: Tensor | None = None) -> None:
        """Fresh buffers of ``cap`` positions holding the cached prefix (of ``rows`` only, when given)."""
        k, v = self.keys, self.values
        if rows is not None:
            k, v = k[rows], v[rows]
        self._k = k.new_empty(*k.shape[:2], cap, k.shape[-1])
        self._v = v.new_empty(*v.shape[:2], cap, v.shape[-1])
        self._k[:, :, : self._n], self._v[:, :, : self._n] = k, v
        self._views(self._n)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._n = 0
            self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
            self._realloc(key_states.shape[-2] + self.extra)
        n = self._n + key_states.shape[-2]
        if n > self._k.shape[-2]:  # out of room: grow by doubling (amortised O(T))
            self._realloc(max(n, 2 * self._k.shape[-2]))
        self._k[:, :, self._n: n] = key_states
        self._v[:, :, self._n: n] = value_states
        self._views(n)
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
            self._views(self._n)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.get_seq_length() > 0:
            self._realloc(self._k.shape[-2], indices)


def _prealloc_cache(extra: int):
    """A ``DynamicCache`` of preallocated layers reserving ``extra`` positions (tests swap this function for
    ``lambda extra: None``, transformers' own cache, to check both give the same samples)."""
    return cache_with_layer_class(type("PreallocLayer", (_PreallocLayer,), {"extra": extra}))


class HFGenerator:
    """``generation=hf``: temperature / top-p sampling, or greedy, in length-sorted batches."""

    ranks = 1  # processes that compute a call (the ledger's ``ranks``); on the trainer's ranks: RankGenerator

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128,
                 batch_size: int = 256, device: str = "auto", dtype: str = "float32",
                 max_prompt_tokens: int | None = None, stop_tokens: list[str] | None = None,
                 attn_implementation: str | None = None) -> None:
        check_sampling(temperature, top_p, max_new_tokens)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1 or null, got {max_prompt_tokens}")
        self.max_prompt_tokens, self.stop_tokens = max_prompt_tokens, list(stop_tokens or [])
        self.temperature, self.top_p = temperature, top_p
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.dtype = getattr(torch, dtype)
        self.attn_implementation = attn_implementation or DECODE_ATTENTION
        self._loaded: tuple[str, object, object] | None = None

    def _load(self, model_dir: str | Path):
        key = str(resolve_path(str(model_dir)))
        if self._loaded is None or self._loaded[0] != key:
            self.release()
            model = load_model(key, dtype=self.dtype, device=self.device,
                               attn_implementation=self.attn_implementation).eval()
            self._loaded = (key, model, load_tokenizer(key))
        return self._loaded[1], self._loaded[2]

    def release(self) -> None:
        self._loaded = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def generate(self, model_dir: str | Path, prompts: list[str], n: int, seed: int,
                 greedy: bool = False, shard: tuple[int, int] | None = None) -> list[list[Sample]]:
        """``shard=(rank, world)``: decode only every world-th batch from the rank-th (the others stay empty), so
        the batches of R ranks together are exactly one process's (alignlab/generation/ranks.py)."""
        model, tok = self._load(model_dir)
        n = 1 if greedy else n
        stop = stop_token_ids(tok, _as_list(getattr(model.generation_config, "eos_token_id", None)), self.stop_tokens)
        room = getattr(model.config, "max_position_embeddings", 1 << 30) - self.max_new_tokens
        room = min(room, self.max_prompt_tokens or room)
        encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        if any(len(e) > room for e in encoded):
            import logging

            logging.getLogger("alignlab").warning(
                "%d of %d prompts are longer than %d tokens (model.max_prompt_tokens / the context left after "
                "max_new_tokens): their beginnings are cut", sum(len(e) > room for e in encoded), len(encoded), room)
        encoded = [e[-room:] for e in encoded]  # keep the prompt's end
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
        per_batch = max(1, self.batch_size // n)
        out: list[list[Sample]] = [[] for _ in prompts]
        chunks = [order[b: b + per_batch] for b in range(0, len(order), per_batch)]
        chunks = chunks[shard[0]::shard[1]] if shard else chunks
        # counts finished samples inside each batch, so a long batch still shows progress (a log gets a line at
        # least every 10 s, see alignlab.logging.progress)
        with progress(total=sum(len(c) for c in chunks) * n, desc="greedy" if greedy else f"sample n={n}",
                      unit="sample") as bar:
            for chunk in chunks:
                seeds = [sample_seed(seed, prompts[i], j) for i in chunk for j in range(n)]
                res = self._decode(model, tok, [encoded[i] for i in chunk], n, seeds, greedy, stop, bar)
                for k, i in enumerate(chunk):
                    out[i] = res[k * n: (k + 1) * n]
        return out

    def _decode(self, model, tok, prompt_ids: list[list[int]], n: int, seeds: list[int], greedy: bool,
                stop: set[int], bar=None) -> list[Sample]:
        """Prefill each prompt once, fan the KV cache out to its n samples, drop rows as they finish."""
        P, L = len(prompt_ids), max(len(p) for p in prompt_ids)
        pad, dev = tok.pad_token_id, self.device
        ids = torch.full((P, L), pad, dtype=torch.long)
        attn = torch.zeros((P, L), dtype=torch.long)
        for i, p in enumerate(prompt_ids):  # left padding
            ids[i, L - len(p):] = torch.tensor(p)
            attn[i, L - len(p):] = 1
        ids, attn = ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                    past_key_values=_prealloc_cache(self.max_new_tokens))
        cache, logits = out.past_key_values, out.logits[:, -1]
        next_pos = pos[:, -1:] + 1
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits, attn, next_pos = (x.repeat_interleave(n, dim=0) for x in (logits, attn, next_pos))
        B = P * n
        seed_all = torch.tensor(seeds, dtype=torch.int64)
        stop_t = torch.tensor(sorted(stop), device=dev)
        rows = torch.arange(B, device=dev)  # original row of each row still in the batch
        gen = torch.full((B, self.max_new_tokens), pad, dtype=torch.long, device=dev)
        lp_sum = torch.zeros(B, dtype=torch.float64, device=dev)
        ent_sum = torch.zeros(B, dtype=torch.float64, device=dev)
        n_tok = torch.zeros(B, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        finished = 0  # rows done so far, for the progress bar
        for t in range(self.max_new_tokens):
            logp = torch.log_softmax(logits.float(), dim=-1)
            if greedy or self.temperature == 0:
                nxt = logp.argmax(-1)
            else:
                nxt = self._sample(logp, seed_all[rows.cpu()], t)
            live = ~done[rows]
            lp_sum[rows] += torch.where(live, logp.gather(1, nxt[:, None]).squeeze(1), 0).double()
            ent_sum[rows] += torch.where(live, -(logp.exp() * logp).nan_to_num().sum(-1), 0).double()
            n_tok[rows] += live.long()
            nxt = torch.where(live, nxt, pad)
            gen[rows, t] = nxt
            done[rows] |= torch.isin(nxt, stop_t)
            keep = ~done[rows]
            n_keep = int(keep.sum())
            if bar is not None:
                bar.update(B - n_keep - finished)
                finished = B - n_keep
            if n_keep == 0:
                break
            if n_keep <= 0.9 * len(rows):  # compact: finished rows stop costing compute
                idx = keep.nonzero().squeeze(1)
                cache.batch_select_indices(idx)
                rows, attn, next_pos, nxt = rows[idx], attn[idx], next_pos[idx], nxt[idx]
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=next_pos, past_key_values=cache,
                        use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1]
            next_pos = next_pos + 1
        if bar is not None:
            bar.update(B - finished)  # the rows that ran to max_new_tokens
        gen, n_tok, done = gen.cpu(), n_tok.cpu(), done.cpu()
        samples = []
        for i in range(B):
            toks = gen[i, : n_tok[i]].tolist()
            finished = bool(done[i])
            body = toks[:-1] if finished else toks
            samples.append(Sample(text=tok.decode(body, skip_special_tokens=False), tokens=int(n_tok[i]),
                                  logprob_sum=float(lp_sum[i]), entropy=float(ent_sum[i] / max(1, int(n_tok[i]))),
                                  finished=finished))
        return samples

    def _sample(self, logp: Tensor, seeds: Tensor, step: int) -> Tensor:
        """Gumbel-max over the temperature-scaled, top-p truncated distribution."""
        scores = logp / self.temperature
        if self.top_p < 1.0:
            sorted_s, idx = scores.sort(dim=-1, descending=True)
            cum = torch.softmax(sorted_s, dim=-1).cumsum(-1)
            drop_sorted = cum - torch.softmax(sorted_s, dim=-1) >= self.top_p  # keep the token that crosses p
            drop = torch.zeros_like(drop_sorted).scatter(1, idx, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        u = uniform_noise(seeds.to(scores.device), step, scores.shape[-1])  # drawn where the scores are
        gumbel = u.log_().neg_().log_().neg_().float()  # -log(-log u), in place
        return (scores + gumbel).argmax(-1)


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [int(x)]
