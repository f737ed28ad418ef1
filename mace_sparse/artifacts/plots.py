"""PNG figures of the report (matplotlib, Agg backend: works without a display, e.g. on a cluster node).

* ``layers.png``   bar chart: % of entries changed per adapted layer, coloured by weight kind;
* ``paths.png``    heatmap: % changed per irrep path (rows: layers, columns: path index within the layer);
* ``elements.png`` heatmap: % changed per chemical element of every element-dependent weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from .atomic import PathLike, atomic_write_with

KIND_COLOURS = {"linear": "tab:blue", "skip_tp": "tab:orange", "contraction": "tab:green", "radial": "tab:red",
                "norm": "tab:purple", "scalar": "tab:brown", "embedding": "tab:pink"}


def _pyplot():
    # here, not at module level: only ``--plot`` needs matplotlib (~0.4 s), and the Agg backend must be chosen
    # before pyplot is imported
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def _top(grid: np.ndarray) -> float:
    """Colour scale up to the largest value (a sparse delta changes a few %: a 0-100 scale would be all dark)."""
    finite = grid[np.isfinite(grid)]
    return float(max(finite.max(), 1e-9)) if finite.size else 1.0


def plot_layers(data: Dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    layers = data["layers"]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(layers) + 1.5))
    y = np.arange(len(layers))
    ax.barh(y, [l["percent_changed"] for l in layers],
            color=[KIND_COLOURS.get(l["kind"], "tab:gray") for l in layers])
    ax.set_yticks(y, [l["name"] for l in layers], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% of entries changed")
    ax.set_title(
        f"Changed entries per layer (sparsity over all parameters "
        f"{100 * data['sparsity_over_all_parameters']:.1f} %)", fontsize=9
    )
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLOURS.values()]
    ax.legend(handles, list(KIND_COLOURS), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_paths(data: Dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    names: List[str] = [l["name"] for l in data["layers"]]
    width = max((p["path"] + 1 for p in data["paths"]), default=1)
    grid = np.full((len(names), width), np.nan)
    row_of = {name: i for i, name in enumerate(names)}
    for p in data["paths"]:
        grid[row_of[p["layer"]], p["path"]] = p["percent_changed"]
    fig, ax = plt.subplots(figsize=(0.35 * width + 4, 0.3 * len(names) + 1.5))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=0, vmax=_top(grid))
    ax.set_yticks(np.arange(len(names)), names, fontsize=7)
    ax.set_xlabel("irrep path (instruction / coupling) index within the layer")
    ax.set_title("% of entries changed per irrep path (blank: no such path)", fontsize=9)
    fig.colorbar(image, ax=ax, label="% changed")
    return _save(fig, path)


def plot_elements(data: Dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    symbols = data["element_symbols"]
    names = list(dict.fromkeys(e["layer"] for e in data["elements_per_layer"]))
    grid = np.zeros((len(names), len(symbols)))
    for e in data["elements_per_layer"]:
        grid[names.index(e["layer"]), symbols.index(e["element"])] = e["percent_changed"]
    fig, ax = plt.subplots(figsize=(0.6 * len(symbols) + 5, 0.35 * len(names) + 1.5))
    top = _top(grid)
    image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=top)
    ax.set_xticks(np.arange(len(symbols)), symbols)
    ax.set_yticks(np.arange(len(names)), names, fontsize=7)
    if grid.size <= 400:
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=6,
                    color="white" if value < 0.6 * top else "black")
    ax.set_title("% of entries changed per chemical element", fontsize=9)
    fig.colorbar(image, ax=ax, label="% changed")
    return _save(fig, path)


def write_plots(data: Dict[str, Any], directory: PathLike) -> List[Path]:
    """Write the report's figures into ``directory``; returns the paths written."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_layers(data, out / "layers.png"), plot_paths(data, out / "paths.png")]
    if data["elements_per_layer"]:
        written.append(plot_elements(data, out / "elements.png"))
    return written
