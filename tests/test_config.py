"""Bad configs fail before any work, with a message naming the key (and the yaml file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import alignlab.config  # noqa: F401 - registers run_schema
from alignlab.config import CONF_DIR
from alignlab.runner import build_components
from tests.conftest import TINY_RUN, alignlab

BAD = [
    (["sampler=nope"], "sampler/nope"),                              # unknown group choice
    (["sampler.nn=3"], "nn"),                                        # misspelled key in a group
    (["seeed=1"], "seeed"),                                          # misspelled top-level key
    (["sampler.n=0"], "sampler: n must be >= 1"),                    # impossible value
    (["sampler.n=abc"], "sampler.n"),                                # wrong type
    (["trainer.lr=-1"], "trainer: lr must be > 0"),
    (["loss.beta=0"], "loss: beta must be a finite number > 0"),
    (["generation.top_p=1.5"], "generation: top_p must be in (0, 1]"),
    (["rounds=-1"], "rounds must be >= 0"),
    (["model.path=/nonexistent/model"], "model.path: no Hugging Face model directory at /nonexistent/model"),
    (["loss.label_smoothing=0.7"], "label_smoothing"),
    (["logger=wandb", "logger.mode=sometimes"], "logger: mode must be offline, online or disabled"),
    (["data.train_prompts=0"], "data: train_prompts must be >= 1"),
    (["trainer.epochs=two"], "trainer.epochs"),
]


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=overrides, return_hydra_config=True)


def _choices(cfg) -> dict[str, str]:
    return {k: v for k, v in cfg.hydra.runtime.choices.items() if v is not None}


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_fails_before_work_naming_the_key(overrides, message):
    with pytest.raises(Exception) as err:  # noqa: PT011 - Hydra, OmegaConf or our ConfigError
        cfg = _compose(TINY_RUN + overrides)
        build_components(cfg, _choices(cfg))
    assert message in str(err.value), str(err.value)


def test_errors_name_the_yaml_file():
    cfg = _compose(TINY_RUN + ["trainer.epochs=two"])
    with pytest.raises(alignlab_config_error(), match=r"conf/trainer/torch\.yaml"):
        build_components(cfg, _choices(cfg))
    cfg = _compose(TINY_RUN + ["sampler.n=0"])
    with pytest.raises(alignlab_config_error(), match=r"conf/sampler/best_of_n\.yaml"):
        build_components(cfg, _choices(cfg))


def alignlab_config_error():
    from alignlab.config import ConfigError

    return ConfigError


def test_good_overrides_compose_and_build():
    cfg = _compose(["experiment=quickstart", "sampler.n=16", "loss.beta=0.2"])
    comps = build_components(cfg, _choices(cfg))
    assert comps["sampler"].n == 16 and comps["loss"].beta == 0.2


def test_cli_exits_nonzero_before_writing_anything(tmp_path):
    res = alignlab(*TINY_RUN, "sampler.n=0", f"hydra.run.dir={tmp_path}", check=False, timeout=180)
    assert res.returncode != 0 and "sampler: n must be >= 1" in res.stdout + res.stderr
    assert not list(tmp_path.glob("round_*")) and not (tmp_path / "base_eval.json").exists()


def test_cfg_job_shows_the_composed_config_and_help_lists_groups():
    cfg = alignlab("--cfg", "job", "sampler.n=16", "loss.beta=0.2", timeout=180).stdout
    assert "'n': 16" in cfg and "beta: 0.2" in cfg and "_target_: alignlab.sampling.BestOfNSampler" in cfg
    helptext = alignlab("--help", timeout=180).stdout
    for group in ("model", "data", "generation", "sampler", "verifier", "pair_builder", "selector", "loss",
                  "reference", "trainer", "eval", "logger", "experiment"):
        assert f"{group}:" in helptext


PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_composes_and_builds(preset, tiny_dir, tmp_path, monkeypatch):
    """Each preset in conf/experiment composes and builds every component (its model's weights are swapped for the
    embedded checkpoint, which is what this machine has), and so does each value its Hydra sweep lists; the SFT
    presets' settings bind to ``train_sft_base``'s arguments."""
    import inspect

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from alignlab.data.benchmarks import BENCHMARKS
    from alignlab.sft_base import train_sft_base
    from tests.conftest import ROOT

    cfg = _compose([f"experiment={preset}"])
    assert cfg.experiment_name == preset
    if cfg.get("stage") == "sft_base":
        inspect.signature(train_sft_base).bind(**OmegaConf.to_container(cfg.sft_base, resolve=False))
        return
    # data=gsm8k and eval=math_suite check their files at build time: a stand-in of the shared layout (the build
    # reads each file; one row that fits every benchmark's upstream schema), so the test needs no data folder
    q = "Tom has 3 apples and buys 4 more. How many?"
    row = json.dumps({"question": q, "problem": q, "answer": "3 + 4 = 7\n#### 7", "solution": "\\boxed{7}",
                      "final_answer": ["7"]})
    for f in ("train/gsm8k/train.jsonl", *(f"benchmarks/{b}/test.jsonl" for b in BENCHMARKS)):
        (tmp_path / f).parent.mkdir(parents=True)
        (tmp_path / f).write_text(f"{row}\n{row}\n")
    monkeypatch.setenv("ALIGNLAB_DATA", str(tmp_path))
    monkeypatch.setenv("ALIGNLAB_BENCHMARKS", str(tmp_path / "benchmarks"))
    sweeps = OmegaConf.to_container(cfg.hydra.sweeper.params) if cfg.hydra.sweeper.get("params") else {}
    variants = [[]] + [[f"{k}={v}"] for k, vals in sweeps.items() for v in str(vals).split(",")]
    for extra in variants:
        cfg = _compose([f"experiment={preset}", f"model.path={tiny_dir}", *extra])
        with open_dict(cfg):
            cfg.hydra.runtime.cwd = str(ROOT)  # ${hydra:runtime.cwd} (data=gsm8k's path), as a run sets it
        HydraConfig.instance().set_config(cfg)
        comps = build_components(cfg, _choices(cfg))
        assert set(comps) >= {"sampler", "loss", "reference", "trainer", "selector"}, (preset, extra)


@pytest.mark.parametrize("preset, generator", [
    ("quickstart", "HFGenerator"),                  # 1.3M parameters: an engine start costs more than it saves
    ("smollm2_arith", "HFGenerator"),               # one reduced round, near vLLM's break-even on CPU
    ("smollm2_pace_vs_dpo_r1", "VLLMGenerator"),    # study-sized rounds on a real model
    ("dpo_r1_qwen_1.5b", "VLLMGenerator"),          # GPUs
    ("dpo_r1_qwen_math_7b", "VLLMGenerator"),
])
def test_each_preset_defaults_to_the_generator_measured_fastest_for_its_workload(preset, generator):
    """experiments/perf/README.md: vLLM wins once a round generates more than ~4,400 tokens per engine start."""
    assert _compose([f"experiment={preset}"]).generation._target_.rsplit(".", 1)[1] == generator
