"""Model loading (the ``model`` config group): any Hugging Face causal-LM directory.

The embedded tiny model and Qwen2.5 go through the very same code: ``from_pretrained`` on a
directory, the tokenizer's chat template for prompts, safetensors only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignlab import hub
from alignlab.records import DiskFull, is_disk_full

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    """``$ALIGNLAB_CACHE``, else ``~/.cache/alignlab``: downloaded and converted models, never in the repo."""
    return Path(os.environ.get("ALIGNLAB_CACHE") or Path.home() / ".cache" / "alignlab").expanduser()


def resolve_path(path: str) -> Path:
    """``pkg://x`` means a path inside the installed alignlab package (the embedded checkpoint); ``cache://x`` one
    inside alignlab's model cache (``$ALIGNLAB_CACHE``, else ``~/.cache/alignlab``: converted real models)."""
    if path.startswith("pkg://"):
        return PACKAGE_ROOT / path[len("pkg://"):]
    if path.startswith("cache://"):
        return cache_root() / path[len("cache://"):]
    if hub.is_hub_id(path):  # org/name: its snapshot in the Hugging Face cache (ModelSpec.check_exists fetches it)
        return hub.cached_model_dir(path) or Path(path)
    return Path(path).expanduser()


def fill(template: str, **fields: str) -> str:
    """Put ``fields`` into their ``{name}`` slots; every other brace stays literal (``\\boxed{}`` in a prompt)."""
    for k in fields:
        template = template.replace("{" + k + "}", "\x00" + k + "\x00")
    for k, v in fields.items():  # two passes: a problem that contains "{answer}" is not filled in
        template = template.replace("\x00" + k + "\x00", v)
    return template


