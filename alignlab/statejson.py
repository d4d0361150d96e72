"""Training state as JSON: what a resumed DeepSpeed round needs from alignlab (step, history, RNG, callbacks).

DeepSpeed's ``client_state`` is pickled into its checkpoint, and loading it back unpickles whatever a writer of
the run directory put there. alignlab keeps its own resume state out of DeepSpeed's files, in a JSON file beside
them, encoded by :func:`encode` and rebuilt by :func:`decode`. Besides JSON's own types, the encoding keeps
tuples, sets, non-string dict keys, numpy arrays and scalars, numpy and Python RNGs, torch tensors, and objects
of classes under the trusted packages (:func:`alignlab.spec.trusted_class`), as tagged dicts. Decoding builds
objects with ``cls.__new__`` and sets their attributes (no constructor, no import outside the trusted
packages), so the file can only ever yield data.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch

from alignlab.spec import SpecError, trusted_class

TAGS = ("__tuple__", "__set__", "__items__", "__ndarray__", "__np__", "__np_rng__", "__py_rng__", "__tensor__",
        "__object__")
BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


class StateError(ValueError):
    """A value that cannot be written as JSON state, or a state file that cannot be read back (names the key)."""


def encode(value: Any, key: str = "state") -> Any:
    """``value`` as JSON-serialisable data (tagged dicts for the types JSON lacks); raises :class:`StateError`."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)) and type(value) in (int, float):
        return value
    if isinstance(value, list):
        return [encode(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, f"{key}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, (set, frozenset)):
        return {"__set__": [encode(v, f"{key}{{}}") for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not any(k in TAGS for k in value):
            return {k: encode(v, f"{key}.{k}") for k, v in value.items()}
        return {"__items__": [[encode(k, key), encode(v, f"{key}[{k!r}]")] for k, v in value.items()]}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise StateError(f"{key}: numpy object arrays cannot be saved as JSON state")
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return {"__np__": value.item(), "dtype": value.dtype.str}
    if isinstance(value, np.random.Generator):
        return {"__np_rng__": encode(value.bit_generator.state, key)}
    if isinstance(value, random.Random) and type(value) is random.Random:
        return {"__py_rng__": encode(value.getstate(), key)}
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        return {"__tensor__": t.tolist(), "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    cls = type(value)
    target = f"{cls.__module__}.{cls.__qualname__}"
    if hasattr(value, "__dict__") and not hasattr(cls, "__slots__"):
        try:
            if trusted_class(target, key) is cls:
                return {"__object__": target, "state": encode(vars(value), f"{key}.{cls.__name__}")}
        except SpecError:
            pass
    raise StateError(f"{key}: a {target} cannot be saved as JSON state (not a JSON type, array, RNG, tensor, "
                     f"nor an object of a trusted package)")


def decode(data: Any, key: str = "state") -> Any:
    """The value :func:`encode` described; imports nothing outside the trusted packages, runs no constructor."""
    if isinstance(data, list):
        return [decode(v, f"{key}[{i}]") for i, v in enumerate(data)]
    if not isinstance(data, dict):
        return data
    tag = next((t for t in TAGS if t in data), None)
    if tag is None:
        return {k: decode(v, f"{key}.{k}") for k, v in data.items()}
    body = data[tag]
    if tag == "__tuple__":
        return tuple(decode(body, key))
    if tag == "__set__":
        return set(decode(body, key))
    if tag == "__items__":
        return {decode(k, key): decode(v, key) for k, v in body}
    if tag == "__ndarray__":
        return np.array(body, dtype=np.dtype(data["dtype"])).reshape(data["shape"])
    if tag == "__np__":
        return np.dtype(data["dtype"]).type(body)
    if tag == "__np_rng__":
        st = decode(body, key)
        if st.get("bit_generator") not in BIT_GENERATORS:
            raise StateError(f"{key}: unknown numpy bit generator {st.get('bit_generator')!r}")
        bg = getattr(np.random, st["bit_generator"])()
        bg.state = st
        return np.random.Generator(bg)
    if tag == "__py_rng__":
        rng = random.Random()
        rng.setstate(decode(body, key))
        return rng
    if tag == "__tensor__":
        dtype = getattr(torch, str(data["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise StateError(f"{key}: unknown torch dtype {data['dtype']!r}")
        return torch.tensor(body, dtype=dtype).reshape(data["shape"])
    cls: Any = trusted_class(body, f"{key}.__object__")  # Any: mypy would take cls.__new__ for type.__new__
    obj = cls.__new__(cls)
    obj.__dict__.update(decode(data["state"], f"{key}.{cls.__name__}"))
    return obj


def dumps(value: Any, key: str = "state") -> str:
    """:func:`encode` as JSON text."""
    return json.dumps(encode(value, key))


def loads(text: str, key: str = "state") -> Any:
    """:func:`decode` of JSON text; unparseable text raises :class:`StateError` naming ``key``."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise StateError(f"{key}: not valid JSON state ({e})") from None
    return decode(data, key)
