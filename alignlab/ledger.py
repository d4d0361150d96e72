"""The compute ledger's per-round fields, shared by the runner that writes them and the report that sums them.

README.md, "Compute ledger": every stage adds its cost to a per-round ledger; these are the fields a round's
``ledger`` entry in ``summary.json`` carries (``flops`` and ``wall_s`` as floats, the rest as counts).
"""

LEDGER_KEYS = ("prompts", "samples", "generated_tokens", "trained_tokens", "flops", "wall_s")
