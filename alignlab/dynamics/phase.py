"""Phase diagrams (PNG) of oscillation strength and final entropy over (alpha, beta) panels, one panel per lam.

Two sources, same plots:
    python -m alignlab.dynamics.phase multirun/dynamics/<time> --out figs --name cycle   # Hydra multirun dir
    python -m alignlab.dynamics.phase --grid --alphas 0:1:21 --betas 0:10:41 --lams 0.5,1 --out figs --name cycle \
        -- dynamics/matrix=cyclic method=ipo                                             # in-process grid
Stated thresholds are drawn on top: the 3-cycle curve alpha^2 + a^2 beta^2 lam^2 / 3 = 1 (solid; DPO: derived
version, dashed-dotted) and the contraction bound alpha + beta lam ||P - 1/2||_2 / 2 = 1 (dashed).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from alignlab.dynamics import theory
from alignlab.dynamics.matrices import skew_norm
from alignlab.dynamics.run import run_grid
from alignlab.records import atomic_write_text

Array = np.ndarray
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
METRICS = ("oscillation", "final_entropy")


def load_results(root: str | Path) -> list[dict[str, Any]]:
    """Every result.json under a (multi)run directory."""
    return [json.loads(p.read_text()) for p in sorted(Path(root).rglob("result.json"))]


def grid_from_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Arrange per-job results on the (alpha, beta, lam) grid they span; missing cells are NaN."""
    if not results:
        raise ValueError("no result.json files found")
    axes = {k: sorted({r["params"][k] for r in results}) for k in ("alpha", "beta", "lam")}
    shape = tuple(len(v) for v in axes.values())
    grid: dict[str, Any] = {m: np.full(shape, np.nan) for m in (*METRICS, "mean_entropy_tail", "min_prob_tail", "tail_movement")}
    for r in results:
        idx = tuple(axes[k].index(r["params"][k]) for k in axes)
        for m in grid:
            grid[m][idx] = r["metrics"][m]
    grid.update(alphas=np.array(axes["alpha"]), betas=np.array(axes["beta"]), lams=np.array(axes["lam"]),
                P=np.array(results[0]["P"]), config=results[0]["config"])
    return grid


def parse_values(spec: str) -> Array:
    """'0:1:5' -> linspace(0, 1, 5); '0,0.5,1' -> those values."""
    if ":" in spec:
        lo, hi, n = spec.split(":")
        return np.linspace(float(lo), float(hi), int(n))
    return np.array([float(x) for x in spec.split(",")])


