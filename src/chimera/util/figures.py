"""Writing a matplotlib figure where a report wants it, the one way every plot of the project is saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_figure(fig: Any, out: str | Path, dpi: int = 110, rect: tuple[float, float, float, float] = (0, 0, 1, 1),
                bbox_inches: str | None = None) -> Path:
    """Lay `fig` out within `rect` (room left for a figure legend), write it to `out` (its folder made if missing),
    close it (figures hold memory until closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches=bbox_inches)
    plt.close(fig)
    return out
