"""Input checks: every file or directory a user names is looked at before any expensive work.

Each check raises :class:`~alignlab.config.ConfigError` with one line: the config key, the path, what is
wrong and what to do (``data.path: /x/train.jsonl: no such file; set data.path to ...``). The CLI prints it
and exits with code 2. The checks only read (headers, a first chunk, JSON rows), never load weights.

:func:`precheck` runs all of them before Hydra starts the job, so a rejected start writes nothing: Hydra would
otherwise rewrite ``.hydra/*.yaml`` and append to the log of an existing run directory first.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from alignlab.config import ConfigError
from alignlab.runlock import probe

log = logging.getLogger("alignlab")

HEAD_BYTES = 1 << 16  # how much of a text file is looked at for binary content
# Top-level (or group.key) settings that do not change a run's results: a resumed run may differ in these.
RESULT_NEUTRAL = ("resume", "threads", "out_dir", "rounds", "base_eval", "logger", "extra", "experiment_name",
                  "trainer.log_every", "trainer.keep_workdir", "trainer.threads_per_rank", "trainer.master_port",
                  "trainer.checkpoint_every", "trainer.max_grad_norm_abort", "verifier.workers")
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                           "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def bad_path(key: str, path: str | Path, problem: str, fix: str) -> ConfigError:
    """The one-line error every check raises: ``key: path: problem; fix``."""
    return ConfigError(f"{key}: {path}: {problem}; {fix}")


# ------------------------------------------------------------------------------------------------ files, dirs
def require_dir(key: str, path: str | Path, fix: str) -> Path:
    """An existing, listable directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise bad_path(key, p, "no such directory" + (" (a broken symlink)" if p.is_symlink() else ""), fix)
    if not p.is_dir():
        raise bad_path(key, p, "is a file, expected a directory", fix)
    try:
        next(iter(os.scandir(p)), None)
    except OSError as e:
        raise bad_path(key, p, f"cannot be listed ({e.strerror})", fix) from None
    return p


def require_file(key: str, path: str | Path, fix: str, text: bool = True) -> Path:
    """An existing, readable, non-empty regular file; with ``text``, not binary (no NUL bytes, mostly UTF-8)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise bad_path(key, p, "no such file" + (" (a broken symlink)" if p.is_symlink() else ""), fix)
    if p.is_dir():
        raise bad_path(key, p, "is a directory, expected a file", fix)
    if not p.is_file():
        raise bad_path(key, p, "is not a regular file", fix)
    try:
        with open(p, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError as e:
        raise bad_path(key, p, f"cannot be read ({e.strerror})", fix) from None
    if not head.strip():
        raise bad_path(key, p, "is empty", fix)
    if text:
        chars = head.decode("utf-8", errors="replace")
        if b"\0" in head or chars.count("\ufffd") > 0.1 * len(chars):
            raise bad_path(key, p, "is binary, not UTF-8 text", fix)
    return p


def read_json_object(key: str, path: str | Path, fix: str) -> dict[str, Any]:
    """A JSON file holding one object (a config, an index)."""
    p = require_file(key, path, fix)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_path(key, p, f"is not valid JSON ({e})", fix) from None
    if not isinstance(obj, dict):
        raise bad_path(key, p, f"holds a JSON {type(obj).__name__}, expected an object", fix)
    return obj


def read_rows(key: str, path: str | Path, reader: Callable[[Path], list], fix: str) -> list:
    """Rows of a data file through ``reader`` (which skips malformed rows with ``file:line`` warnings, or raises
    ``ValueError`` naming ``file:line`` when strict); a file with no usable row is an error naming it."""
    p = require_file(key, path, fix)
    try:
        rows = reader(p)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    except OSError as e:
        raise bad_path(key, p, f"cannot be read ({e.strerror})", fix) from None
    if not rows:
        raise bad_path(key, p, "holds no usable rows (every non-empty line is malformed; see the warnings above)",
                       fix)
    return rows


# ------------------------------------------------------------------------------------------------ benchmarks
def check_benchmarks(names: Sequence[str], root: str | Path, strict: bool = False) -> None:
    """``eval.root`` is a folder and each of ``eval.benchmarks`` has a readable test.jsonl with usable rows."""
    from alignlab.data.benchmarks import benchmark_path, load_benchmark

    root = require_dir("eval.root", root, "set eval.root (or ALIGNLAB_BENCHMARKS) to the folder holding "
                                          "<benchmark>/test.jsonl")
    for name in names:
        fix = f"put {name}/test.jsonl under eval.root, point eval.root elsewhere, or drop {name} from eval.benchmarks"
        try:
            path = benchmark_path(name, root)
        except FileNotFoundError:
            raise bad_path(f"eval.benchmarks[{name}]", root / name / "test.jsonl", "no such file", fix) from None
        read_rows(f"eval.benchmarks[{name}]", path, lambda p, n=name: load_benchmark(n, root, strict=strict), fix)


# ------------------------------------------------------------------------------------------------ hostfile
def read_hostfile(key: str, path: str | Path) -> dict[str, int]:
    """DeepSpeed's hostfile: ``host slots=N`` lines, ``#`` comments; an error names ``file:line``."""
    fix = "write one 'hostname slots=N' line per node (see docs/scaling.md)"
    p = require_file(key, path, fix)
    out: dict[str, int] = {}
    for lineno, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        host, _, rest = line.partition(" ")
        slots = rest.strip()
        n = slots[len("slots="):]
        if not slots.startswith("slots=") or not n.isdigit() or int(n) < 1:
            raise bad_path(key, f"{p}:{lineno}", f"bad line {line!r} (want 'host slots=N', N >= 1)", fix)
        if host in out:
            raise bad_path(key, f"{p}:{lineno}", f"host {host!r} listed twice", fix)
        out[host] = int(n)
    if not out:
        raise bad_path(key, p, "lists no hosts (only comments)", fix)
    return out


