"""W&B settings: explicit config > WANDB_PROJECT / WANDB_MODE / WANDB_ENTITY > alignlab's defaults (issue 33)."""

from __future__ import annotations

import pytest

from alignlab.logging import WandbLogger

ENV = {"WANDB_PROJECT": "proj-from-env", "WANDB_MODE": "disabled", "WANDB_ENTITY": "team-from-env"}


def _settings(lg: WandbLogger) -> tuple:
    return lg.project, lg.mode, lg.entity


@pytest.mark.parametrize(("env", "config", "want"), [
    ({}, {}, ("alignlab", "offline", None)),  # defaults: never online by itself
    (ENV, {}, ("proj-from-env", "disabled", "team-from-env")),  # the environment beats the defaults
    (ENV, {"project": "p", "mode": "offline", "entity": "e"}, ("p", "offline", "e")),  # explicit config beats both
    ({"WANDB_MODE": "online"}, {"mode": "offline"}, ("alignlab", "offline", None)),  # an inherited online loses
    ({"WANDB_MODE": "dryrun"}, {}, ("alignlab", "offline", None)),  # wandb's own alias for offline
    ({"WANDB_PROJECT": "proj-from-env"}, {"mode": "disabled"}, ("proj-from-env", "disabled", None)),  # key by key
])
def test_explicit_config_beats_the_environment_which_beats_the_defaults(monkeypatch, env, config, want):
    for k in ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _settings(WandbLogger(**config)) == want


def test_a_bad_wandb_mode_from_the_environment_is_named(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match=r"got 'sometimes' \(from WANDB_MODE\)"):
        WandbLogger()


def test_the_run_wandb_opens_carries_the_environment_project(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "proj-from-env")
    monkeypatch.setenv("WANDB_MODE", "offline")
    lg = WandbLogger()
    lg.start(tmp_path / "a", {"seed": 0}, name="t")
    try:
        assert lg._run.project == "proj-from-env"  # the real wandb run's project
    finally:
        lg.finish()
    lg = WandbLogger(project="explicit")
    lg.start(tmp_path / "b", {"seed": 0}, name="t")
    try:
        assert lg._run.project == "explicit"
    finally:
        lg.finish()
