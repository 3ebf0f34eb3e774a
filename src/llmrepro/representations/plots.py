"""The truth recipes' figures: probe accuracy per layer, per-head probe accuracy, the ITI (K, alpha) grid."""

from __future__ import annotations

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layers(result: dict, feature: str, out) -> None:
    """Per dataset: out-of-fold accuracy per layer for each probe, the model's own accuracy and the majority rate."""
    plt = _plt()
    names = list(result["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names, strict=True):
        entry = result["datasets"][name]
        for p, r in entry["probes"].items():
            ax.plot(result["layers"], r["accuracy"], marker="o", ms=3, label=p)
        if "model" in entry:
            ax.axhline(entry["model"]["accuracy"], color="k", ls="--", lw=1, label="model (few-shot)")
        ax.axhline(entry["majority"], color="grey", ls=":", lw=1, label="majority")
        ax.set_title(name)
        ax.set_xlabel(f"layer ({feature})")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("accuracy (out-of-fold)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def heads(acc: np.ndarray, title: str, out) -> None:
    """Heat map of per-head probe accuracy, layers down, heads across."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, acc.shape[1] * 0.3 + 2), max(3, acc.shape[0] * 0.25 + 1.5)))
    im = ax.imshow(acc, aspect="auto", cmap="viridis", vmin=min(0.5, float(acc.min())), vmax=1.0)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def grid(grid: dict, out) -> None:
    """Heat maps of mean p_true (MC2 formula) and MC1 on partition 2 over (K, alpha)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "p_true", "mean p_true (MC2)"), (axes[1], "mc1", "MC1")):
        m = np.asarray(grid[key])
        im = ax.imshow(m, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(grid["K"])), [str(k) for k in grid["K"]])
        ax.set_yticks(range(len(grid["alphas"])), [f"{a:g}" for a in grid["alphas"]])
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xlabel("K (heads)")
        ax.set_ylabel("alpha")
        ax.set_title(f"partition 2: {title}")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