def require_nvme_dir(key: str, path: str | None) -> Path:
    """The folder DeepSpeed swaps to with ``offload_*.device: nvme``."""
    fix = "set it to a directory on a fast local disk (ZeRO-Infinity swaps tensors there)"
    if not path:
        raise ConfigError(f"{key}: not set, but the offload device is nvme; {fix}")
    return require_dir(key, path, fix)


# ------------------------------------------------------------------------------------------------ model dir
def check_model_dir(directory: str | Path, key: str = "model.path") -> None:
    """A Hugging Face model directory whose weights fit its config.json, checked from file headers only.

    config.json must parse; weights must be safetensors (every shard an index names must exist) with intact
    headers and sizes; tokenizer files must be there; and where transformers can build the architecture on the
    meta device, every tensor the config needs must be in the files with the shape the config implies.
    """
    from alignlab.models import require_safetensors

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
    from alignlab.models import safetensors_header

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
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

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


# ------------------------------------------------------------------------------------------------ run dir
def check_run_dir(cfg: DictConfig, out: Path, explicit: bool) -> None:
    """The directory a run writes to: a directory (not a file); with ``resume=true`` and an explicit dir, one
    that exists; and when it already holds a run, one made with the same results-relevant config (resume=force
    continues it anyway)."""
    key = "out_dir" if cfg.get("out_dir") else "hydra.run.dir"
    if out.exists() and not out.is_dir():
        raise bad_path(key, out, "is a file, expected a run directory", f"choose another {key}")
    if out.exists():
        require_dir(key, out, f"make it readable, or choose another {key}")
    if cfg.resume is True and explicit and not out.exists():
        raise bad_path(key, out, "no such run directory to resume",
                       "check the path, or drop resume=true to start a new run there")
    if cfg.resume == "force" or not out.is_dir():
        return
    if not any(out.glob("round_*")) and not (out / "base_eval.json").exists():
        return  # nothing computed yet: whatever config the dir was started with, nothing would be mixed
    saved_path = out / ".hydra" / "config.yaml"
    if not saved_path.exists():
        return  # artifacts prepared by a script (experiments/sage) without a saved config: nothing to compare
    fix = "pass resume=force to continue it anyway"
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=False)
    except Exception as e:  # noqa: BLE001 - any YAML or I/O failure
        raise bad_path("resume", saved_path, f"saved config cannot be read ({type(e).__name__})", fix) from None
    if not isinstance(saved, dict):
        raise bad_path("resume", saved_path, "saved config is not a mapping", fix)
    now = OmegaConf.to_container(cfg, resolve=False)
    now.pop("hydra", None)
    diff = config_diff(saved, now)
    if diff:
        shown = ", ".join(f"{k}: {a} -> {b}" for k, a, b in diff[:6]) + (f" (+{len(diff) - 6} more)"
                                                                           if len(diff) > 6 else "")
        raise ConfigError(f"resume: {out} holds a run made with another config ({shown}); rerun with its "
                          f"config, choose a new hydra.run.dir, or {fix}")


