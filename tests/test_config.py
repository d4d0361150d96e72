"""Bad configs fail before any work, with a message naming the key (and the yaml file)."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_RUN, alignlab

BAD = [
    (["sampler=nope"], "sampler/nope"),                              # unknown group choice
    (["sampler.nn=3"], "nn"),                                        # misspelled key in a group
    (["seeed=1"], "seeed"),                                          # misspelled top-level key
    (["sampler.n=0"], "sampler: n must be >= 1"),                    # impossible value
    (["sampler.n=abc"], "sampler.n"),                                # wrong type
    (["trainer.lr=-1"], "trainer: lr must be > 0"),
    (["loss.beta=0"], "loss: beta must be > 0"),
    (["generation.top_p=1.5"], "generation: top_p must be in (0, 1]"),
    (["rounds=-1"], "rounds must be >= 0"),
    (["model.path=/nonexistent/model"], "model.path: no Hugging Face model directory at /nonexistent/model"),
    (["loss.label_smoothing=0.7"], "label_smoothing"),
    (["logger.mode=sometimes"], "logger: mode must be offline, online or disabled"),
    (["data.train_prompts=0"], "data: train_prompts must be >= 1"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_fails_before_work_naming_the_key(overrides, message, tmp_path):
    res = alignlab(*TINY_RUN, *overrides, f"hydra.run.dir={tmp_path}", check=False, timeout=120)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert message in out, out[-2000:]
    assert not list(tmp_path.glob("round_*")) and not (tmp_path / "base_eval.json").exists()


def test_wrong_type_names_the_yaml_file(tmp_path):
    res = alignlab(*TINY_RUN, "trainer.epochs=two", f"hydra.run.dir={tmp_path}", check=False, timeout=120)
    assert "trainer.epochs" in res.stderr + res.stdout and "conf/trainer/torch.yaml" in res.stderr + res.stdout


def test_cfg_job_shows_the_composed_config_and_help_lists_groups():
    cfg = alignlab("--cfg", "job", "sampler.n=16", "loss.beta=0.2", timeout=120).stdout
    assert "n: 16" in cfg and "beta: 0.2" in cfg and "_target_: alignlab.sampling.BestOfNSampler" in cfg
    helptext = alignlab("--help", timeout=120).stdout
    for group in ("model", "data", "generation", "sampler", "verifier", "pair_builder", "selector", "loss",
                  "reference", "trainer", "eval", "logger", "experiment"):
        assert f"{group}:" in helptext
