"""Plot per-step learning rates of several runs, e.g. a batch ladder under one scaling rule.

Two panels: lr against samples seen (so runs at different batches that train the same epochs end at the
same x, and LEGW's constant warmup ITERATIONS show as warmups whose length in samples grows with the
batch), and lr against optimizer step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_planned_lr(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Draw ``rows`` (dicts with ``label``, ``lrs`` and optional ``samples_per_step``, or ``samples``: the samples
    seen after each step, for a batch that changes) into a PNG.

    Step ``s`` is placed at ``(s + 1) * samples_per_step`` samples, the samples seen once it is done,
    matching the schedules' end-of-step convention. Rows without either appear only in the per-step
    panel. Returns the path written.
    """
    # Imported here so that importing largebatch.sched never pulls in matplotlib or needs a display.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_samples, ax_steps) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        lrs = list(row["lrs"])
        steps = range(1, len(lrs) + 1)
        ax_steps.plot(list(steps), lrs, label=row["label"])
        sps = row.get("samples_per_step")
        samples = row.get("samples") or ([s * sps for s in steps] if sps else None)
        if samples:
            ax_samples.plot(list(samples), lrs, label=row["label"])
    ax_samples.set(xlabel="samples seen", ylabel="learning rate", title="lr vs samples")
    ax_steps.set(xlabel="optimizer step", ylabel="learning rate", title="lr vs step")
    for ax in (ax_samples, ax_steps):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
