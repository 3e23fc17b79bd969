"""Writing a matplotlib figure where a report wants it, the one way every plot of the project is saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_figure(fig: Any, out: str | Path, dpi: int = 110) -> Path:
    """Lay `fig` out, write it to `out` (its folder made if missing), close it (figures hold memory until closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
