"""The continual-learning matrix as a picture: a heatmap of R and one forgetting curve per
task. matplotlib is an optional extra (`pip install 'kifmerge[plot]'`)."""

from __future__ import annotations

from pathlib import Path

from kifmerge.errors import NotFoundError, UsageError


def checked_png(out: Path) -> Path:
    """`--png FILE`, refused before anything is computed when it cannot be written as asked."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--png takes a file name ending in .png, got {str(out)!r}")
    if out.is_dir():
        raise UsageError(f"--png {out} is a folder; give a file name ending in .png")
    if not out.parent.is_dir():
        raise NotFoundError(f"--png: folder {out.parent} does not exist")
    return out


def draw_report(report: dict, out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--png needs matplotlib: pip install 'kifmerge[plot]'") from None
    matrix = [[float("nan") if v is None else v for v in row] for row in report["matrix"]]
    tasks, versions = report["tasks"], report["versions"]
    fig, (heat, curves) = plt.subplots(1, 2, figsize=(11, 4.2))
    image = heat.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    heat.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    labels = [f"{v} {t or (report.get('made_by') or [None] * len(versions))[i] or 'base'}"
              for i, (v, t) in enumerate(zip(versions, report["fused"], strict=True))]
    heat.set_yticks(range(len(versions)), labels)
    for i, row in enumerate(report["matrix"]):
        for j, value in enumerate(row):
            if value is not None:
                heat.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=8)
    heat.set_title(f"{report['line']}: {report['metric']} R[version][task]")
    fig.colorbar(image, ax=heat, fraction=0.046)
    for j, task in enumerate(tasks):
        curves.plot(range(len(versions)), [row[j] for row in matrix], marker="o", label=task)
    curves.set_xticks(range(len(versions)), versions)
    curves.set_ylim(0, 1.02)
    curves.set_ylabel(report["metric"])
    curves.set_title(f"AP {_fmt(report['AP'])}  BWT vs learned {_fmt(report.get('BWT_vs_learned'))}  "
                     f"BWT after fuse {_fmt(report.get('BWT_after_fuse'))}", fontsize=9)
    curves.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:+.3f}" if value < 0 else f"{value:.3f}"


def draw_profile_heatmap(profile: dict, out: Path) -> Path:
    """The layer × module grid of a profile (`kifmerge profile show --png`): mean normalised
    score per cell, blank where a layer has no such module."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--png needs matplotlib: pip install 'kifmerge[plot]'") from None
    grid = profile["grid"]
    rows, columns = grid["rows"], grid["columns"]
    values = [[float("nan") if v is None else v for v in row] for row in grid["values"]]
    fig, ax = plt.subplots(figsize=(min(2.5 + 0.9 * len(columns), 24), min(1.8 + 0.32 * len(rows), 40)))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    if len(rows) * len(columns) <= 200:  # small grids: the values too
        for i, row in enumerate(grid["values"]):
            for j, value in enumerate(row):
                if value is not None:
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value < 0.6 else "black")
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    subject = profile.get("version") or f"task {profile['task']}"
    mean = "mean over rank units" if profile["unit"] == "lora-rank" else "one tensor per cell"
    ax.set_title(f"importance of {subject} ({mean})", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, label="normalised score")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
