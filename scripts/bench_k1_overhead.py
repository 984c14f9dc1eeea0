"""What one stage through the pipeline strategy costs against `strategy=single`, end to end.

    python scripts/bench_k1_overhead.py                   # default job's model, 3 rounds, ~5 min
    python scripts/bench_k1_overhead.py --rounds 5 --steps 80 -- model.n_layers=8

Each round runs the same `giantpipe-train` job twice, back to back, in alternating order:
`strategy=single` and `strategy=pipeline strategy.stages=1 strategy.micro_batches=1` (one
spawned worker, a gloo group of one, the engine's step). Both read `samples_per_s` from
their `summary.json` (training batches only: start-up, validation and test excluded). A
round's ratio compares two runs minutes apart at most, so the median of the rounds' ratios is
what the machine's load disturbs least. Validation, test, loggers and callbacks are off;
every process runs one intra-op thread.

JSON (`--out`, default bench_k1_overhead.json):
  meta    started, seconds, rounds, steps, overrides, loadavg_start / loadavg_end (1-min)
  runs    [{round, strategy, samples_per_s, tokens_per_s, wall_time_s, loadavg}]
  result  single_samples_per_s / pipeline_samples_per_s (medians over rounds),
          overhead (median over rounds of single_sps / pipeline_sps - 1: the share of time the
          pipeline strategy adds; <= 0.03 is the target), overhead_per_round, target (0.03),
          target_met
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 0.03
STRATEGIES = {
    "single": ["strategy=single"],
    "pipeline": ["strategy=pipeline", "strategy.stages=1", "strategy.micro_batches=1"],
}
QUIET = [
    "trainer.limit_val_batches=0", "trainer.limit_test_batches=0", "run_test=false",
    "logger=none", "callbacks=none", "trainer.enable_progress_bar=false",
]  # fmt: skip


def run_job(strategy: str, steps: int, overrides: list[str], out_dir: Path) -> dict:
    """One `giantpipe-train` run; its summary.json."""
    args = [*STRATEGIES[strategy], f"trainer.max_steps={steps}", *QUIET, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "giantpipe.platform.train", *args, f"hydra.run.dir={out_dir}"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"giantpipe-train {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out_dir / "summary.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--out", default="bench_k1_overhead.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs (after --)")
    args = parser.parse_args(argv)
    started, clock = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    load_start = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            order = ["single", "pipeline"] if rnd % 2 == 0 else ["pipeline", "single"]
            for strategy in order:
                summary = run_job(
                    strategy, args.steps, args.overrides, Path(tmp, f"{rnd}-{strategy}")
                )
                runs.append({
                    "round": rnd, "strategy": strategy, "samples_per_s": summary["samples_per_s"],
                    "tokens_per_s": summary.get("tokens_per_s"),
                    "wall_time_s": summary["wall_time_s"], "loadavg": os.getloadavg()[0],
                })  # fmt: skip
                print(f"round {rnd} {strategy:8s} {summary['samples_per_s']:8.2f} samples/s "
                      f"(load {runs[-1]['loadavg']:.2f})", flush=True)  # fmt: skip
    sps = {s: [r["samples_per_s"] for r in runs if r["strategy"] == s] for s in STRATEGIES}
    per_round = [
        single / pipe - 1.0 for single, pipe in zip(sps["single"], sps["pipeline"], strict=True)
    ]
    overhead = statistics.median(per_round)
    result = {
        "meta": {
            "started": started, "seconds": time.perf_counter() - clock, "rounds": args.rounds,
            "steps": args.steps, "overrides": args.overrides, "loadavg_start": load_start,
            "loadavg_end": os.getloadavg()[0],
        },
        "runs": runs,
        "result": {
            "single_samples_per_s": statistics.median(sps["single"]),
            "pipeline_samples_per_s": statistics.median(sps["pipeline"]),
            "overhead": overhead, "overhead_per_round": per_round, "target": TARGET,
            "target_met": overhead <= TARGET,
        },
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        f"pipeline strategy with 1 stage: {overhead:+.1%} time against strategy=single "
        f"(median of {args.rounds} rounds: {', '.join(f'{o:+.1%}' for o in per_round)}); "
        f"target <= {TARGET:.0%} {'met' if overhead <= TARGET else 'NOT met'}; wrote {args.out}"
    )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
