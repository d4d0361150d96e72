"""Bad configs fail before any work, with a message naming the key (and the yaml file)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import alignlab.config  # noqa: F401 - registers run_schema
from alignlab.cli import CONF_DIR
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
