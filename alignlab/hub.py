"""The Hugging Face hub, used only when a hub id is asked for, and failing in seconds when it cannot be reached.

A ``path`` that names an existing local file or directory is always local. Anything else of the form
``org/name`` (``openai/gsm8k``, ``Qwen/Qwen2.5-1.5B-Instruct``) is a hub id. Before any hub call, one short
HTTP probe of the endpoint decides whether the hub is reachable, so an offline machine gets an error naming the
offline alternative instead of minutes of retries. ``HF_HUB_OFFLINE=1`` skips the probe and reads the local
cache only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger("alignlab")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")  # a cached LFS blob's name: the file's sha256 (the hub's etag)
GIT_SHA1 = re.compile(r"^[0-9a-f]{40}$")  # a cached regular file's blob name: its git blob sha1
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


class CorruptDownload(ValueError):
    """A file of a hub download is truncated or corrupt (an interrupted download); it was removed from the cache."""


_VERIFIED: dict[tuple[str, int, int], None] = {}  # blobs whose digest matched, by (path, size, mtime_ns)


def _git_sha1(path: Path, size: int) -> str:
    h = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_of(path: Path) -> str:
    """A file's sha256, read in 1 MiB blocks (hub blobs, the SmolLM2 wheel and gguf)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_problem(path: Path) -> str | None:
    """Why ``path`` does not parse as its kind (a ``.safetensors`` whose header or size is cut short, ``.json``
    that is not JSON), or None; other kinds are not parsed."""
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"safetensors header of {n} bytes in a {size}-byte file"
            try:
                header = json.loads(f.read(n))
            except ValueError:
                return "safetensors header is not JSON"
        end = max((int(v["data_offsets"][1]) for k, v in header.items()
                   if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
        if size != 8 + n + end:
            return f"{size} bytes where the safetensors header describes {8 + n + end}"
    elif path.suffix == ".json":
        try:
            json.loads(path.read_bytes())
        except ValueError as e:
            return f"not valid JSON ({e})"
    return None


def file_problem(path: Path, expected_size: int | None = None) -> str | None:
    """Why the snapshot file ``path`` is not what the hub served, or None. A file in the hub cache links to
    ``blobs/<etag>``: its sha256 for LFS files, its git blob sha1 otherwise, so every cached file has a digest
    (checked once per blob and modification time). ``expected_size`` comes from the cached tree listing."""
    blob = path.resolve()
    if not blob.is_file():
        return "missing (a dangling link into the cache's blobs)"
    st = blob.stat()
    if expected_size is not None and st.st_size != expected_size:
        return f"{st.st_size} bytes where the hub lists {expected_size}"
    problem = parse_problem(path)  # by the snapshot name's suffix; the open follows the link to the blob
    if problem is not None:
        return problem
    key = (str(blob), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED or blob.parent.name != "blobs":
        return None
    if SHA256.match(blob.name):
        got, kind = sha256_of(blob), "sha256"
    elif GIT_SHA1.match(blob.name):
        got, kind = _git_sha1(blob, st.st_size), "git sha1"
    else:
        return None
    if got != blob.name:
        return f"{kind} {got[:12]}... is not the hub's {blob.name[:12]}..."
    _VERIFIED[key] = None
    return None


def _expected_sizes(repo_id: str, repo_type: str, snapshot: Path) -> dict[str, int]:
    """File sizes from the tree listing huggingface_hub caches with a snapshot download ({} when none)."""
    from huggingface_hub import get_cached_repo_tree

    try:
        files = get_cached_repo_tree(repo_id, repo_type=repo_type, revision=snapshot.name,
                                     cache_dir=snapshot.parent.parent.parent)
    except Exception:  # noqa: BLE001 - no listing cached (older downloads): digests and parses still apply
        return {}
    return {f.path: int(f.size) for f in files if getattr(f, "size", None) is not None}


def verify_snapshot(snapshot: Path, repo_id: str, what: str, repo_type: str = "model") -> None:
    """Check every file of a cached hub snapshot (size, digest, parse); remove each bad one from the cache (its
    link and blob, so the next download fetches it again) and raise :class:`CorruptDownload` naming them."""
    sizes = _expected_sizes(repo_id, repo_type, snapshot)
    bad = []
    for p in sorted(snapshot.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            continue
        rel = p.relative_to(snapshot).as_posix()
        problem = file_problem(p, sizes.get(rel))
        if problem is not None:
            bad.append(f"{rel}: {problem}")
            blob = p.resolve()
            p.unlink(missing_ok=True)
            if blob != p and blob.parent.name == "blobs":
                blob.unlink(missing_ok=True)
    if bad:
        raise CorruptDownload(f"{what}={repo_id}: the cached download is truncated or corrupt (an interrupted "
                              f"download), and was removed from the cache: {'; '.join(bad)}")


def cached_snapshot(repo_id: str, repo_type: str = "model") -> Path | None:
    """The snapshot directory ``refs/main`` points to in the local hub cache, or None (no network)."""
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    ref = root / "refs" / "main"
    if not ref.is_file():
        return None
    snap = root / "snapshots" / ref.read_text().strip()
    return snap if snap.is_dir() else None


def verify_cached(repo_id: str, what: str, repo_type: str = "model") -> Path | None:
    """:func:`verify_snapshot` on the cached snapshot of ``repo_id``; the snapshot if it is there and whole, else
    None. Offline a bad file is an error; online it is removed and fetched again by the download that follows."""
    snap = cached_snapshot(repo_id, repo_type)
    if snap is None:
        return None
    try:
        verify_snapshot(snap, repo_id, what, repo_type)
    except CorruptDownload as e:
        if offline():
            raise CorruptDownload(f"{e}. Offline (HF_HUB_OFFLINE is set) it cannot be fetched again: rerun with "
                                  f"network, or {download_hint(repo_id)}") from None
        log.warning("%s; downloading it again", e)
        return None
    return snap


def cached_model_dir(repo_id: str) -> Path | None:
    """The local-cache snapshot of hub model ``repo_id``, or None; reads the cache only (no network)."""
    from huggingface_hub import snapshot_download

    try:
        d = Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss (not cached, partial, bad id) means "not here"
        return None
    return d if (d / "config.json").exists() else None


def fetch_model(repo_id: str) -> Path:
    """The local snapshot of hub model ``repo_id``, downloaded (config, tokenizer, safetensors) if not cached,
    every file verified (:func:`verify_snapshot`): an interrupted download is fetched again, never used."""
    verify_cached(repo_id, "model.path")
    cached = cached_model_dir(repo_id)
    if cached is not None:
        return cached
    if offline():
        raise HubUnavailable(f"model.path={repo_id}: no such local directory, and as a Hugging Face hub id it is not "
                             f"in the local cache (HF_HUB_OFFLINE is set). {download_hint(repo_id)}")
    require_hub("model.path", repo_id, download_hint(repo_id))
    from huggingface_hub import snapshot_download

    snap = Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES))
    verify_snapshot(snap, repo_id, "model.path")  # what was just downloaded, once more
    return snap
