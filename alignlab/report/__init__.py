"""`alignlab report`: turn a pile of run directories into tables and plots.

Every run writes ``summary.json`` (contract in README.md, "What a run writes") next to Hydra's ``.hydra/``. The steps are separate
modules: ``discovery`` finds runs below any number of directories and marks the ones that failed or are
malformed; ``aggregate`` groups runs by what was overridden (ignoring ``seed`` and ``hydra.*``) and averages over
seeds with pandas; ``paired`` adds differences to a baseline over shared seeds with confidence intervals;
``render`` writes ``report.md`` and ``report.csv``; ``plots`` the PNGs; ``cli`` is the command. Runs that failed
or stopped early are listed, never averaged in and never fatal.

The names below are the package's Python API (docs/report.md, "From Python").
"""

from alignlab.report.aggregate import ConfigStats, Stat, aggregate, mean_se, short_labels
from alignlab.report.cli import main
from alignlab.report.discovery import Run, load_runs

__all__ = ["ConfigStats", "Run", "Stat", "aggregate", "load_runs", "main", "mean_se", "short_labels"]
