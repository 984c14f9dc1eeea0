"""Time per training step of risk training against cross-entropy, on one process and on 2 stages.

    python scripts/bench_risk_step.py --init outputs/gnmt/<run>/checkpoints/last.ckpt
    python scripts/bench_risk_step.py --steps 10 -- model.hidden_size=64      # quick smoke run

Each round runs the same `experiment=gnmt` job (shrink it with overrides after `--`) with
`loss=cross_entropy`, `loss=mwer loss.risk=gleu` (beam N-best) and `loss=mwer loss.risk=gleu
loss.candidates=sample`, each on one process and on a 2-stage pipeline (M=4), and reads the
training `samples_per_s` from `summary.json` (training batches only: start-up, validation and
test excluded); seconds per step = batch / samples_per_s. The ratio to cross-entropy in the
same round and layout is what the machine's load disturbs least. Risk training decodes N=4
candidates per sentence every step, so its cost depends on how long the model's outputs are:
give `--init` a trained checkpoint (without one, the script trains a CE start of `--steps`
steps first, whose outputs run to the length limit).

JSON (`--out`, default bench_risk_step.json):
  meta    started, seconds, rounds, steps, init, overrides, loadavg_start / loadavg_end
  runs    [{round, layout, loss, samples_per_s, s_per_step, wall_time_s, loadavg}]
  result  {layout: {loss: median s_per_step, loss + "_vs_ce": median ratio to CE}}
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

LAYOUTS = {
    "one_process": ["strategy=single"],
    "two_stages": ["strategy=pipeline", "strategy.stages=2", "trainer.devices=2",
                   "strategy.micro_batches=4"],
}
LOSSES = {
    "ce": ["loss=cross_entropy"],
    "risk_beam": ["loss=mwer", "loss.risk=gleu", "loss.candidates=beam", "loss.nbest=4"],
    "risk_sample": ["loss=mwer", "loss.risk=gleu", "loss.candidates=sample", "loss.nbest=4"],
}
QUIET = ["trainer.limit_val_batches=0", "trainer.limit_test_batches=0", "run_test=false",
         "logger=none", "trainer.enable_progress_bar=false", "lr_schedule.warmup_steps=1"]


def train(args: list[str], out_dir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "giantpipe.platform.train", *args,
                           f"hydra.run.dir={out_dir}"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"giantpipe-train {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out_dir / "summary.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--init", default=None, help="a trained CE checkpoint to start from")
    parser.add_argument("--out", default="bench_risk_step.json")
    parser.add_argument("overrides", nargs="*", help="giantpipe-train overrides (after --)")
    opts = parser.parse_args(argv)
    base = ["experiment=gnmt", f"data.batch_size={opts.batch}", *QUIET, *opts.overrides]
    started, t0 = datetime.datetime.now(datetime.UTC).isoformat(), time.time()
    meta = {"started": started, "rounds": opts.rounds, "steps": opts.steps, "init": opts.init,
            "overrides": opts.overrides, "loadavg_start": os.getloadavg()[0]}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        init = opts.init
        if init is None:
            train(base + [f"trainer.max_steps={opts.steps}"], Path(tmp) / "start")
            init = str(Path(tmp) / "start" / "checkpoints" / "last.ckpt")
        for rnd in range(opts.rounds):
            for layout, layout_args in LAYOUTS.items():
                for loss, loss_args in LOSSES.items():
                    start = [f"init_from={init}"]
                    summary = train(base + layout_args + loss_args + start +
                                    [f"trainer.max_steps={opts.steps}", "callbacks=none"],
                                    Path(tmp) / f"{rnd}-{layout}-{loss}")
                    sps = summary["samples_per_s"]
                    runs.append({"round": rnd, "layout": layout, "loss": loss, "samples_per_s": sps,
                                 "s_per_step": opts.batch / sps, "wall_time_s": summary["wall_time_s"],
                                 "loadavg": os.getloadavg()[0]})
                    print(f"round {rnd} {layout:12s} {loss:12s} {opts.batch / sps:7.3f} s/step",
                          flush=True)
    result: dict = {}
    for layout in LAYOUTS:
        result[layout] = {}
        for loss in LOSSES:
            mine = [r for r in runs if r["layout"] == layout and r["loss"] == loss]
            result[layout][loss] = statistics.median(r["s_per_step"] for r in mine)
            if loss != "ce":
                ratios = [r["s_per_step"] / c["s_per_step"] for r in mine for c in runs
                          if c["layout"] == layout and c["loss"] == "ce" and c["round"] == r["round"]]
                result[layout][f"{loss}_vs_ce"] = statistics.median(ratios)
    meta.update(seconds=time.time() - t0, loadavg_end=os.getloadavg()[0])
    report = {"meta": meta, "runs": runs, "result": result}
    Path(opts.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(result, indent=2))
    return report


if __name__ == "__main__":
    main()
