"""The PNG plots of a run and of an evaluation (matplotlib is optional: the ``plot`` extra).

    plot_loss(history, "run/plots/loss.png")                 # train.py: train and eval loss
    plot_training_curves(records, "eval/plots/training_curves.png")   # eval.py: loss, lr, norm, speed
    plot_per_type_f1(metrics["entities"]["per_type"], "eval/plots/per_type_f1.png")

Each returns the written path, or None when there is nothing to plot or matplotlib is missing (the
caller says which: a run or an evaluation never fails over a picture). Files are written with the
package's exclusive-temp-file writer, so a symlink planted at the destination is never followed.
"""

from __future__ import annotations

import importlib.util
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.files import write_bytes_atomic

# (panel title, metrics.jsonl keys drawn in it), top to bottom
CURVES = (("loss", ("loss", "eval_loss")), ("learning rate", ("lr",)), ("grad norm", ("grad_norm",)),
          ("tokens/s", ("tokens_per_s",)))
LOSS_ONLY = (("cross-entropy (nats / target token)", ("loss", "eval_loss")),)
_LABELS = {"loss": "train loss", "eval_loss": "eval loss"}


def matplotlib_missing() -> bool:
    return importlib.util.find_spec("matplotlib") is None


def _pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (no display on training machines), or None."""
    try:  # lazy: matplotlib is optional (the [plot] extra) and slow to import; only plotting needs it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig: Any, plt: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue(), durable=False)
    return path


def plot_training_curves(records: Sequence[dict[str, Any]], path: str | os.PathLike,
                         panels: Sequence[tuple[str, Sequence[str]]] = CURVES) -> Path | None:
    """One panel per (title, keys) against the optimizer step; panels without data are left out.

    ``records`` are metrics.jsonl lines (``step`` plus any of ``loss``, ``eval_loss``, ``lr``,
    ``grad_norm``, ``tokens_per_s``).
    """
    series = {}
    for _, keys in panels:
        for key in keys:
            points = [(r["step"], r[key]) for r in records
                      if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))]
            if points:
                series[key] = points
    shown = [(title, [k for k in keys if k in series]) for title, keys in panels]
    shown = [(title, keys) for title, keys in shown if keys]
    if not shown:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(len(shown), 1, figsize=(7, 1.4 + 2.2 * len(shown)), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], shown):
        for key in keys:
            xs, ys = zip(*series[key])
            ax.plot(xs, ys, marker="o" if key == "eval_loss" else None, markersize=3,
                    label=_LABELS.get(key, key))
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_loss(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Train loss (per logged step) and eval loss against the optimizer step: the run's loss.png."""
    return plot_training_curves(records, path, LOSS_ONLY)


def plot_per_type_f1(per_type: dict[str, dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Horizontal bars of F1 per entity type, labelled with support; None when nothing to plot."""
    if not per_type:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    kinds = list(per_type)
    f1s = [100 * per_type[k]["f1"] for k in kinds]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(kinds) + 1.2))
    bars = ax.barh(kinds, f1s, color="#4c72b0")
    for bar, k in zip(bars, kinds):
        ax.text(bar.get_width() + 1, bar.get_y() + bar.get_height() / 2,
                f"{bar.get_width():.1f} (n={per_type[k]['support']})", va="center", fontsize=8)
    ax.set_xlim(0, 115)
    ax.invert_yaxis()
    ax.set_xlabel("F1 (%)")
    ax.set_title("Entity F1 per type")
    fig.tight_layout()
    return _save(fig, plt, path)