@dataclass
class ModelSpec:
    """``model``: where the weights live and how a problem becomes a chat prompt."""

    path: str
    name: str = ""
    system_prompt: str | None = None
    prompt_template: str = "{problem}"
    refine_template: str = ("{problem}\nPrevious attempt:\n{attempt}\nThe correct final answer is {answer}. "
                            "Write a corrected solution.")
    dtype: str = "float32"
    max_prompt_tokens: int = 1000
    # How long this model's answers run: generation.max_new_tokens defaults to it (conf/generation/*.yaml), so a
    # real model is never cut at the embedded task's short default.
    max_new_tokens: int = 1024
    # End-of-turn tokens besides the tokenizer's eos (the generator also finds the chat template's own).
    stop_tokens: list[str] | None = None
    # The learning rate DPO was tuned at for this model: set once here, experiments refer to it as
    # ${oc.select:model.dpo_lr,1.0e-4} (the trainer never reads it by itself: a preset that does not refer to it
    # keeps its own rate).
    dpo_lr: float | None = None
    # A chat template (Jinja) that replaces the tokenizer's: a path to a .jinja/.j2 file or the template itself, so
    # a base model without a template can be prompted. null: the tokenizer's own.
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if "{problem}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{problem}'")
        for key in ("max_prompt_tokens", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        self._template = read_chat_template(self.chat_template)

    @property
    def directory(self) -> Path:
        return resolve_path(self.path)

    def check_exists(self) -> None:
        if hub.is_hub_id(self.path):
            try:
                hub.fetch_model(self.path)  # the hub only for a hub id; offline, a cached copy or a fast error
            except (hub.HubUnavailable, hub.CorruptDownload) as e:
                raise FileNotFoundError(str(e)) from None
        d = self.directory
        if not (d / "config.json").exists():
            hint = (" (run `make smollm2` to download and convert it)" if self.path.startswith("cache://") else
                    f". If it is a hub model, download it: `huggingface-cli download <org/name> --local-dir {d}`, "
                    f"or set model.path=<org/name> to fetch it from the hub")
            raise FileNotFoundError(f"model.path: no Hugging Face model directory at {d} (config.json missing){hint}")
        require_safetensors(d)

    def messages(self, content: str, turns: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        """The chat for one prompt: ``content`` as the user turn after this model's system prompt (if any); with
        ``turns`` (a data row's own chat, e.g. verl's system + user turns), those turns up to the last user turn,
        whose content becomes ``content``, and this model's system prompt only where the row has none."""
        if not turns:
            msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            return msgs + [{"role": "user", "content": content}]
        last = max(i for i, m in enumerate(turns) if m.get("role") == "user")
        msgs = [{"role": m["role"], "content": m["content"]} for m in turns[:last]]
        if self.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs + [{"role": "user", "content": content}]

    def render(self, tokenizer, problem: str, turns: list[dict[str, str]] | None = None) -> str:
        """The full prompt text (chat template + generation prompt) for one problem (``turns``: its own chat)."""
        content = fill(self.prompt_template, problem=problem)
        return self.apply_template(tokenizer, self.messages(content, turns))

    def render_refine(self, tokenizer, problem: str, attempt: str, answer: str,
                      turns: list[dict[str, str]] | None = None) -> str:
        """The refinement prompt for one failed attempt (``turns``: the problem's own chat)."""
        content = fill(self.refine_template, problem=problem, attempt=attempt, answer=answer)
        return self.apply_template(tokenizer, self.messages(content, turns))

    def apply_template(self, tokenizer, messages: list[dict[str, str]]) -> str:
        """``messages`` as prompt text with the generation prompt: ``chat_template`` if set, else the tokenizer's."""
        kw = {"chat_template": self._template} if self._template else {}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def read_chat_template(value: str | None) -> str | None:
    """``model.chat_template``'s Jinja text: the file's content for a path ending .jinja/.j2 (or naming an existing
    file), else the value itself; None stays None."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"chat_template: a .jinja file path or a Jinja template string, got {value!r}")
    path = Path(value).expanduser()
    if value.endswith((".jinja", ".j2")) or ("{" not in value and path.is_file()):
        if not path.is_file():
            raise ValueError(f"chat_template: no such file {path}")
        return path.read_text(encoding="utf-8")
    return value


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_path(str(path))))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def require_safetensors(path: str | Path) -> None:
    """Refuse a local model directory without safetensors weights (pickle checkpoints can run code on load)."""
    d = Path(path)
    if d.is_dir() and not any(d.glob("*.safetensors")):
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        found = f" (found {', '.join(pickles)}: pickle checkpoints are refused)" if pickles else ""
        raise FileNotFoundError(f"{d}: no *.safetensors weights{found}; alignlab loads safetensors only. Convert "
                                f"with model.save_pretrained and safe_serialization=True in a trusted environment.")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
               attn_implementation: str | None = None):
    """Load a causal LM from a directory; safetensors only (no pickle). ``attn_implementation``: transformers'
    (``eager``, ``sdpa``, ``flash_attention_2``); None: its default for the model."""
    from transformers import AutoModelForCausalLM

    require_safetensors(resolve_path(str(path)))
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model: Any = AutoModelForCausalLM.from_pretrained(str(resolve_path(str(path))), dtype=dtype, use_safetensors=True,
                                                      **kw)
    return model.to(device)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def checkpoint_params(path: str | Path) -> int:
    """Parameter count from the checkpoint's safetensors headers (tensor shapes), without loading any weight:
    the runner needs it for the ledger and must not hold a model the trainer holds. Tied weights are stored
    once, so this equals ``count_params`` of the loaded model."""
    import math

    total = 0
    for f in sorted(set(safetensors_files(resolve_path(str(path))).values())):
        _, header = safetensors_header(f)
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def safetensors_header(f: str | Path, max_len: int = 100 << 20) -> tuple[int, Any]:
    """(header length, parsed JSON header) of a safetensors file, read without touching any tensor.

    Raises ``ValueError("bad header length")`` when the 8-byte length is missing, zero, longer than the file or
    than ``max_len``; json/unicode decode errors and OSError pass through for the caller to name."""
    import json
    import struct

    size = Path(f).stat().st_size
    with open(f, "rb") as fh:
        raw = fh.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if n <= 0 or n > min(size - 8, max_len):
            raise ValueError("bad header length")
        return n, json.loads(fh.read(n))


def safetensors_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file, for a Hugging Face model directory saved as one ``model.safetensors`` or as shards
    listed in ``model.safetensors.index.json`` (how 7B checkpoints are saved)."""
    import json

    from safetensors import safe_open

    single = model_dir / "model.safetensors"
    if single.exists():
        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}  # noqa: SIM118 - safe_open handles are not mappings
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / name for k, name in weight_map.items()}
    raise FileNotFoundError(
        f"{model_dir}: neither model.safetensors nor model.safetensors.index.json (the EMA reference averages "
        "safetensors weights; re-save the model with save_pretrained and safe_serialization=True)"
    )