def compose_config(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """conf/dynamics.yaml plus overrides, as a plain dict (Hydra compose API, no run dir)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="dynamics", overrides=list(overrides))
    plain = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=False))  # a DictConfig becomes a dict
    plain.pop("hydra", None)
    return plain


def _overlays(ax: Any, cfg: dict[str, Any], P: Array, betas: Array, lam: float) -> None:
    b = np.linspace(betas.min(), betas.max(), 400)
    if cfg["matrix"]["kind"] == "cyclic" and lam > 0 and cfg.get("method", "ipo") == "ipo":
        b = np.sort(np.append(b, np.sqrt(3.0) / (float(cfg["matrix"]["a"]) * lam)))  # curve reaches alpha = 0
    method = cfg.get("method", "ipo")
    if cfg["matrix"]["kind"] == "cyclic" and int(cfg["K"]) == 3 and lam > 0:
        a = float(cfg["matrix"]["a"])
        if method == "ipo":
            x = (a * b * lam) ** 2 / 3.0
            ax.plot(b[x <= 1], np.sqrt(1 - x[x <= 1]), "w-", lw=2, label="stated: α²+a²β²λ²/3=1")
        else:
            be = theory.dpo_cycle_effective_beta(np.where(b > 0, b, np.nan), cfg.get("dpo_scale", "inverse"))
            x = (a * be * lam) ** 2 / 3.0
            ok = x <= 1
            ax.plot(b[ok], np.sqrt(1 - x[ok]), "w-.", lw=2, label="derived DPO: β_eff=4/β")
    if method == "ipo":
        al = 1 - 0.5 * b * lam * skew_norm(P)
        ok = al >= 0
        ax.plot(b[ok], al[ok], "w--", lw=1.5, label="contraction bound = 1")


def plot_phase(grid: dict[str, Any], metric: str, path: str | Path, title: str = "", cfg: dict[str, Any] | None = None,
               floor: float = 1e-10) -> Path:
    """One PNG: a panel per lam, x = beta, y = alpha, colour = metric (oscillation on a log10 scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = cfg if cfg is not None else grid.get("config")
    alphas, betas, lams = grid["alphas"], grid["betas"], grid["lams"]
    vals = np.asarray(grid[metric], dtype=float)
    if metric == "oscillation":
        vals = np.log10(np.maximum(vals, floor))
        vmin, vmax, label, cmap = np.log10(floor), max(-1.0, np.nanmax(vals)), "log10 oscillation strength", "magma"
    else:
        vmin, vmax, label, cmap = 0.0, np.log(grid["P"].shape[0]), "final entropy (nats)", "viridis"
    fig, axes = plt.subplots(1, len(lams), figsize=(4.2 * len(lams) + 1.2, 3.8), squeeze=False, constrained_layout=True)
    for j, lam in enumerate(lams):
        ax = axes[0, j]
        im = ax.pcolormesh(betas, alphas, vals[:, :, j], shading="nearest", vmin=vmin, vmax=vmax, cmap=cmap)
        if cfg is not None:
            _overlays(ax, cfg, grid["P"], betas, float(lam))
        ax.set_xlim(betas.min(), betas.max())
        ax.set_ylim(alphas.min(), alphas.max())
        ax.set_xlabel("β")
        ax.set_ylabel("α")
        ax.set_title(f"λ = {lam:g}")
        if j == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower left", fontsize=7, framealpha=0.5)
    fig.colorbar(im, ax=axes[0, :].tolist(), label=label)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_grid_json(grid: dict[str, Any], path: str | Path) -> Path:
    """The grid's numbers next to its figures."""
    keep = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in grid.items()}
    path = Path(path)
    atomic_write_text(path, json.dumps(keep))
    return path


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """CLI: phase diagrams from a multirun dir or from an in-process grid."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("multirun", nargs="?", help="Hydra multirun dir with */result.json")
    ap.add_argument("--grid", action="store_true", help="simulate the grid in-process instead")
    ap.add_argument("--alphas", default="0:1:11")
    ap.add_argument("--betas", default="0:10:21")
    ap.add_argument("--lams", default="0.5,1")
    ap.add_argument("--out", default="phase")
    ap.add_argument("--name", default="phase")
    ap.add_argument("--title", default="")
    ap.add_argument("overrides", nargs="*", help="config overrides for --grid (after --)")
    args = ap.parse_args(argv)
    if args.grid:
        cfg = compose_config(args.overrides)
        grid = run_grid(cfg, parse_values(args.alphas), parse_values(args.betas), parse_values(args.lams))
        grid["config"] = cfg
    elif args.multirun:
        grid = grid_from_results(load_results(args.multirun))
        cfg = grid["config"]
    else:
        ap.error("give a multirun dir or --grid")
    out = Path(args.out)
    paths = [plot_phase(grid, m, out / f"{args.name}_{m}.png", args.title or f"{cfg['method'].upper()} "
                        f"{cfg['variant']} · {cfg['matrix']['kind']} K={cfg['K']}", cfg) for m in METRICS]
    paths.append(save_grid_json({k: v for k, v in grid.items() if k != "config"} | {"config": cfg},
                                out / f"{args.name}_grid.json"))
    for p in paths:
        print(p)
    return paths


if __name__ == "__main__":
    main()
