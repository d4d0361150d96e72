"""Supervised warm start of the embedded tiny model (``alignlab experiment=sft_base``).

Trains the BPE tokenizer and a small Llama from scratch on arithmetic solutions in which a
documented share carries a flawed habit (see alignlab.data.arith), plus hindsight-refinement
examples (problem + failed attempt + gold answer -> corrected solution) so that PACE's
refinement format works on the embedded task. Deterministic given the seed.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from alignlab.config import ConfigError
from alignlab.data import arith
from alignlab.hub import sha256_of
from alignlab.models import ModelSpec, load_model, load_tokenizer, resolve_path, save_checkpoint
from alignlab.models.tiny import build_model, build_tokenizer
from alignlab.records import atomic_write_text
from alignlab.train.batching import collate, encode, response_logps
from alignlab.train.core import build_optimizer, build_schedule

MARKER = "alignlab_model.json"


def flawed_solution(p: arith.ArithProblem, rng: random.Random, skip_rate: dict[int, float], slip_rate: float) -> str:
    """Each cued step ("loses", "uses", "triples") is misread with probability ``slip_rate``, independently."""
    skip = len(p.steps) >= 2 and rng.random() < skip_rate.get(len(p.steps), 0.0)
    slips = tuple(arith.cue_of(s) is not None and rng.random() < slip_rate for s in p.steps)
    return arith.solution(p, skip_last=skip, slips=slips)


def sft_examples(n: int, seed: int, spec: ModelSpec, tok, skip_rate: dict[int, float], slip_rate: float,
                 refine_share: float) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for p in arith.generate(n, "train", seed=10_000 + seed):
        if rng.random() < refine_share:
            cued = [arith.cue_of(s) is not None for s in p.steps]
            bad = arith.solution(p, slips=tuple(cued)) if any(cued) else arith.solution(p, skip_last=True)
            out.append((spec.render_refine(tok, p.text, bad, str(p.answer)), arith.solution(p)))
        else:
            out.append((spec.render(tok, p.text), flawed_solution(p, rng, skip_rate, slip_rate)))
    return out


def train_sft_base(out_dir: str, steps: int = 1200, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                   hidden: int = 192, layers: int = 4, heads: int = 6, intermediate: int = 512,
                   skip_rate: dict | None = None, slip_rate: float = 0.6, refine_share: float = 0.15,
                   examples: int = 60_000, log_every: int = 50, threads: int = 0, init_from: Any = None,
                   max_len: int = 256, device: str = "cpu", dtype: str = "float32", force: bool = False) -> Path:
    """Warm-start a model on the embedded task. ``init_from`` (a ``model`` config node, e.g. SmolLM2's) starts
    from that pretrained checkpoint with its tokenizer and prompt conventions instead of building the tiny model
    from scratch; the result then carries that model config's name in ``alignlab_model.json``.

    Written once: ``alignlab_model.json`` records the recipe and the weights' sha256 (last, so a directory
    without it is unfinished). A second call with the same recipe returns the directory at once; a different
    recipe over a finished directory is refused unless ``force``. ``dtype="bfloat16"`` runs the forwards under
    bf16 autocast (fp32 master weights, saved in fp32). Same seed and ``threads``, same weights."""
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"sft_base.dtype: {dtype!r} is not one of float32, bfloat16")
    skip_rate = {int(k): float(v) for k, v in (skip_rate or {}).items()}
    out_dir = str(resolve_path(str(out_dir)))
    init = None if init_from is None else (init_from if isinstance(init_from, dict) else _to_dict(init_from))
    recipe = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "skip_rate": skip_rate,
              "slip_rate": slip_rate, "refine_share": refine_share, "examples": examples, "max_len": max_len,
              "dtype": dtype, "threads": threads, "init_from": None if init is None else init.get("name")}
    if init is None:
        recipe.update(hidden=hidden, layers=layers, heads=heads, intermediate=intermediate)
    recipe = json.loads(json.dumps(recipe))  # as the marker will hold it (int keys become strings)
    done = finished_recipe(Path(out_dir))
    if done is not None and not force:
        if done == recipe:
            print(f"sft: {out_dir} already holds this recipe's weights; nothing to do (sft_base.force=true rebuilds)",
                  flush=True)
            return Path(out_dir)
        diff = sorted(k for k in set(done) | set(recipe) if done.get(k) != recipe.get(k))
        raise ConfigError(f"sft_base.out_dir: {out_dir} holds weights of another recipe (differs in {diff}); "
                         "choose another out_dir or set sft_base.force=true to overwrite it")
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if init is not None:  # a pretrained model: its own tokenizer, chat template and prompts
        fields = {k: v for k, v in init.items() if k != "_target_"}
        spec = ModelSpec(**fields)
        spec.check_exists()
        tok, model = load_tokenizer(spec.directory), load_model(spec.directory, dtype=torch.float32)
        model_config = json.loads((spec.directory / "alignlab_model.json").read_text()).get("config", "hf_dir") \
            if (spec.directory / "alignlab_model.json").exists() else "hf_dir"
    else:
        spec, model_config = ModelSpec(path=out_dir), "tiny_arith"
        corpus = [p.text + "\n" + arith.solution(p) for p in arith.generate(3000, "train", seed=seed)]
        tok = build_tokenizer(corpus + ["<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<|im_start|>system\n"
                                        "Previous attempt: The correct final answer is . Write a corrected solution."])
    data = sft_examples(examples, seed, spec, tok, skip_rate, slip_rate, refine_share)
    enc = [encode(tok, p, r, max_len=max_len) for p, r in data]
    if init_from is None:
        model = build_model(len(tok), hidden=hidden, layers=layers, heads=heads, intermediate=intermediate, seed=seed,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = model.to(device)
    opt = build_optimizer(model.parameters(), lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = build_schedule(opt, max(1, steps // 20), steps, kind="warmup_times_cosine")
    rng = random.Random(seed)
    order: list[int] = []
    t0 = time.time()
    model.train()
    for step in range(steps):
        if len(order) < batch_size:
            order = list(range(len(enc)))
            rng.shuffle(order)
        idx, order = order[:batch_size], order[batch_size:]
        ids, attn, tmask = (x.to(device) for x in collate([enc[i] for i in idx], tok.pad_token_id))
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                            enabled=dtype == "bfloat16"):
            lp, n = response_logps(model, ids, attn, tmask)
        loss = -(lp.sum() / n.sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"sft step {step:5d} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s",
                  flush=True)
    out = save_checkpoint(model.cpu(), tok, out_dir, extra_files={"sft_base.json": json.dumps(
        {**recipe, "params": sum(p.numel() for p in model.parameters()), "train_seconds": round(time.time() - t0, 1),
         "init_from": str(spec.directory) if init is not None else None}, indent=2)})
    # the marker last: its sha256 says the weights are complete (and lets a rerun be checked)
    atomic_write_text(out / MARKER, json.dumps({"config": model_config, "sft_recipe": recipe,
                                                "sha256": sha256_of(out / "model.safetensors")}, indent=2))
    print(f"sft: wrote {out} (model.safetensors sha256 {sha256_of(out / 'model.safetensors')})", flush=True)
    return out


def finished_recipe(out_dir: Path) -> dict | None:
    """The recipe of a finished warm start in ``out_dir`` (its marker holds a sha256 that matches the weights),
    else None."""
    try:
        meta = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if "sft_recipe" not in meta or meta.get("sha256") != sha256_of(out_dir / "model.safetensors"):
        return None
    return meta["sft_recipe"]


def _to_dict(node: Any) -> dict:
    out = OmegaConf.to_container(node, resolve=True)
    assert isinstance(out, dict)  # a config node (DictConfig)
    return out
