"""How long `giantpipe-train` takes from start to exit: this tree against a baseline.

    python scripts/bench_config_latency.py                      # baseline: git ref main, 5 runs each
    python scripts/bench_config_latency.py --baseline-ref v0.1 --runs 7 --cases misspelt_key
    python scripts/bench_config_latency.py --cases tiny_2_stage_run --out startup.json

For each case (by default the bad command lines: a misspelt key, a value Lightning would reject,
a stage count the model cannot hold; on request a tiny 2-stage run, 6 steps, where start-up is
most of the time) both trees run `python -m giantpipe.platform.train <args>` in a fresh process, alternating
baseline / this tree within each round (so load drifts hit both alike), and the wall time from
start to exit is taken. The baseline is the ref's files (`git archive`, nothing checked out),
imported through PYTHONPATH exactly as this tree is. Timing on a loaded machine is not
comparable across machines: the JSON records the load average at every run; quote medians only
with it.

JSON (`--out`, default docs/results/bench_config_latency.json):
  meta     started, baseline_ref, runs, python, loadavg_start / loadavg_end (1, 5, 15 min)
  runs     [{case, tree, round, seconds, returncode, message, loadavg_1m}]
  result   {case: {baseline_median_s, median_s, speedup, baseline_message, message}}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900
CASES = {
    "misspelt_key": ["model.nme=3"],
    "bad_trainer_value": ["trainer.max_steps=-5"],
    "too_many_stages": ["strategy=pipeline", "strategy.stages=8", "trainer.devices=8"],
}
REJECTIONS = list(CASES)
CASES["tiny_2_stage_run"] = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_len=32",
    "data.seq_len=32", "data.batch_size=8", "data.max_bytes=300000", "trainer.max_steps=6",
    "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false",
    "strategy=pipeline", "strategy.stages=2", "trainer.devices=2",
]  # fmt: skip


def export_ref(ref: str, into: Path) -> Path:
    """The files of `ref` under `into` (git archive), for a before/after comparison."""
    archive = into / "baseline.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), ref], cwd=REPO, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def time_once(src: Path, args: list[str], cwd: Path) -> tuple[float, int, str]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "giantpipe.platform.train", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:  # a starved process on a loaded machine: recorded, not fatal
        return TIMEOUT_S, -1, f"no answer within {TIMEOUT_S} s"
    seconds = time.perf_counter() - started
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return seconds, proc.returncode, (lines[-1] if lines else "")[:300]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-ref", default="main")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=REJECTIONS)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "bench_config_latency.json")
    args = parser.parse_args()
    meta = {"started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "baseline_ref": args.baseline_ref, "runs": args.runs, "python": sys.version.split()[0],
            "loadavg_start": os.getloadavg()}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"baseline": export_ref(args.baseline_ref, Path(tmp)) / "src", "this": REPO / "src"}
        for case in args.cases:
            case_args = CASES[case]
            for round_ in range(args.runs):
                for tree, src in trees.items():
                    seconds, code, message = time_once(src, case_args, Path(tmp))
                    runs.append({"case": case, "tree": tree, "round": round_, "seconds": round(seconds, 3),
                                 "returncode": code, "message": message, "loadavg_1m": os.getloadavg()[0]})
    meta["loadavg_end"] = os.getloadavg()
    result = {}
    for case in args.cases:
        by_tree = {t: [r for r in runs if r["case"] == case and r["tree"] == t] for t in ("baseline", "this")}
        med = {t: statistics.median(r["seconds"] for r in rs) for t, rs in by_tree.items()}
        result[case] = {"baseline_median_s": med["baseline"], "median_s": med["this"],
                        "speedup": med["baseline"] / med["this"],
                        "baseline_message": by_tree["baseline"][-1]["message"],
                        "message": by_tree["this"][-1]["message"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "runs": runs, "result": result}, indent=2))
    print(f"load average {meta['loadavg_start']} -> {meta['loadavg_end']} (1, 5, 15 min)")
    print(f"{'case':<20}{args.baseline_ref + ' (s)':>14}{'this (s)':>12}{'speedup':>10}")
    for case, r in result.items():
        print(f"{case:<20}{r['baseline_median_s']:>14.2f}{r['median_s']:>12.2f}{r['speedup']:>10.1f}")
        print(f"  {args.baseline_ref}: {r['baseline_message']}\n  this: {r['message']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
