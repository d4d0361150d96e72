"""``verifier=reward_fn``: scalar reward functions in the shapes verl and TRL users already have.

- verl: ``compute_score(data_source, solution_str, ground_truth, extra_info=None)`` returning a float (or a dict
  with a ``"score"``), as in verl's ``verl/utils/reward_score`` and its ``custom_reward_function``.
- TRL: a ``reward_funcs`` callable ``f(completions, **kwargs)`` returning one float (or None) per completion; the
  kwargs are the batch's columns: ``ground_truth`` (the gold answers, also as ``answer`` and ``solution``),
  ``data_source``, and ``prompts=None``.

Functions are named by a dotted import path (``pkg.module.fn`` or ``pkg.module:fn``) or ``path/to/file.py:fn``,
and imported when the verifier is built, so a wrong name fails before any generation. A score ``>= threshold``
is a correct verdict (pairs are built from verdicts); the score is kept on the verdict. ``routes`` maps a
``data_source`` (verl's column) to its own function; other sources use ``fn``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from alignlab.verify.extract import extract_answer
from alignlab.verify.verifiers import Verdict, _Closeable, _same_length

STYLES = ("auto", "verl", "trl")


def import_callable(path: str, key: str) -> Callable:
    """The function ``path`` names (``pkg.mod.fn``, ``pkg.mod:fn`` or ``file.py:fn``); errors name ``key``."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{key}: a dotted import path such as my_rewards.compute_score, got {path!r}")
    mod_name, sep, attr = path.rpartition(":") if ":" in path else path.rpartition(".")
    if not mod_name or not attr:
        raise ValueError(f"{key}: {path!r} is not module.function, module:function or file.py:function")
    try:
        if mod_name.endswith(".py"):
            file = Path(mod_name).expanduser()
            if not file.is_file():
                raise FileNotFoundError(f"no such file {file}")
            spec = importlib.util.spec_from_file_location(f"_alignlab_reward_{file.stem}", file)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(mod_name)
        fn = getattr(module, attr)
    except Exception as e:  # noqa: BLE001 - any import failure is a config error naming the key
        raise ValueError(f"{key}: cannot import {path!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ValueError(f"{key}: {path!r} is not callable")
    return fn


def style_of(fn: Callable, style: str, key: str) -> str:
    """``verl`` when the signature starts (data_source, solution_str, ...), else ``trl``; or as configured."""
    if style not in STYLES:
        raise ValueError(f"{key}: style must be one of {STYLES}, got {style!r}")
    if style != "auto":
        return style
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return "trl"
    return "verl" if names[:2] == ["data_source", "solution_str"] else "trl"


class RewardFnVerifier(_Closeable):
    """Verdicts from a scalar reward function (verl or TRL shape), thresholded; routed by ``data_source``."""

    def __init__(self, fn: str | None = None, style: str = "auto", threshold: float = 0.5,
                 routes: dict[str, str] | None = None, data_source: str = "default") -> None:
        if fn is None and not routes:
            raise ValueError("verifier.fn: name a reward function (dotted import path), or give verifier.routes")
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"verifier.threshold: a finite number, got {threshold!r}")
        self.fn, self.style, self.threshold = fn, style, float(threshold)
        self.routes, self.data_source = dict(routes or {}), data_source
        self._fns: dict[str | None, tuple[Callable, str]] = {}
        if fn is not None:
            f = import_callable(fn, "verifier.fn")
            self._fns[None] = (f, style_of(f, style, "verifier.style"))
        for src, path in self.routes.items():
            f = import_callable(path, f"verifier.routes.{src}")
            self._fns[src] = (f, style_of(f, style, "verifier.style"))

    def _route(self, source: str) -> tuple[Callable, str]:
        if source in self._fns:
            return self._fns[source]
        if None in self._fns:
            return self._fns[None]
        raise ValueError(f"verifier.routes: no reward function for data_source {source!r} (routes: "
                         f"{sorted(self.routes)}) and no verifier.fn to fall back on")

    def scores(self, predictions: list[str], golds: list[str], data_sources: Sequence[str] | None = None
               ) -> list[float]:
        """One float per prediction (None and NaN from the function count as -inf: never correct). An empty
        or missing data_source is ``self.data_source``."""
        _same_length(predictions, golds)
        sources = ([s or self.data_source for s in data_sources] if data_sources is not None
                   else [self.data_source] * len(predictions))
        if len(sources) != len(predictions):
            raise ValueError(f"data_sources: {len(sources)} for {len(predictions)} predictions")
        out: list[float] = [0.0] * len(predictions)
        for src in dict.fromkeys(sources):
            idx = [i for i, s in enumerate(sources) if s == src]
            fn, style = self._route(src)
            if style == "verl":
                got = [fn(src, predictions[i], golds[i], {"index": i}) for i in idx]
            else:
                g = [golds[i] for i in idx]
                got = list(fn(completions=[predictions[i] for i in idx], prompts=None, ground_truth=g, answer=g,
                              solution=g, data_source=[src] * len(idx)))
                if len(got) != len(idx):
                    raise ValueError(f"verifier: {self.routes.get(src, self.fn)} returned {len(got)} rewards for "
                                     f"{len(idx)} completions")
            for i, v in zip(idx, got):
                v = v.get("score") if isinstance(v, dict) else v
                out[i] = float(v) if v is not None and math.isfinite(float(v)) else -math.inf
        return out

    def check(self, predictions: list[str], golds: list[str], data_sources: Sequence[str] | None = None
              ) -> list[Verdict]:
        scores = self.scores(predictions, golds, data_sources)
        return [Verdict(correct=s >= self.threshold, extracted=extract_answer(p) if isinstance(p, str) else None,
                        score=s) for p, s in zip(predictions, scores)]
