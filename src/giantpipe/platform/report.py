"""Human-readable results at the end of a run (rich table on rank zero)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_results(summary: dict, output_dir: Path) -> None:
    metrics = summary["metrics"]
    table = Table(title=f"giantpipe results ({output_dir / 'summary.json'})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        if "/" in name and isinstance(value, float):
            table.add_row(name, f"{value:.4f}")
    for key in ("steps", "wall_time_s", "samples_per_s", "tokens_per_s"):
        if key in summary:
            table.add_row(key, f"{summary[key]:.1f}" if isinstance(summary[key], float) else str(summary[key]))
    console = Console()
    console.print(table)
    if "val/bpb" in metrics and "data/unigram_bpb" in metrics:
        console.print(
            f"val/bpb {metrics['val/bpb']:.3f} bits per byte vs unigram entropy "
            f"{metrics['data/unigram_bpb']:.3f} bits per byte of the same data"
        )
