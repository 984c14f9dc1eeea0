"""`giantpipe-report DIR`: the table and plot of a multirun sweep, in the shape of GPipe's Table 2.

Reads every job's `summary.json` under DIR (written by giantpipe-train) and its
`.hydra/overrides.yaml` (what the job changed), and writes next to them:

    report.md        every job (the overrides that vary, throughput, wall time, key metrics),
                     then throughput pivoted as micro-batches (rows) x stages (columns),
                     normalized to the smallest (stages, micro-batches) cell, like Table 2
    report.csv       one row per job: job, varying overrides, steps, wall_time_s,
                     samples_per_s, tokens_per_s, and every metric of summary.json
    throughput.png   samples/s vs micro-batches, one line per stage count

Stages and micro-batches come from the overrides, else from the job's `.hydra/config.yaml`
(strategy=single counts as 1 stage, 1 micro-batch). Jobs that differ in other swept keys
get one pivot table each.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

GROUPING_KEYS = ("strategy.stages", "strategy.micro_batches", "trainer.devices", "strategy")
SHOWN_METRICS = ("train/loss", "val/loss", "pipeline/bubble", "pipeline/bubble_theory")


def parse_override(line: str) -> tuple[str, str]:
    key, _, value = str(line).partition("=")
    return key.lstrip("+~"), value


def load_job(summary_path: Path, sweep_dir: Path) -> dict:
    """One job: its summary, overrides and the (stages, micro_batches) it ran with."""
    job_dir = summary_path.parent
    summary = json.loads(summary_path.read_text())
    overrides: dict[str, str] = {}
    hydra_dir = job_dir / ".hydra"
    if (hydra_dir / "overrides.yaml").exists():
        overrides = dict(parse_override(o) for o in OmegaConf.load(hydra_dir / "overrides.yaml"))
    stages = micro_batches = None
    if "strategy.stages" in overrides:
        stages = int(overrides["strategy.stages"])
    if "strategy.micro_batches" in overrides:
        micro_batches = int(overrides["strategy.micro_batches"])
    if (stages is None or micro_batches is None) and (hydra_dir / "config.yaml").exists():
        strategy = OmegaConf.load(hydra_dir / "config.yaml").get("strategy") or {}
        pipelined = strategy.get("name") == "pipeline"
        stages = stages or (int(strategy.get("stages", 1)) if pipelined else 1)
        micro_batches = micro_batches or (int(strategy.get("micro_batches", 1)) if pipelined else 1)
    return {
        "job": str(job_dir.relative_to(sweep_dir)) if job_dir != sweep_dir else job_dir.name,
        "dir": job_dir,
        "overrides": overrides,
        "stages": stages or 1,
        "micro_batches": micro_batches or 1,
        "summary": summary,
    }  # fmt: skip


def find_jobs(sweep_dir: Path) -> list[dict]:
    paths = sorted(sweep_dir.rglob("summary.json"), key=lambda p: _natural(p.parent.name))
    paths = [p for p in paths if ".hydra" not in p.parts]
    return [load_job(p, sweep_dir) for p in paths]


def _natural(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def varying_keys(jobs: Sequence[dict]) -> list[str]:
    """Override keys whose value differs between jobs (or is missing from some), except the
    stage and micro-batch counts, which have their own columns."""
    keys = sorted({k for j in jobs for k in j["overrides"]} - set(GROUPING_KEYS[:2]))
    return [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1]


def _series(job: dict, varying: Sequence[str]) -> str:
    other = [f"{k}={job['overrides'].get(k)}" for k in varying if k not in GROUPING_KEYS]
    return ", ".join(other) or "all jobs"


def pivot(jobs: Sequence[dict], metric: str = "samples_per_s") -> dict[str, dict]:
    """{series: {"stages": [...], "micro_batches": [...], "cells": {(M, K): value}}}."""
    varying = varying_keys(jobs)
    tables: dict[str, dict] = {}
    for job in jobs:
        value = job["summary"].get(metric)
        if value is None:
            continue
        table = tables.setdefault(_series(job, varying), {"cells": {}})
        table["cells"][(job["micro_batches"], job["stages"])] = float(value)
    for table in tables.values():
        table["micro_batches"] = sorted({m for m, _ in table["cells"]})
        table["stages"] = sorted({k for _, k in table["cells"]})
    return tables


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown(jobs: Sequence[dict], metric: str = "samples_per_s") -> str:
    varying = varying_keys(jobs)
    metrics = [m for m in SHOWN_METRICS if any(m in j["summary"].get("metrics", {}) for j in jobs)]
    header = ["job", *varying, "stages", "M", "steps", "samples/s", "tokens/s", "wall s", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for j in jobs:
        s = j["summary"]
        row = [j["job"], *(j["overrides"].get(k, "") for k in varying), j["stages"],
               j["micro_batches"], s.get("steps"), s.get("samples_per_s"), s.get("tokens_per_s"),
               s.get("wall_time_s"), *(s.get("metrics", {}).get(m) for m in metrics)]  # fmt: skip
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    out = [f"# Sweep report: {len(jobs)} jobs", "", *lines]
    for series, table in pivot(jobs, metric).items():
        cells = table["cells"]
        ref = cells.get((table["micro_batches"][0], table["stages"][0]))
        out += ["", f"## {metric}, micro-batches x stages ({series})",
                "normalized to the first cell, as in GPipe's Table 2; raw value in brackets", "",
                "| M \\ stages | " + " | ".join(f"K={k}" for k in table["stages"]) + " |",
                "|---|" + "---|" * len(table["stages"])]  # fmt: skip
        for m in table["micro_batches"]:
            row = []
            for k in table["stages"]:
                v = cells.get((m, k))
                row.append("" if v is None else (f"{v / ref:.2f} ({v:.4g})" if ref else f"{v:.4g}"))
            out.append(f"| M={m} | " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


def write_csv(jobs: Sequence[dict], path: Path) -> None:
    varying = varying_keys(jobs)
    metric_names = sorted({m for j in jobs for m in j["summary"].get("metrics", {})})
    fields = ["job", *varying, "stages", "micro_batches", "steps", "wall_time_s",
              "samples_per_s", "tokens_per_s", *metric_names]  # fmt: skip
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for j in jobs:
            s = j["summary"]
            writer.writerow([j["job"], *(j["overrides"].get(k, "") for k in varying), j["stages"],
                             j["micro_batches"], s.get("steps"), s.get("wall_time_s"),
                             s.get("samples_per_s"), s.get("tokens_per_s"),
                             *(s.get("metrics", {}).get(m, "") for m in metric_names)])  # fmt: skip


def plot(jobs: Sequence[dict], path: Path, metric: str = "samples_per_s") -> Path | None:
    tables = pivot(jobs, metric)
    if not tables:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4), squeeze=False)
    for ax, (series, table) in zip(axes[0], tables.items(), strict=True):
        for k in table["stages"]:
            points = [
                (m, table["cells"][(m, k)])
                for m in table["micro_batches"]
                if (m, k) in table["cells"]
            ]
            ax.plot(
                [m for m, _ in points], [v for _, v in points], marker="o", label=f"{k} stage(s)"
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(table["micro_batches"], [str(m) for m in table["micro_batches"]])
        ax.set_xlabel("micro-batches M")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(series, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("throughput vs micro-batches per stage count (GPipe Table 2's shape)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(
    sweep_dir: Path, out_dir: Path | None = None, metric: str = "samples_per_s"
) -> dict[str, Path]:
    """Write report.md, report.csv and throughput.png for the sweep; return their paths."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory")
    jobs = find_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(
            f"no summary.json under {sweep_dir}: point giantpipe-report at a multirun sweep dir "
            f"(multirun/<task>/<time>) whose jobs have finished"
        )
    out_dir = Path(out_dir) if out_dir else sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "report.md", "csv": out_dir / "report.csv"}
    paths["markdown"].write_text(markdown(jobs, metric))
    write_csv(jobs, paths["csv"])
    picture = plot(jobs, out_dir / "throughput.png", metric)
    if picture:
        paths["plot"] = picture
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="giantpipe-report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun sweep directory")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: the sweep directory")
    parser.add_argument("--metric", default="samples_per_s", help="samples_per_s or tokens_per_s")
    args = parser.parse_args(argv)
    try:
        paths = report(args.sweep_dir, args.out_dir, args.metric)
    except FileNotFoundError as err:
        print(f"giantpipe-report: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(paths["markdown"].read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
