"""Every use of a third-party library's private API, in one place, each behind a version guard.

alignlab reaches past four libraries' public surface:

- transformers: a KV-cache layer class (``DynamicLayer``) and the cache's ``layer_class_to_replicate`` hook, for
  the preallocated cache of ``generation=hf``;
- DeepSpeed: ``deepspeed.comm.torch.build_shm_op`` (skipped on CPU) and the engine's
  ``_zero3_consolidated_16bit_state_dict`` (ZeRO-3 weights gathered for the Hugging Face checkpoint);
- vLLM: ``llm.llm_engine.engine_core`` and ``vllm.distributed.parallel_state`` (freeing the GPU between stages);
- math-verify: ``alignlab/verify/_worker.py`` models which answers its parser accepts; that worker runs without
  importing alignlab (a fresh interpreter per pool), so its model stays there, guarded by the pin in pyproject.

A version outside the tested range fails at first use with the library, the version found and the range, instead
of an AttributeError deep inside a round. The ranges are pyproject's.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from typing import Any

log = logging.getLogger("alignlab")

# library -> (lowest tested, first untested): the ranges pyproject.toml declares
TESTED = {
    "transformers": ("5.19", "6"),
    "deepspeed": ("0.19.8", "0.20"),
    "vllm": ("0.32", "0.33"),
}


class UntestedVersion(RuntimeError):
    """A library's private API is used at a version alignlab was not tested with."""


def _installed(lib: str) -> str | None:
    mod = importlib.import_module(lib)
    v = getattr(mod, "__version__", None)
    if v is None:
        try:
            v = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            return None  # a stand-in module (tests) or a source tree without metadata: nothing to compare
    return str(v)


def require(lib: str) -> None:
    """Raise :class:`UntestedVersion` when ``lib``'s installed version is outside :data:`TESTED`."""
    from packaging.version import Version

    found = _installed(lib)
    if found is None:
        return
    low, high = TESTED[lib]
    if not Version(low) <= Version(Version(found).base_version) < Version(high):
        raise UntestedVersion(
            f"{lib} {found} is outside the versions alignlab's use of its private API was tested with "
            f"(>={low},<{high}; alignlab/_compat.py): install a version in that range (constraints.txt)")


# -- transformers ----------------------------------------------------------------------------------------------

def dynamic_layer_base() -> type:
    """transformers' per-layer KV cache class, the base of ``generation=hf``'s preallocated layer."""
    require("transformers")
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


def cache_with_layer_class(layer_cls: type) -> Any:
    """A ``DynamicCache`` whose layers (created lazily, one per model layer) are ``layer_cls``."""
    require("transformers")
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = layer_cls
    return cache


# -- DeepSpeed -------------------------------------------------------------------------------------------------

def skip_cpu_shm_allreduce() -> None:
    """Plain gloo on CPU: DeepSpeed's shared-memory all-reduce is a C++ op JIT-compiled on first use (~1 min)."""
    require("deepspeed")
    from deepspeed.accelerator import get_accelerator

    ds_torch_comm: Any = importlib.import_module("deepspeed.comm.torch")  # the attribute is shadowed by torch itself
    if get_accelerator().device_name() == "cpu" and hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None


def zero3_full_state_dict(engine: Any) -> dict | None:
    """The full 16-bit weights of a ZeRO-3 engine, on rank 0 (None elsewhere). A collective: every rank calls it."""
    require("deepspeed")
    return engine._zero3_consolidated_16bit_state_dict()


# -- vLLM ------------------------------------------------------------------------------------------------------

def shutdown_vllm(llm: Any) -> None:
    """Best effort: stop an offline ``LLM``'s engine core and drop vLLM's parallel state (frees the GPU)."""
    require("vllm")
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        try:
            core.shutdown()
        except Exception as e:  # noqa: BLE001
            log.debug("vLLM engine shutdown: %s", e)
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception as e:  # noqa: BLE001
        log.debug("vLLM parallel state cleanup: %s", e)
