"""Config schemas and validation: fail before any work, naming the key and the yaml file.

Top-level keys have a dataclass schema in Hydra's ConfigStore (``run_schema``). Each group's
node is checked against a schema derived from its ``_target_`` class's ``__init__`` signature
(the class is the single source of truth for its knobs): unknown keys and wrong types fail
through OmegaConf's structured-config validation; impossible values fail in the constructor,
which every component keeps cheap (no model loading) so that building all of them up front is
the validation pass.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class, instantiate
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from alignlab.spec import register

_CHECKOUT_CONF = Path(__file__).resolve().parent.parent / "conf"
# a source checkout (or an editable install) reads conf/ beside the package; an installed wheel carries the same
# tree as the package ``alignlab_conf`` (setup.py maps conf/ onto it)
CONF_DIR = str(_CHECKOUT_CONF) if (_CHECKOUT_CONF / "config.yaml").is_file() else "pkg://alignlab_conf"

# The component groups, in the order a round uses them: one table. The config schema (below), the defaults check
# (tests/test_config.py: conf/config.yaml's defaults list), the runner's build and ``stages.Run``'s fields (one
# per group, the same name, typed by the group's protocol) all derive from it.
GROUPS = ("model", "data", "generation", "sampler", "verifier", "pair_builder", "selector", "loss", "reference",
          "trainer", "eval", "logger")


PAIRS_FORMATS = ("standard", "conversational")


def _key(name: str, tp: Any, default: Any = MISSING) -> tuple[str, Any, Any]:
    return name, tp, field(default_factory=dict) if default == {} else field(default=default)


# Top-level keys, then one per group (each group's node is checked against its own ``_target_``'s schema by
# validate_node, so Any here), then the rest; Hydra's ConfigStore holds it as ``run_schema``.
RunSchema = dataclasses.make_dataclass("RunSchema", [
    _key("experiment_name", str), _key("seed", int, 0), _key("rounds", int, 3),
    _key("resume", Any, False),  # true | false | force (checked in validate_top)
    _key("base_eval", bool, True), _key("out_dir", str | None, None), _key("threads", int, 0),
    *(_key(g, Any) for g in GROUPS),
    _key("extra", dict[str, Any], {}),  # free-form notes carried into summary.json
    _key("stage", str | None, None),  # "sft_base" runs the warm-start script instead of rounds
    # standard: round_k/pairs.jsonl (prompt/chosen/rejected strings, TRL's standard format) only; conversational:
    # also round_k/pairs.conversational.jsonl, prompt and answers as chat messages (TRL's conversational format)
    _key("pairs_format", str, "standard"),
    _key("sft_base", Any, None),
])


ConfigStore.instance().store(name="run_schema", node=RunSchema)


class ConfigError(ValueError):
    """A bad configuration, found before any work started."""


def _where(group: str, choices: dict[str, str]) -> str:
    choice = choices.get(group)
    return f" (conf/{group}/{choice}.yaml)" if choice else ""


def _schema_for(cls: type) -> type:
    """A dataclass mirroring ``cls.__init__``'s parameters (types and defaults) plus ``_target_``."""
    init = cls.__dict__.get("__init__") or next(c.__dict__["__init__"] for c in cls.__mro__ if "__init__" in c.__dict__)
    hints = typing.get_type_hints(init)
    fields: list[tuple] = [("_target_", str, dataclasses.field(default=f"{cls.__module__}.{cls.__qualname__}"))]
    for name, p in inspect.signature(init).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        tp = _omegaconf_type(hints.get(name, Any))
        default = MISSING if p.default is inspect.Parameter.empty else p.default
        if isinstance(default, (list, dict)):
            fields.append((name, tp, dataclasses.field(default_factory=functools.partial(copy.copy, default))))
        else:
            fields.append((name, tp, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)


def _omegaconf_type(tp: Any) -> Any:
    """Keep the types OmegaConf can check (primitives, Optional of them); anything else is Any."""
    prims = (int, float, str, bool)
    if tp in prims:
        return tp
    args = typing.get_args(tp)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in prims:
            return rest[0] | None
        return Any
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return Any  # lists stay unchecked by type but must still be lists of something
    return Any


def validate_node(group: str, node: DictConfig, choices: dict[str, str]) -> None:
    where = _where(group, choices)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"{group}: missing `_target_`{where}")
    try:
        cls = get_class(node._target_)
    except Exception as e:  # noqa: BLE001 - any import failure is a config error
        raise ConfigError(f"{group}._target_: cannot import {node._target_!r}{where}: {e}") from e
    try:
        OmegaConf.merge(OmegaConf.structured(_schema_for(cls)), node)
    except OmegaConfBaseException as e:
        key = f"{group}.{e.full_key}" if getattr(e, "full_key", None) else group
        raise ConfigError(f"{key}: {e.msg if hasattr(e, 'msg') else e}{where}") from None


def build(group: str, node: DictConfig, choices: dict[str, str], **kwargs: Any) -> Any:
    """Instantiate a group's component, turning constructor ValueErrors into named config errors. The node is
    remembered with the object (:func:`alignlab.spec.register`): it is how the component crosses to other
    processes (the DeepSpeed ranks rebuild it from that config, never from a pickle)."""
    try:
        obj = instantiate(node, **kwargs)
    except Exception as e:  # noqa: BLE001
        cause: BaseException = e
        while cause.__cause__ is not None and not isinstance(cause, (ValueError, TypeError)):
            cause = cause.__cause__
        msg = str(cause)
        if not msg.startswith((f"{group}.", f"{group}:")):  # input checks name their full key (data.path: ...)
            msg = f"{group}: {msg}"
        raise ConfigError(f"{msg}{_where(group, choices)}") from None
    conf = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else None
    if not kwargs and isinstance(conf, dict) and not any(str(k).startswith("_") and k != "_target_" for k in conf):
        register(obj, {str(k): v for k, v in conf.items()})
    return obj


def validate_top(cfg: DictConfig) -> None:
    """Top-level values the schema cannot type (``resume`` is a bool or the word ``force``)."""
    if not isinstance(cfg.resume, bool) and cfg.resume != "force":
        raise ConfigError(f"resume must be true, false or force (continue a run dir whose saved config differs), "
                          f"got {cfg.resume!r}")
    if cfg.rounds < 0:
        raise ConfigError(f"rounds must be >= 0, got {cfg.rounds}")
    if cfg.threads < 0:
        raise ConfigError(f"threads must be >= 0, got {cfg.threads}")
    if cfg.get("pairs_format", "standard") not in PAIRS_FORMATS:
        raise ConfigError(f"pairs_format must be one of {', '.join(PAIRS_FORMATS)}, got {cfg.pairs_format!r}")


def choices_of(hydra_cfg: Any) -> dict[str, str]:
    try:
        return {k: v for k, v in hydra_cfg.runtime.choices.items() if v is not None}
    except Exception:  # noqa: BLE001 - outside a Hydra app
        return {}
