"""A trainer callback that counts the pairs a round actually trained on: instances and distinct pairs.

Arms that filter per step (SAGE, per-step Random) re-select in every batch and epoch, so the same number of trained
pair instances can cover more or fewer distinct pairs than a fixed subset; a comparison reports both.
"""

from __future__ import annotations

from alignlab.train.callbacks import TrainerCallback, TrainState


class TrainedPairs(TrainerCallback):
    """Runs after every filter (last in the list): sees the pairs each micro-batch trains."""

    def on_train_begin(self, state: TrainState) -> None:
        self.seen: set[int] = set()
        self.total = 0

    def on_batch(self, state: TrainState, idx: list[int]) -> list[int]:
        self.seen.update(int(i) for i in idx)
        self.total += len(idx)
        return idx

    def on_train_end(self, state: TrainState, history: list[dict[str, float]]) -> dict[str, float]:
        return {"trained_pairs_distinct": len(self.seen), "trained_pair_instances": self.total}
