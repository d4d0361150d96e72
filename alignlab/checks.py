"""Path checks, the ground floor: every file or directory a user names is looked at before any expensive work.

Each check raises :class:`~alignlab.config.ConfigError` with one line: the config key, the path, what is
wrong and what to do (``data.path: /x/train.jsonl: no such file; set data.path to ...``). The CLI prints it
and exits with code 2. The checks only read (headers, a first chunk, JSON rows), never load weights.

:mod:`alignlab.precheck` runs them (and the components' own: :mod:`alignlab.models.checks`,
:func:`alignlab.data.benchmarks.check_benchmarks`) before Hydra starts the job, so a rejected start writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from alignlab.config import ConfigError

log = logging.getLogger("alignlab")

HEAD_BYTES = 1 << 16  # how much of a text file is looked at for binary content
# Top-level (or group.key) settings that do not change a run's results: a resumed run may differ in these.
RESULT_NEUTRAL = ("resume", "threads", "out_dir", "rounds", "base_eval", "logger", "extra", "experiment_name",
                  "trainer.log_every", "trainer.keep_workdir", "trainer.threads_per_rank", "trainer.master_port",
                  "trainer.checkpoint_every", "trainer.max_grad_norm_abort", "verifier.workers")


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
    assert isinstance(now, dict)  # a DictConfig's container
    now.pop("hydra", None)
    diff = config_diff({str(k): v for k, v in saved.items()}, {str(k): v for k, v in now.items()})
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
