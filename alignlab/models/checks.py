"""The model directory check: a Hugging Face directory whose weights fit its config.json, read from file headers
only (no weight is loaded), so a wrong ``model.path`` fails before any work with the key, the file and a fix."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from alignlab.checks import bad_path, read_json_object, require_dir
from alignlab.config import ConfigError
from alignlab.models import require_safetensors, safetensors_header

log = logging.getLogger("alignlab")

SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                           "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_dir(directory: str | Path, key: str = "model.path") -> None:
    """A Hugging Face model directory whose weights fit its config.json, checked from file headers only.

    config.json must parse; weights must be safetensors (every shard an index names must exist) with intact
    headers and sizes; tokenizer files must be there; and where transformers can build the architecture on the
    meta device, every tensor the config needs must be in the files with the shape the config implies.
    """
    fix = "point model.path at a Hugging Face model directory (config.json, *.safetensors, tokenizer files)"
    d = require_dir(key, directory, fix)
    if not (d / "config.json").exists():
        raise bad_path(key, d, "config.json missing, not a Hugging Face model directory", fix)
    read_json_object(key, d / "config.json", "restore the model's config.json (it does not parse)")
    try:
        require_safetensors(d)
    except FileNotFoundError as e:
        raise ConfigError(f"{key}: {e}") from None
    if not any((d / name).is_file() for name in TOKENIZER_FILES):
        raise bad_path(key, d, f"no tokenizer files ({', '.join(TOKENIZER_FILES[:2])})",
                       "copy the base model's tokenizer files into the directory")
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, Path] = {}
    for f in _weight_files(key, d):
        for name, shape in _safetensors_shapes(key, f).items():
            shapes[name], where[name] = shape, f
    _compare_with_config(key, d, shapes, where)


def _weight_files(key: str, d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if not index.exists():
        return sorted(d.glob("*.safetensors"))
    wmap = read_json_object(key, index, "restore the index or re-save the model").get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise bad_path(key, index, "has no weight_map", "re-save the model with save_pretrained")
    files = sorted({d / str(v) for v in wmap.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise bad_path(key, index, f"names {len(missing)} missing shard(s): {', '.join(missing[:3])}",
                       "copy every shard the index lists (an interrupted download?)")
    return files


def _safetensors_shapes(key: str, f: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header; the file must be as long as its header says."""
    fix = "the file is damaged: download or save the weights again"
    size = f.stat().st_size
    try:
        n, header = safetensors_header(f)
    except OSError as e:
        raise bad_path(key, f, f"cannot be read ({e.strerror})", fix) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad_path(key, f, "is not a safetensors file (header is not JSON)", fix) from None
    except ValueError:  # the length prefix (JSON errors, also ValueErrors, are caught above)
        raise bad_path(key, f, "is not a safetensors file (bad header length)", fix) from None
    if not isinstance(header, dict):
        raise bad_path(key, f, "is not a safetensors file (header is not an object)", fix)
    out, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(int(x) for x in info["shape"])
            begin, stop = (int(x) for x in info["data_offsets"])
            nbytes = math.prod(shape) * SAFETENSORS_DTYPE_BYTES.get(info["dtype"], 0)
        except (KeyError, TypeError, ValueError):
            raise bad_path(key, f, f"has a malformed header entry for {name!r}", fix) from None
        if nbytes and stop - begin != nbytes:
            raise bad_path(key, f, f"tensor {name!r}: {stop - begin} bytes for shape {list(shape)}", fix)
        out[name], end = shape, max(end, stop)
    if size < 8 + n + end:
        raise bad_path(key, f, f"is truncated ({size} bytes, its header needs {8 + n + end})", fix)
    return out


def _expected_shapes(d: Path) -> tuple[dict[str, tuple[int, ...]], set[str], str] | None:
    """State-dict shapes of the architecture config.json describes (built on the meta device: no memory), the
    keys that may be absent because they are tied, and the base-model prefix; None if it cannot be built."""
    try:
        config = AutoConfig.from_pretrained(str(d))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - custom code, unknown model type: the header checks still ran
        log.debug("model check: cannot build %s on the meta device (%s); shapes not compared", d, e)
        return None
    tied = getattr(model, "_tied_weights_keys", None) or ()
    tied_keys = set(tied) | ({"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set())
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, tied_keys, model.base_model_prefix


def _compare_with_config(key: str, d: Path, found: dict[str, tuple[int, ...]], where: dict[str, Path]) -> None:
    exp = _expected_shapes(d)
    if exp is None:
        return
    expected, tied, prefix = exp
    if not found.keys() & expected.keys() and prefix:  # a base model saved without (or with) its prefix
        p = prefix + "."
        renamed = {(k[len(p):] if k.startswith(p) else p + k): k for k in found}
        if renamed.keys() & expected.keys():
            found = {n: found[o] for n, o in renamed.items()}
            where = {n: where[o] for n, o in renamed.items()}
    fix = "config.json and the weights come from different models: use the config.json saved with these weights"
    common = found.keys() & expected.keys()
    if not common:
        ex = sorted(found)[0] if found else "nothing"
        raise bad_path(key, d / "config.json", f"describes none of the {len(found)} tensors in the weights "
                       f"(they hold e.g. {ex!r}, it expects e.g. {sorted(expected)[0]!r})", fix)
    wrong = sorted(k for k in common if found[k] != expected[k])
    if wrong:
        k = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise bad_path(key, where[k], f"tensor {k!r} has shape {list(found[k])} but {d / 'config.json'} implies "
                       f"{list(expected[k])}{more}", fix)
    missing = sorted(k for k in expected.keys() - found.keys() if k not in tied)
    if missing and len(common) >= len(expected) / 2:
        files = sorted({f.name for f in where.values()})
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise bad_path(key, d / files[0] if len(files) == 1 else d, f"lacks tensor {missing[0]!r}{more} that "
                       f"config.json needs", "the checkpoint is incomplete: save or download it again")
