"""trainer.lora: LoRA adapters (peft) in trainer=torch's loop, checkpoints written merged; trainer.dtype/attn."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import alignlab.train.torch_trainer as tt
from alignlab.data import arith
from alignlab.losses import DPOLoss
from alignlab.models import ADAPTER_DIR, ModelSpec, load_model, load_tokenizer
from alignlab.records import Pair, Selected, read_jsonl
from alignlab.train.batching import response_end_id
from alignlab.train.core import encode_pairs, pair_forward
from alignlab.train.deepspeed_trainer import DeepSpeedTrainer
from alignlab.train.torch_trainer import TorchTrainer, reference_logps
from tests.conftest import TINY_RUN, alignlab

peft = pytest.importorskip("peft", reason="LoRA needs the lora extra: pip install -c constraints.txt 'alignlab[lora]'")

HIDDEN = 160  # the tiny Llama: hidden 160, 4 layers, q/v projections 160 -> 160 (config.json)


def _pairs(tiny_dir, n=8) -> list[Pair]:
    tok, spec = load_tokenizer(tiny_dir), ModelSpec(path=str(tiny_dir))
    return [Pair(str(p.answer), spec.render(tok, p.text), arith.solution(p), arith.solution(p, skip_last=True))
            for p in arith.generate(n, "train", seed=5, levels=(3, 4))]


def _lora_pair(adapter: dict[str, torch.Tensor], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the adapter on base weight ``key`` (peft saves them as base_model.model.<module>.lora_A.weight)."""
    module = "base_model.model." + key.removesuffix(".weight")
    return adapter[f"{module}.lora_A.weight"], adapter[f"{module}.lora_B.weight"]