_TURN_MARKER = "ALIGNLAB_END_OF_TURN_PROBE"


def end_of_turn_ids(tokenizer) -> set[int]:
    """The special token the chat template writes right after an assistant message (``<|im_end|>`` for ChatML).

    A model trained on its template ends a turn with it, whatever the tokenizer's ``eos_token`` says (SmolLM2's
    upstream tokenizer, for one, names ``<|endoftext|>``), so generation must stop there too.
    """
    msgs = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": _TURN_MARKER}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception:  # noqa: BLE001 - no chat template, or one that refuses this conversation
        return set()
    i = text.find(_TURN_MARKER)
    if i < 0:
        return set()
    after = tokenizer(text[i + len(_TURN_MARKER):], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {k for k, t in tokenizer.added_tokens_decoder.items() if t.special}
    return {after[0]} if after and after[0] in special else set()


def checkpoint_key(model_dir: str | Path) -> str:
    """Cheap identity of a checkpoint (path, config, weight file sizes and mtimes)."""
    d = Path(model_dir)
    parts = [str(d.resolve())]
    for f in sorted(d.glob("*")):
        if f.suffix in (".json", ".safetensors"):
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


ADAPTER_DIR = "adapter"  # a LoRA round's adapter, inside its (merged) checkpoint directory


def is_lora(model: Any) -> bool:
    """True for a peft model carrying adapters (what :func:`apply_lora` returns)."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def save_checkpoint(model, tok, out: str | Path, source_dir: str | Path | None = None,
                    state_dict: dict | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write a Hugging Face directory atomically: into ``<out>.tmp``, then renamed over ``out``.

    ``alignlab_model.json`` (which model config the weights go with) is carried over from ``source_dir``, so
    ``alignlab eval`` prompts the checkpoint as the run did; ``extra_files`` (name -> text) are written beside
    the weights (they win over the carried file). ``state_dict``: weights gathered elsewhere (ZeRO-3). A LoRA
    model (:func:`apply_lora`) is written merged (``W + (alpha/r) B A``: a plain HF directory that generation,
    vLLM and ``alignlab eval`` load as any other), its adapter in the ``adapter/`` subdirectory; ``model`` is
    merged in place.
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        def writes(model: Any):  # lazily: a LoRA adapter is saved, then merged, before the weights are
            if is_lora(model):
                yield model, tmp / ADAPTER_DIR, {}  # adapter_config.json + adapter_model.safetensors
                model = model.merge_and_unload()
            yield model, tmp, {"safe_serialization": True, "state_dict": state_dict}
            yield tok, tmp, {}

        for obj, where, kw in writes(model):
            obj.save_pretrained(where, **kw)  # adapter (LoRA), weights (safetensors), tokenizer
        meta = resolve_path(str(source_dir)) / "alignlab_model.json" if source_dir else None
        if meta is not None and meta.exists():
            shutil.copy(meta, tmp / meta.name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    except Exception as e:
        if not is_disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint (if any) is untouched
        raise DiskFull(tmp) from e
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