def _flat(x: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(x, dict):
        out: dict[str, Any] = {}
        for k, v in x.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: x}


def config_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every results-relevant key that differs (dotted keys; a key
    present on one side only shows ``<unset>`` on the other)."""
    a, b = _flat(saved), _flat(now)
    out = []
    for k in sorted(a.keys() | b.keys()):
        if any(k == n or k.startswith(n + ".") for n in RESULT_NEUTRAL):
            continue
        va, vb = a.get(k, "<unset>"), b.get(k, "<unset>")
        if va != vb:
            out.append((k, va, vb))
    return out


# ------------------------------------------------------------------------------------------------ whole run
def check_inputs(comps: dict[str, Any]) -> None:
    """Checks that need more than one component: the model directory, and the held-out set the evaluator
    reads from the data group (``data=gsm8k`` with your own ``data.path`` must name one)."""
    check_model_dir(comps["model"].directory)
    check_heldout = getattr(comps["data"], "check_heldout", None)
    if check_heldout is not None and getattr(comps["eval"], "uses_data_heldout", False):
        check_heldout()


def precheck(config_name: str, overrides: list[str], groups: Sequence[str] = ()) -> None:
    """Compose the config as Hydra will and run every check, before Hydra writes anything.

    Raises ConfigError for bad input; returns quietly when the arguments are for Hydra itself (flags,
    ``--multirun``) or do not compose (Hydra then reports that in its own words). ``groups``: the groups an
    ``alignlab eval`` job builds; empty for a run (all of them, as ``runner.build_components``).
    """
    if any(a.startswith("-") for a in overrides):
        return
    from hydra import compose, initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from alignlab.cli import CONF_DIR

    GlobalHydra.instance().clear()
    try:
        with (initialize_config_module(CONF_DIR[len("pkg://"):], version_base=None) if CONF_DIR.startswith("pkg://")
              else initialize_config_dir(config_dir=CONF_DIR, version_base=None)):
            full = compose(config_name, overrides=overrides, return_hydra_config=True)
    except Exception:  # noqa: BLE001 - composition errors are Hydra's to report
        return
    finally:
        GlobalHydra.instance().clear()
    if str(full.hydra.mode).endswith("MULTIRUN"):
        return  # each job of a sweep is checked when it starts
    HydraConfig.instance().set_config(full)  # ${hydra:runtime.cwd} in data/eval paths
    try:
        _check_composed(full, overrides, groups)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - not bad input: the job meets it again and reports it with context
        log.debug("precheck: %s: %s", type(e).__name__, e)


def _check_composed(full: DictConfig, overrides: list[str], groups: Sequence[str]) -> None:
    from alignlab import config as C

    choices = C.choices_of(full.hydra)
    cfg = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
    if groups:
        for g in groups:
            C.validate_node(g, cfg[g], choices)
        comps = {g: C.build(g, cfg[g], choices) for g in groups}
        try:
            comps["model"].check_exists()  # a hub id: its cached copy, a download, or the offline error saying how
        except FileNotFoundError as e:
            raise ConfigError(str(e) if str(e).startswith("model.path") else f"model.path: {e}") from None
        check_model_dir(comps["model"].directory)
        return
    if cfg.get("stage") is not None:
        return
    from alignlab.runner import build_components, resolve_out_dir

    build_components(cfg, choices)
    explicit = any(o.split("=", 1)[0].lstrip("+~") == "hydra.run.dir" for o in overrides) or bool(cfg.out_dir)
    run_dir = Path(str(full.hydra.run.dir))
    if not explicit and run_dir.exists():
        return  # Hydra's timestamped dir exists already (same second): the job checks where it resumes itself
    out = resolve_out_dir(cfg, str(run_dir), explicit=explicit)
    check_run_dir(cfg, out, explicit)
    probe(out, force=cfg.resume == "force")  # another live writer: refused before Hydra writes its log there
