"""The Hugging Face hub, used only when a hub id is asked for, and failing in seconds when it cannot be reached.

A ``path`` that names an existing local file or directory is always local. Anything else of the form
``org/name`` (``openai/gsm8k``, ``Qwen/Qwen2.5-1.5B-Instruct``) is a hub id. Before any hub call, one short
HTTP probe of the endpoint decides whether the hub is reachable, so an offline machine gets an error naming the
offline alternative instead of minutes of retries. ``HF_HUB_OFFLINE=1`` skips the probe and reads the local
cache only.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PROBE_TIMEOUT_S = 3.0


class HubUnavailable(ValueError):
    """A hub id was asked for, but the hub cannot be reached and the local cache does not have it."""


def is_hub_id(path: str) -> bool:
    """True for ``org/name`` strings that are not an existing local path (and do not look like a file path)."""
    if not isinstance(path, str) or Path(path).expanduser().exists() or path.startswith(("/", ".", "~")):
        return False
    return bool(HUB_ID.match(path)) and Path(path).suffix.lower() not in (".jsonl", ".json", ".parquet", ".csv")


def offline() -> bool:
    """The user asked for offline mode (the hub libraries' own switches)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def reachable(timeout_s: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(reachable, reason): one HEAD request to the hub endpoint; any HTTP answer counts as reachable."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint(), method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return True, ""
    except (OSError, ValueError) as e:
        return False, f"{endpoint()} did not answer within {timeout_s:.0f} s ({getattr(e, 'reason', e)})"
    return True, ""


def require_hub(what: str, hub_id: str, offline_hint: str) -> None:
    """Raise :class:`HubUnavailable` (naming ``offline_hint``) unless the hub answers; no-op in offline mode,
    where the caller reads the local cache and reports a miss itself."""
    if offline():
        return
    ok, reason = reachable()
    if not ok:
        raise HubUnavailable(f"{what}={hub_id}: no such local path, and as a Hugging Face hub id it needs the hub, "
                             f"which is not reachable: {reason}. "
                             f"{offline_hint} (With HF_HUB_OFFLINE=1 a copy already in the local Hugging Face cache "
                             f"is used.)")


MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]  # never pickle weights


def download_hint(repo_id: str) -> str:
    local = f"models/{repo_id.split('/')[-1]}"
    return (f"Download it on a machine with network: `huggingface-cli download {repo_id} --local-dir {local}` "
            f"(or `hf download ...`), then pass model.path={local}.")


def cached_model_dir(repo_id: str) -> Path | None:
    """The local-cache snapshot of hub model ``repo_id``, or None; reads the cache only (no network)."""
    from huggingface_hub import snapshot_download

    try:
        d = Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss (not cached, partial, bad id) means "not here"
        return None
    return d if (d / "config.json").exists() else None


def fetch_model(repo_id: str) -> Path:
    """The local snapshot of hub model ``repo_id``, downloaded (config, tokenizer, safetensors) if not cached."""
    cached = cached_model_dir(repo_id)
    if cached is not None:
        return cached
    if offline():
        raise HubUnavailable(f"model.path={repo_id}: no such local directory, and as a Hugging Face hub id it is not "
                             f"in the local cache (HF_HUB_OFFLINE is set). {download_hint(repo_id)}")
    require_hub("model.path", repo_id, download_hint(repo_id))
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES))