def test_a_lora_round_trains_only_the_adapters_and_writes_w_plus_alpha_over_r_ba(tiny_dir, tmp_path, monkeypatch):
    pairs = _pairs(tiny_dir)
    r, alpha = 4, 8.0
    tr = TorchTrainer(lr=1e-2, epochs=1, batch_size=4, warmup_ratio=0.0, device="cpu",
                      lora={"enabled": True, "r": r, "alpha": alpha, "target_modules": ["q_proj", "v_proj"]})
    seen: dict[str, dict] = {}
    real_save = tt.save_checkpoint

    def observe_then_save(model, *a, **kw):  # the trained model as the loop hands it over, before the merge
        seen["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        return real_save(model, *a, **kw)

    monkeypatch.setattr(tt, "save_checkpoint", observe_then_save)
    res = tr.train(tiny_dir, pairs, reference_logps(tiny_dir, pairs), DPOLoss(beta=0.5), tmp_path / "ckpt", seed=0)

    base = load_file(str(tiny_dir / "model.safetensors"))
    targets = {k for k in base if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert len(targets) == 8  # 4 layers x (q, v)
    # before the merge: only lora_A/lora_B require grad; every base weight is bit-identical to the loaded policy
    assert seen["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in seen["trainable"])
    for name, value in seen["params"].items():
        if ".lora_" in name:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(value, base[key]), name
    assert res.summary["trainable_params"] == len(targets) * r * (HIDDEN + HIDDEN)  # A: r x 160, B: 160 x r
    assert res.summary["lora"] == 1 and res.summary["peak_rss_mib"] > 0

    merged = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    adapter = load_file(str(tmp_path / "ckpt" / ADAPTER_DIR / "adapter_model.safetensors"))
    assert set(merged) == set(base)  # a plain HF checkpoint: the base's tensor names, no lora_* / base_layer
    assert not (tmp_path / "ckpt" / "adapter_config.json").exists()  # transformers must not take it for an adapter
    for key in sorted(base):
        if key not in targets:
            assert torch.equal(merged[key], base[key]), key  # untargeted weights: untouched
            continue
        a, b = _lora_pair(adapter, key)
        name_b = "base_model.model." + key.removesuffix(".weight") + ".lora_B.default.weight"
        assert torch.equal(b, seen["params"][name_b])  # the saved adapter is the trained one
        delta = (alpha / r) * (b.double() @ a.double())  # W + (alpha / r) B A, by hand in float64
        assert delta.abs().max() > 1e-4  # the adapter did train (B starts at 0)
        torch.testing.assert_close(merged[key].double(), base[key].double() + delta, atol=2e-6, rtol=0)


@pytest.mark.slow
def test_a_lora_round_through_the_cli_writes_a_merged_checkpoint_that_loads_and_evaluates(tmp_path, tiny_dir):
    run = tmp_path / "run"
    alignlab("trainer.lora.enabled=true", "trainer.lora.r=2", "trainer.lora.alpha=4", *TINY_RUN, "rounds=1",
             "base_eval=false", "trainer.lr=1e-3", f"hydra.run.dir={run}")
    ckpt = run / "round_1" / "checkpoint"
    info = json.loads((run / "round_1" / "train.json").read_text())
    n_linear = 4 * 7  # all-linear: per layer q, k, v, o (160 -> 160), gate, up (160 -> 448), down (448 -> 160)
    assert n_linear == 28
    assert info["lora"] == 1 and info["trainable_params"] == 4 * 2 * (4 * (160 + 160) + 3 * (160 + 448))
    assert math.isfinite(json.loads((run / "round_1" / "eval.json").read_text())["accuracy"])  # evaluated merged
    merged = load_model(ckpt).eval()  # plain from_pretrained, no peft
    with_adapter = peft.PeftModel.from_pretrained(load_model(tiny_dir), str(ckpt / ADAPTER_DIR)).eval()
    ids = load_tokenizer(tiny_dir)("12+34=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits
    assert not torch.allclose(got, load_model(tiny_dir)(input_ids=ids).logits, atol=1e-5)  # it trained
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # merged == base + adapter, in the forward


def test_trainer_dtype_bf16_autocasts_the_forwards_and_attn_implementation_reaches_the_model(tiny_dir):
    pairs = _pairs(tiny_dir, n=4)
    fp32 = TorchTrainer(device="cpu", attn_implementation="eager").logps(tiny_dir, pairs)
    bf16 = TorchTrainer(device="cpu", dtype="bfloat16", attn_implementation="eager").logps(tiny_dir, pairs)
    model, tok = load_model(tiny_dir, attn_implementation="eager").eval(), load_tokenizer(tiny_dir)
    assert model.config._attn_implementation == "eager"
    want = {False: [], True: []}
    for p in pairs:  # by hand: one unbatched forward of prompt + chosen, in fp32 and under bf16 autocast
        prompt = tok(p.prompt, add_special_tokens=False)["input_ids"]
        full = prompt + tok(p.chosen, add_special_tokens=False)["input_ids"] + [response_end_id(tok)]
        for amp in want:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                logits = model(input_ids=torch.tensor([full])).logits.float()
            lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, torch.tensor(full[1:])[:, None])[:, 0]
            want[amp].append(float(lp[len(prompt) - 1:].sum()))
    assert max(abs(a - b) for a, b in zip(want[True], want[False])) > 0.02  # bf16 rounding shows at this size
    for got, w in ((fp32["chosen"], want[False]), (bf16["chosen"], want[True])):
        assert got == pytest.approx(w, abs=2e-3)
    with pytest.raises(ValueError, match="trainer.dtype must be one of"):
        TorchTrainer(dtype="float16")
    with pytest.raises(ValueError, match="trainer.lora.r must be >= 1"):
        TorchTrainer(lora={"enabled": True, "r": 0})


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_lora_on_two_zero_ranks_writes_the_merged_checkpoint_and_adapter_trainer_torch_writes(tiny_dir, tmp_path,
                                                                                               stage):
    """trainer=deepspeed_zero2/3 with trainer.lora on 2 gloo ranks (micro 2 each) against trainer=torch (batch 4) on the
    same pairs, seed and settings: the same adapter init and steps, so the same adapter, merged weights and
    trainable-parameter count (4 layers x (q, v) x r x (160 + 160)). ZeRO-3 (every tensor partitioned) gathers
    the weights on rank 0 and merges there."""
    pairs = _pairs(tiny_dir)
    lora = {"enabled": True, "r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    kw = {"lr": 1e-2, "epochs": 1, "warmup_ratio": 0.0, "max_length": 160, "lora": lora}
    ref = reference_logps(tiny_dir, pairs, max_len=160)
    want = TorchTrainer(batch_size=4, device="cpu", **kw).train(tiny_dir, pairs, ref, DPOLoss(beta=0.5),
                                                                 tmp_path / "torch" / "checkpoint", seed=3)
    got = DeepSpeedTrainer(micro_batch_size=2, ranks=2, threads_per_rank=1,
                           deepspeed={"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}},
                           **kw).train(
        tiny_dir, pairs, ref, DPOLoss(beta=0.5), tmp_path / "ds" / "checkpoint", seed=3)
    assert got.steps == want.steps == 2
    assert got.summary["trainable_params"] == want.summary["trainable_params"] == 8 * 4 * (HIDDEN + HIDDEN)
    assert got.summary["peak_rss_mib"] > 0
    for a, b in zip(want.history, got.history):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    base = load_file(str(tiny_dir / "model.safetensors"))
    for name in ("model.safetensors", f"{ADAPTER_DIR}/adapter_model.safetensors"):
        w, g = (load_file(str(tmp_path / t / "checkpoint" / name)) for t in ("torch", "ds"))
        assert w.keys() == g.keys() and (name != "model.safetensors" or w.keys() == base.keys())
        for k in w:
            torch.testing.assert_close(g[k], w[k], atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")
    merged = load_file(str(tmp_path / "ds" / "checkpoint" / "model.safetensors"))
    moved = [k for k in base if not torch.equal(merged[k], base[k])]
    assert sorted(moved) == sorted(k for k in base if k.endswith(("q_proj.weight", "v_proj.weight")))


@pytest.mark.slow
def test_the_reference_of_a_lora_round_is_its_policy_with_the_adapters_disabled(tmp_path, tiny_dir):
    """reference=previous_round under LoRA: round 2's recorded reference log-probs are those of round 2's own model
    (round 1's merged checkpoint + round 2's adapter) with the adapters disabled, and differ with them enabled. The
    reference stage computes them before the policy is built (one model in memory at a time), not a second copy."""
    run = tmp_path / "run"
    alignlab("trainer.lora.enabled=true", "trainer.lora.r=2", "trainer.lora.alpha=4", *TINY_RUN, "rounds=2",
             "base_eval=false", "trainer.lr=1e-3", "reference=previous_round", f"hydra.run.dir={run}")
    rd = run / "round_2"
    pairs = [s.pair for s in read_jsonl(rd / "selected.jsonl", Selected)]
    (ref_file,) = rd.glob("ref_logps.*.json")
    ref = json.loads(ref_file.read_text())
    model = peft.PeftModel.from_pretrained(load_model(run / "round_1" / "checkpoint"),
                                           str(rd / "checkpoint" / ADAPTER_DIR)).eval()
    tok = load_tokenizer(tiny_dir)
    enc = encode_pairs(tok, pairs, 512)  # trainer.max_length (conf/trainer/torch.yaml)
    with torch.no_grad():
        with model.disable_adapter():
            c, r, _, _ = pair_forward(model, enc, tok.pad_token_id)
        c_on, _, _, _ = pair_forward(model, enc, tok.pad_token_id)
    assert len(pairs) == len(ref["chosen"]) > 0
    torch.testing.assert_close(c.double(), torch.tensor(ref["chosen"], dtype=torch.double), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(r.double(), torch.tensor(ref["rejected"], dtype=torch.double), atol=1e-4, rtol=1e-5)
    assert (c_on.double() - torch.tensor(ref["chosen"], dtype=torch.double)).abs().max() > 1e-3  # adapters trained
