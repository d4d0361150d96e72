"""Sampling and reference dynamics lab: tabular MRS-IPO / MRS-DPO over K responses (after
"How Sampling Shapes LLM Alignment: From One-Shot Optima to Iterative Dynamics" (arXiv 2602.12180)).

- ``matrices``: preference matrices (3-cycle, strongly transitive, Bradley-Terry, HelpSteer-like) and classifiers.
- ``oneshot``: closed-form IPO optimum under any sampler, implicit DPO optimum, instance-dependent samplers.
- ``axioms``: Condorcet-top, Smith-top and order-preservation checks.
- ``mrs``: exact and finite-sample MRS rounds (batched over parameter grids), fixed points, Jacobians.
- ``metrics`` / ``theory``: oscillation strength, entropy, distance to the fixed point; stated thresholds.
- ``run`` / ``cli`` / ``phase``: config -> result.json (Hydra), grids and phase-diagram PNGs.
"""

from alignlab.dynamics.axioms import (
    axiom_counterexample,
    check_axioms,
    condorcet_top,
    condorcet_winner,
    majority_order,
    order_preserving,
    smith_set,
    smith_top,
)
from alignlab.dynamics.matrices import (
    bradley_terry,
    cyclic_matrix,
    helpsteer_like,
    is_cyclic,
    is_strongly_transitive,
    make_matrix,
    sample_helpsteer,
    skew_norm,
    strict_top,
    transitive_matrix,
)
from alignlab.dynamics.metrics import entropy, monotone_from, oscillation_strength, summarize, tv_distance
from alignlab.dynamics.mrs import exact_map, fixed_point, mrs_step, simulate, spectral_radius, tangent_jacobian
from alignlab.dynamics.oneshot import (
    condorcet_sampler,
    dpo_optimum,
    dpo_population_loss,
    dpo_solve,
    ipo_optimum,
    ipo_optimum_pairs,
    ipo_population_loss,
    maximal_lottery,
    top_set_sampler,
)
from alignlab.dynamics.theory import contraction_bound, cycle_beta_threshold, cycle_rho, dpo_cycle_rho

__all__ = [
    "axiom_counterexample", "check_axioms", "condorcet_top", "condorcet_winner", "majority_order", "order_preserving",
    "smith_set", "smith_top", "bradley_terry", "cyclic_matrix", "helpsteer_like", "is_cyclic", "is_strongly_transitive",
    "make_matrix", "sample_helpsteer", "skew_norm", "strict_top", "transitive_matrix", "entropy", "monotone_from",
    "oscillation_strength", "summarize", "tv_distance", "condorcet_sampler", "dpo_optimum", "dpo_population_loss",
    "dpo_solve", "ipo_optimum", "ipo_optimum_pairs", "ipo_population_loss", "maximal_lottery", "top_set_sampler",
    "exact_map", "fixed_point", "mrs_step", "simulate", "spectral_radius", "tangent_jacobian", "contraction_bound",
    "cycle_beta_threshold", "cycle_rho", "dpo_cycle_rho",
]
