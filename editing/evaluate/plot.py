"""The γ picture: max cosine at subject tokens (should fire) vs unrelated tokens (should not)."""

from __future__ import annotations

import os
from pathlib import Path

from nkv.errors import NKVError

from .report import EvalReport


def plot_cosines(report: EvalReport, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write a PNG histogram of positives vs negatives with γ marked; returns the path.

    Raises:
        NKVError: matplotlib is not installed (it is in the `plot` and `test` extras).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise NKVError("--plot needs matplotlib: pip install 'nkv[plot]'") from None
    pos = report.cosines.get("positives", [])
    neg = report.cosines.get("negatives", [])
    own = report.cosines.get("own", [])
    gamma = report.adapter["gamma"]
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = [i / 100 for i in range(-20, 101)]
    # Densities: there are far more unrelated tokens than subject tokens.
    if neg:
        ax.hist(neg, bins=bins, density=True, alpha=0.55, color="tab:gray",
                label=f"unrelated tokens (n={len(neg)})")
    if pos:
        ax.hist(pos, bins=bins, density=True, alpha=0.55, color="tab:blue",
                label=f"subject's last token, edit + paraphrase prompts (n={len(pos)})")
    if own:
        ax.hist(own, bins=bins, density=True, histtype="step", color="tab:green",
                label=f"cosine with the fact's own key, edit prompts (n={len(own)})")
    ax.axvline(gamma, color="tab:red", linestyle="--", label=f"γ = {gamma:g}")
    ax.set_xlabel("max cosine between the token's key and the adapter's keys")
    ax.set_ylabel("density")
    gate = report.gate
    ax.set_title(title or f"{report.data['name']}: {report.adapter['n_facts']} facts, layer {report.adapter['layer']}"
                 f"  (false fires {gate.get('false_fire')}% of tokens)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["plot_cosines"]
