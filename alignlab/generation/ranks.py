"""Data-parallel generation on the trainer's ranks: the sample and eval stages run where the weights live.

With a trainer that launches ranks (``trainer=deepspeed_*``), the runner wraps its generator in
:class:`RankGenerator`. Each ``generate`` call writes the prompts and the generator's settings to a work dir and
starts ``python -m alignlab.generation.ranks <work>`` on every rank with the trainer's own launcher (torchrun on
one node, the DeepSpeed hostfile launcher on several). Rank r decodes every R-th of the batches one process would
decode (``HFGenerator.generate(shard=(r, R))``), writes them to ``shard<r>.json``, and the runner merges them in
prompt order. A sample's noise depends only on (seed, prompt, sample index) and every batch is the one a single
process would form, so R ranks give the same rollouts as one, byte for byte (on the same hardware and threads).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from alignlab.dist import die_with_parent, write_rank_error
from alignlab.generation import Generator, Sample
from alignlab.records import atomic_write_text
from alignlab.spec import from_spec, packages_of, round_trip

MODULE = "alignlab.generation.ranks"


def shardable(generator: Any) -> bool:
    """Whether ``generator.generate`` takes ``shard=(rank, world)`` (generation=hf does)."""
    try:
        return "shard" in inspect.signature(generator.generate).parameters
    except (TypeError, ValueError):
        return False


class RankGenerator:
    """A :class:`~alignlab.generation.Generator` that runs its inner generator on the trainer's ranks."""

    def __init__(self, inner: Generator, trainer: Any, workroot: str | Path) -> None:
        if not shardable(inner):
            raise ValueError(f"{type(inner).__name__}.generate takes no shard=(rank, world); it cannot run on ranks")
        self.inner, self.trainer, self.workroot = inner, trainer, Path(workroot)
        self.calls = 0

    @property
    def ranks(self) -> int:
        """How many processes compute each call (the ledger's ``ranks``)."""
        return int(self.trainer.world_size())

    def __getattr__(self, name: str) -> Any:  # the inner generator's settings (max_new_tokens, ...)
        return getattr(self.__dict__["inner"], name)

    def release(self) -> None:
        self.inner.release()

    def generate(self, model_dir: str | Path, prompts: list[str], n: int, seed: int,
                 greedy: bool = False) -> list[list[Sample]]:
        if not prompts:
            return []
        self.calls += 1
        job = {"model_dir": str(model_dir), "n": int(n), "seed": int(seed), "greedy": bool(greedy),
               "threads": self.trainer._threads()}
        key = hashlib.sha1((json.dumps(job, sort_keys=True) + json.dumps(prompts)).encode()).hexdigest()[:12]
        work = self.workroot / f"generate-{key}"
        shutil.rmtree(work, ignore_errors=True)  # left by a killed run: shards are cheap to redo
        work.mkdir(parents=True)
        self.inner.release()  # the runner holds no weights; the ranks load them
        # the generator travels as its config (a JSON spec the ranks rebuild it from: alignlab.spec), never a pickle
        job["generator"] = round_trip(self.inner, "generation")
        atomic_write_text(work / "prompts.json", json.dumps(prompts))
        atomic_write_text(work / "job.json", json.dumps(job))
        self.trainer.run_on_ranks(MODULE, work, packages=packages_of(job["generator"]))
        out: list[list[Sample] | None] = [None] * len(prompts)
        for r in range(self.ranks):
            for i, samples in json.loads((work / f"shard{r}.json").read_text()).items():
                out[int(i)] = [Sample(**s) for s in samples]
        missing = [i for i, o in enumerate(out) if o is None]
        if missing:
            raise RuntimeError(f"generation on {self.ranks} ranks returned no samples for {len(missing)} prompts "
                               f"(work dir {work})")
        shutil.rmtree(work, ignore_errors=True)
        return out  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    """One generation rank (started by the launcher with RANK / WORLD_SIZE / LOCAL_RANK set)."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    work = Path(args[0])
    die_with_parent()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        import torch

        job = json.loads((work / "job.json").read_text())
        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        gen = from_spec(job["generator"], f"{work / 'job.json'}: generator")
        if torch.cuda.is_available() and hasattr(gen, "device"):
            gen.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        prompts = json.loads((work / "prompts.json").read_text())
        outs = gen.generate(job["model_dir"], prompts, job["n"], job["seed"], greedy=job["greedy"],
                            shard=(rank, world))
        atomic_write_text(work / f"shard{rank}.json",
                          json.dumps({i: [asdict(s) for s in o] for i, o in enumerate(outs) if o}))
    except Exception as e:  # noqa: BLE001 - reported to the runner, which raises it
        write_rank_error(work, rank, e)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
