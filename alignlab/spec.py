"""Components as JSON: the typed job description that crosses process boundaries instead of pickles.

The runner hands the DeepSpeed ranks its loss, trainer callbacks and generator. A pickle in the run directory
would let anyone who can write there run code on every rank, so they travel as config: ``to_spec(obj)`` is
``{"_target_": "<module>.<Class>", <constructor argument>: <value>, ..., "_state_": {<attribute>: <JSON>}}``,
the inverse of Hydra's ``instantiate`` (nested components are specs themselves), and :func:`from_spec` rebuilds
the object. A component built by :func:`alignlab.config.build` is described by the very config node it was built
from; any other one by its constructor's parameters, read back from same-named attributes (or the one attribute
holding an instance of the parameter's annotated class). ``_state_`` carries the JSON-valued attributes that the
constructor does not set (a selector's curriculum round, for example).

:func:`from_spec` imports only classes under trusted packages: ``alignlab`` and those named in
``$ALIGNLAB_SPEC_PACKAGES``, which the launching process sets from the objects it described (the environment,
not the run directory). A planted ``{"_target_": "os.system", ...}`` is refused before anything is imported.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import typing
import weakref
from typing import Any

TARGET, STATE = "_target_", "_state_"
PACKAGES_ENV = "ALIGNLAB_SPEC_PACKAGES"
LAUNCH_ENV = "ALIGNLAB_LAUNCH"  # one id per launch of the ranks, stamped on their error reports
_PRIMS = (str, int, float, bool, type(None))
_BUILT: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
_BUILT_IDS: dict[int, dict[str, Any]] = {}  # objects that cannot be weakly referenced (slots), by id


class SpecError(ValueError):
    """A component cannot be described as JSON, or a description cannot be rebuilt (names the key)."""


def register(obj: Any, config: dict[str, Any]) -> None:
    """Remember the config node ``obj`` was built from (called by ``alignlab.config.build``)."""
    try:
        _BUILT[obj] = config
    except TypeError:
        _BUILT_IDS[id(obj)] = config


def _is_json(v: Any) -> bool:
    try:
        json.dumps(v, allow_nan=True)
    except (TypeError, ValueError):
        return False
    return True


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _param_attr(obj: Any, name: str, annotation: Any) -> str | None:
    if name in vars(obj):
        return name
    if isinstance(annotation, type):
        hits = [k for k, v in vars(obj).items() if isinstance(v, annotation)]
        if len(hits) == 1:
            return hits[0]
    return None


def to_spec(obj: Any, key: str = "") -> Any:
    """``obj`` as JSON data that :func:`from_spec` turns back into an equal object; raises SpecError naming ``key``."""
    if isinstance(obj, _PRIMS):
        return obj
    if isinstance(obj, (list, tuple)):
        return [to_spec(v, f"{key}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise SpecError(f"{key}: a mapping with non-string keys cannot travel as JSON")
        return {k: to_spec(v, f"{key}.{k}") for k, v in obj.items()}
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return obj.item()
    if type(obj).__module__ == "torch" and type(obj).__name__ == "dtype":  # a dtype argument given as its name
        return str(obj).removeprefix("torch.")
    cls = type(obj)
    built = _BUILT.get(obj) if _weakrefable(obj) else _BUILT_IDS.get(id(obj))
    used: set[str] = set()
    if built is not None:
        spec = dict(built)
        used = set(spec)
    else:
        spec = {TARGET: _path(cls)}
        try:
            hints = typing.get_type_hints(cls.__init__)
        except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to names only
            hints = {}
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            attr = _param_attr(obj, name, hints.get(name))
            if attr is None:
                raise SpecError(f"{key or _path(cls)}: {cls.__name__}({name}=...) is not kept as an attribute, so "
                                f"it cannot be rebuilt from JSON; build it from config (alignlab.config.build) or store it as "
                                f"self.{name}")
            used.add(attr)
            spec[name] = to_spec(getattr(obj, attr), f"{key}.{name}" if key else name)
    state = {k: v for k, v in vars(obj).items() if k not in used and not k.startswith("_") and _is_json(v)}
    if state:
        spec[STATE] = state
    return spec


def _weakrefable(obj: Any) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def trusted_packages() -> list[str]:
    """Top-level packages whose classes :func:`from_spec` may import."""
    extra = [p for p in os.environ.get(PACKAGES_ENV, "").split(",") if p]
    return ["alignlab", *extra]


def packages_of(spec: Any) -> list[str]:
    """The top-level packages a spec's targets live in (for ``$ALIGNLAB_SPEC_PACKAGES`` of the launched ranks)."""
    out: set[str] = set()
    if isinstance(spec, dict):
        if isinstance(spec.get(TARGET), str):
            out.add(spec[TARGET].split(".", 1)[0])
        for v in spec.values():
            out.update(packages_of(v))
    elif isinstance(spec, list):
        for v in spec:
            out.update(packages_of(v))
    return sorted(out)


def trusted_class(target: Any, key: str) -> type:
    """The class ``target`` (``module.Class``, or ``module.Outer.Inner``) names, imported only when its top-level
    package is trusted; anything else raises :class:`SpecError` naming ``key`` before any import."""
    if not isinstance(target, str) or target.split(".", 1)[0] not in trusted_packages():
        raise SpecError(f"{key}: {target!r} is outside the trusted packages ({', '.join(trusted_packages())}"
                        f"); refusing to import it")
    cls: Any = None
    for split in range(len(target.split(".")) - 1, 0, -1):  # nested classes: module.Outer.Inner
        parts = target.split(".")
        try:
            cls = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            cls = getattr(cls, attr, None)
        break
    if not inspect.isclass(cls):
        raise SpecError(f"{key}: {target!r} is not a class")
    return cls


def from_spec(spec: Any, key: str = "job") -> Any:
    """Rebuild what :func:`to_spec` described. Only classes under :func:`trusted_packages` are imported."""
    if isinstance(spec, list):
        return [from_spec(v, f"{key}[{i}]") for i, v in enumerate(spec)]
    if not isinstance(spec, dict):
        return spec
    if TARGET not in spec:
        return {k: from_spec(v, f"{key}.{k}") for k, v in spec.items()}
    cls = trusted_class(spec[TARGET], f"{key}._target_")
    kwargs = {k: from_spec(v, f"{key}.{k}") for k, v in spec.items() if k not in (TARGET, STATE)}
    obj = cls(**kwargs)
    for k, v in (spec.get(STATE) or {}).items():
        setattr(obj, k, v)
    register(obj, {k: v for k, v in spec.items() if k != STATE})  # described again exactly as it came
    return obj


def round_trip(obj: Any, key: str) -> dict[str, Any]:
    """``to_spec(obj)``, checked by rebuilding it and describing the copy again: a component whose attributes do not
    mirror its constructor fails here, in the launching process, naming ``key``, not on the ranks."""
    spec = to_spec(obj, key)
    again = to_spec(from_spec(spec, key), key)
    if json.dumps(again, sort_keys=True) != json.dumps(spec, sort_keys=True):
        raise SpecError(f"{key}: {type(obj).__name__} rebuilt from its JSON description differs from the original "
                        f"({json.dumps(spec, sort_keys=True)[:300]} vs {json.dumps(again, sort_keys=True)[:300]})")
    return spec
