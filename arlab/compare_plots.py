"""PNG plots of ``arlab compare`` (from the data of ``compare.json``), with matplotlib's Agg backend:

* ``quality_vs_sampling.png``: each eval metric against sampling images/s, one point per sampling setting
  (mean over the group's runs), one series per group;
* ``quality_vs_compute.png``: each eval metric at the best setting against training FLOPs, one point
  per evaluated checkpoint (``eval/<name>-step<N>.json``);
* ``loss_curves.png``: the training loss (bits per image for a CE) against training FLOPs (steps where
  FLOPs were not recorded).

Written without a time stamp or version in the PNG metadata, so the same data gives the same bytes.
Without matplotlib nothing is drawn and the reason is returned (``compare.md`` says it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from arlab.utils import atomic_write

MAX_PANELS = 6


def _panels(plt, n: int):
    n = max(1, min(n, MAX_PANELS))
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    return fig, list(axes[0])


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return atomic_write(path, buf.getvalue())


def write_plots(data: dict[str, Any], out: Path) -> tuple[list[Path], str]:
    """The plots that have data, written into ``out``; and a note when none could be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots not drawn: matplotlib is not installed (pip install matplotlib)"
    written = []
    metrics = [c for c in data["columns"] if any(g["sampling"].get(c) or g["compute"].get(c) for g in data["groups"])]
    for kind, x, xlabel, fname in (("sampling", "images_per_s", "sampling images/s", "quality_vs_sampling.png"),
                                   ("compute", "flops", "training FLOPs", "quality_vs_compute.png")):
        cols = [c for c in metrics if any(p.get(x) is not None for g in data["groups"] for p in g[kind].get(c, []))]
        if not cols:
            continue
        fig, axes = _panels(plt, len(cols))
        for ax, col in zip(axes, cols):
            for g in data["groups"]:
                pts = [p for p in g[kind].get(col, []) if p.get(x) is not None]
                if pts:
                    pts.sort(key=lambda p: p[x])
                    ax.plot([p[x] for p in pts], [p["value"] for p in pts], "o-", label=g["label"], ms=4)
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(col)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        written.append(_save(fig, out / fname))
        plt.close(fig)
    curves = [g for g in data["groups"] if g.get("curve")]
    if curves:
        fig, axes = _panels(plt, 1)
        ax = axes[0]
        by_flops = all("flops" in g["curve"] for g in curves)
        for g in curves:
            c = g["curve"]
            ax.plot(c["flops"] if by_flops else c["step"], c["value"], label=g["label"], lw=1)
        ax.set_xlabel("training FLOPs" if by_flops else "step")
        ax.set_ylabel(" / ".join(sorted({g["curve"]["unit"] for g in curves})))
        if by_flops:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "loss_curves.png"))
        plt.close(fig)
    return written, "" if written else "plots not drawn: no curves or eval settings to plot"
