"""GPipe's Table 1 on this machine: the largest giant net each configuration trains in a memory budget.

    python scripts/bench_capacity.py                        # 2 GiB per process (9 processes at 8 stages)
    python scripts/bench_capacity.py --budget-mb 640        # a smaller budget, fewer blocks
    python scripts/bench_capacity.py --quick                # one 2-stage trial: the suite's smoke test
    python scripts/bench_capacity.py --configs 8 --start-blocks 2528 --max-trials 1  # one check
    python scripts/bench_capacity.py --device cuda          # one GPU: naive vs 1 stage, bf16-mixed

For each configuration -- `naive` (one process, plain model, no re-materialization), and
`strategy=pipeline` with `checkpoint=always`, M micro-batches and 1, 2, 4, 8 stages -- the
number of Transformer blocks L of a fixed-width giant net is searched: a trial runs the real
`giantpipe-train` for 3 full steps and passes when it exits cleanly with a finite loss and the
peak resident memory (VmHWM, read from /proc of every process of the run: the launcher, each
stage's worker, helpers) stayed within the budget. A process passing the budget ends the trial
at once. The search starts from giantpipe-plan's prediction (corrected by the plan's error on
the configurations searched before: a bias of a few percent, much the same in each) and steps
up or down by `--resolution` of it (4%, whole layers per stage), galloping, then bisects; it
stops when the largest passing and the smallest failing L are one step apart. Each
configuration's largest passing L is reported with the plan's prediction for every stage
against the measured VmHWM (the target: within 15%).

Width: d_model 128, d_ff 512 at 6 x 128 tokens per batch (M = 6: one sample a micro-batch), so
that activations dominate the naive model (as in the paper's Transformer-L). The compute that
fills a budget grows with the budget times the tokens per step (parameters fill it, and every
parameter costs 8 flops a token with re-materialization): at 2 GiB the 8-stage trial is about
2,500 blocks, about 4 minutes of 2 CPU cores, so the batch is no larger than the ratios need.

On a GPU (`--device cuda`; scripts/gpu_checks.sh runs it on a lent one) the measure is
`torch.cuda.max_memory_allocated` of the training process (`memory/peak_mb` of its summary),
against giantpipe-plan `--device cuda`; the budget (default 16 GiB, the GPipe paper's TPUv3
core) is judged, not enforced: a trial fits when its run peaked within it. The width is
Transformer-L's d_model 1024, d_ff 4096, 16 heads, at 32 x 512 tokens, M = 32 (the plan: naive
19 blocks, 1 stage 68: activations dominate the naive model, as on the CPU), in bf16-mixed;
configurations naive and 1 (one GPU).

JSON (`--out`, default bench_capacity.json):
  meta     started, seconds, device (cpu | cuda), gpu (its name, cuda), budget_mb, width,
           micro_batches, resolution, overrides, quick,
           loadavg_start/end (1-min),
           fixed_cost_mb {empty_process: torch + Lightning imported, launcher}
  configs  [{name, stages, blocks, params, param_mb, failed_at, plan_guess, plan_bias,
           trials: [{blocks, ok, reason, peaks_mb, seconds}], measured_mb {launcher, stage<s>},
           predicted_mb [per stage], predicted_act_mb [per stage], error_pct [per stage],
           within_15pct}]
  summary  naive, remat1, stages{2,4,8} blocks; remat_over_naive (target >= 2.5),
           stages8_over_remat1 (target >= 7), plan_within_15pct, targets_met
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from giantpipe.platform.proc_memory import TreeWatcher, kill_tree

WIDTH = {"model.d_model": 128, "model.d_ff": 512, "model.n_heads": 4, "data.seq_len": 128,
         "model.max_len": 128, "data.batch_size": 6}
CUDA_WIDTH = {"model.d_model": 1024, "model.d_ff": 4096, "model.n_heads": 16, "data.seq_len": 512,
              "model.max_len": 512, "data.batch_size": 32}
CUDA_RUN = ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed"]
CUDA_BUDGET_MB = 16384.0
QUICK_BUDGET_MB = 600.0  # a few blocks over the framework's own cost: short trials
QUIET = ["trainer.max_steps=3", "trainer.limit_val_batches=0", "trainer.limit_test_batches=0",
         "run_test=false", "logger=none", "callbacks=none", "trainer.enable_progress_bar=false",
         "model.dropout=0.1", "lr_schedule.warmup_steps=1"]
MICRO_BATCHES = 6
RESOLUTION = 0.04  # the search's step, a fraction of the plan's guess
TARGETS = {"remat_over_naive": 2.5, "stages8_over_remat1": 7.0, "plan_error_pct": 15.0}


def config_overrides(name: str, micro_batches: int) -> tuple[int, list[str]]:
    """(stages, overrides) of a configuration: `naive` or the stage count."""
    if name == "naive":
        return 1, ["strategy=single"]
    stages = int(name)
    return stages, ["strategy=pipeline", f"strategy.stages={stages}", f"trainer.devices={stages}",
                    f"strategy.micro_batches={micro_batches}", "strategy.checkpoint=always",
                    "strategy.balance=memory"]


def empty_process_mb() -> float:
    """VmHWM of a process that imported torch and Lightning and did nothing else."""
    code = ("import torch, lightning.pytorch; from giantpipe.platform.proc_memory import status_kb; "
            "print(status_kb('self'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def predict(base: list[str], blocks: int, budget: float, largest: bool = False, device: str = "cpu") -> dict:
    """giantpipe-plan's prediction (in a subprocess: its fixed cost is measured on itself)."""
    cmd = [sys.executable, "-m", "giantpipe.platform.plan", *base, f"model.n_layers={blocks}",
           "--device-memory", str(budget), "--json", "--device", device, *(["--largest"] if largest else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, env=run_env())
    if out.returncode not in (0, 1):
        raise SystemExit(f"giantpipe-plan failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def run_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def trial(base: list[str], blocks: int, budget: float, workdir: Path, device: str = "cpu") -> dict:
    """One 3-step training run of `blocks` blocks, watched; on CPU killed as soon as a process
    passes the budget, on CUDA judged by the peak its summary reports."""
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    cmd = ["nice", "-n", "10", sys.executable, "-m", "giantpipe.platform.train", *base,
           f"model.n_layers={blocks}", f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # VmHWM is a high-water mark: polling every 0.1 s loses no peak, only kills a little later
    cpu = device == "cpu"
    watcher = TreeWatcher(proc.pid, interval_s=0.1, limit_mb=budget,
                          on_exceed=lambda pid, mb: kill_tree(proc.pid)) if cpu else None
    with watcher or nullcontext():  # on CUDA the run's own summary reports its peak
        _, stderr = proc.communicate()
    summary = run_dir / "summary.json"
    metrics = json.loads(summary.read_text())["metrics"] if summary.exists() else {}
    loss = metrics.get("train/loss")
    if cpu:
        peaks = {k: round(v, 1) for k, v in sorted(watcher.by_role().items())}
        exceeded = watcher.exceeded[1] if watcher.exceeded is not None else None
    else:  # the training process's tensors (rank 0's with strategy=pipeline): its summary says
        gpu_peak = metrics.get("memory/peak_mb")
        peaks = {"launcher" if "strategy=single" in base else "rank0": gpu_peak}
        exceeded = gpu_peak if gpu_peak is not None and gpu_peak > budget else None
    result = {"blocks": blocks, "ok": False, "peaks_mb": peaks, "seconds": round(time.perf_counter() - started, 1)}
    if exceeded is not None:
        result["reason"] = f"over budget ({exceeded:.0f} MiB)"
    elif proc.returncode != 0:
        result["reason"] = f"exit {proc.returncode}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}"
    elif loss is None or not math.isfinite(loss):
        result["reason"] = f"loss {loss}"
    else:
        result.update(ok=True, reason="fits", loss=loss)
    return result


def wait_for_memory(processes: int, budget: float) -> None:
    """Start a trial only when the machine has room for all its processes (shared machine)."""
    need_kb = (processes * budget + 2048) * 1024
    for _ in range(120):
        avail = int(next(ln.split()[1] for ln in open("/proc/meminfo") if ln.startswith("MemAvailable")))
        if avail >= need_kb:
            return
        time.sleep(5)
    raise SystemExit(f"not enough free memory for {processes} x {budget:.0f} MiB; try a smaller --budget-mb")


def search(name: str, base: list[str], stages: int, budget: float, workdir: Path, quick: bool,
           max_trials: int, start: int | None = None, resolution: float = RESOLUTION,
           plan_bias: float = 1.0, device: str = "cpu") -> dict:
    """Largest passing block count, starting from the plan's prediction, in steps of
    `resolution` of it (whole layers per stage; at least one per stage). `plan_bias`: predicted
    over measured peak at the configurations searched before; the first guess asks the plan for
    the largest L within `budget x plan_bias`, where the measurement should meet the budget."""
    guess = predict(base, max(stages, 2), budget * plan_bias, largest=True, device=device)["largest_blocks"]
    if quick:  # one trial, just inside the prediction
        guess = max(1, int(guess * 0.9))
    guess = start or max(stages, guess // stages * stages)  # whole layers per stage: steps stay exact
    step = max(stages, round(guess * resolution / stages) * stages)
    processes = stages + 1 if name != "naive" else 1
    trials: dict[int, dict] = {}

    def run(blocks: int) -> bool:
        if blocks not in trials:
            if device == "cpu":
                wait_for_memory(processes, budget)
            trials[blocks] = trial(base, blocks, budget, workdir, device)
            t = trials[blocks]
            print(f"  {name:>5} L={blocks:4d}: {t['reason']:<28} peaks {t['peaks_mb']} ({t['seconds']} s)", flush=True)
        return trials[blocks]["ok"]

    lo, hi = None, None  # largest passing, smallest failing
    blocks, stride = max(guess, 1), step
    while len(trials) < max_trials:
        if run(blocks):
            lo = blocks
            if hi is not None and hi - lo <= step:
                break
            blocks = blocks + stride if hi is None else (lo + hi) // 2
        else:
            hi = blocks
            if blocks <= 1 or (lo is not None and hi - lo <= step):
                break
            blocks = max(blocks - stride, 1) if lo is None else (lo + hi) // 2
        if hi is None or lo is None:
            stride *= 2
        blocks = round_to(blocks, stages, lo, hi)
        if blocks in trials:
            break
    out = {"name": name, "stages": stages, "plan_guess": guess, "plan_bias": round(plan_bias, 4),
           "trials": list(trials.values()),
           "blocks": lo, "failed_at": hi}
    if lo is not None:
        best = trials[lo]
        plan = predict(base, lo, budget, device=device)
        out.update(compare(best["peaks_mb"], plan, name))
    return out


def plan_bias(configs: list[dict]) -> float:
    """Predicted over measured peak, averaged over every stage of the configurations so far (1
    before any): the plan's error is much the same across configurations (-3 to -4% at 2 GiB)."""
    errors = [e for c in configs for e in c.get("error_pct", []) if e is not None]
    return 1 + sum(errors) / len(errors) / 100 if errors else 1.0


def round_to(blocks: int, step: int, lo: int | None, hi: int | None) -> int:
    """A multiple of `step` strictly between lo and hi where one exists."""
    rounded = max(step, blocks // step * step)
    if (lo is None or rounded > lo) and (hi is None or rounded < hi):
        return rounded
    return blocks


def compare(peaks: dict, plan: dict, name: str) -> dict:
    """Measured VmHWM per process against the plan's per-stage prediction."""
    stage_keys = ["launcher"] if name == "naive" else [f"rank{s}" for s in range(len(plan["stages"]))]
    measured = {f"stage{s}": peaks.get(k) for s, k in enumerate(stage_keys)}
    predicted = [s["peak_mb"] for s in plan["stages"]]
    errors = [100 * (p - m) / m if m else None for p, m in zip(predicted, measured.values())]
    params = sum(s["params"] for s in plan["stages"])
    return {
        "params": params, "param_mb": params * 4 / 2**20,
        "measured_mb": {"launcher": peaks.get("launcher"), **measured},
        "predicted_mb": [round(p, 1) for p in predicted],
        "predicted_act_mb": [round(s["act_mb"], 1) for s in plan["stages"]],
        "error_pct": [round(e, 1) if e is not None else None for e in errors],
        "within_15pct": all(e is not None and abs(e) <= TARGETS["plan_error_pct"] for e in errors),
    }


def summarize(configs: list[dict]) -> dict:
    by = {c["name"]: c for c in configs}
    blocks = {k: by[k]["blocks"] for k in by}
    out: dict = {"blocks": blocks}
    if blocks.get("naive") and blocks.get("1"):
        out["remat_over_naive"] = round(blocks["1"] / blocks["naive"], 2)
    if blocks.get("1") and blocks.get("8"):
        out["stages8_over_remat1"] = round(blocks["8"] / blocks["1"], 2)
    out["plan_within_15pct"] = all(c.get("within_15pct", False) for c in configs)
    out["targets_met"] = (out.get("remat_over_naive", 0) >= TARGETS["remat_over_naive"]
                          and out.get("stages8_over_remat1", 0) >= TARGETS["stages8_over_remat1"]
                          and out["plan_within_15pct"])
    return out


def print_table(configs: list[dict], budget: float) -> None:
    print(f"\nlargest giant net within {budget:.0f} MiB per process (GPipe Table 1 layout)")
    header = f"{'config':>14} {'L':>5} {'params':>12} {'param MiB':>10} {'act MiB/stage':>14} {'peak MiB (max)':>15} {'plan err %':>16}"
    print(header)
    for c in configs:
        if c["blocks"] is None:
            print(f"{c['name']:>14} {'-':>5}  (nothing fits)")
            continue
        label = "naive" if c["name"] == "naive" else f"pipeline-{c['name']}"
        peak = max(v for v in c["measured_mb"].values() if v)
        errs = ",".join(f"{e:+.0f}" for e in c["error_pct"] if e is not None)
        print(f"{label:>14} {c['blocks']:>5} {c['params']:>12,} {c['param_mb']:>10.0f} "
              f"{max(c['predicted_act_mb']):>14.0f} {peak:>15.0f} {errs:>16}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mb", type=float, default=None,
                        help=f"per process (default 2048; --quick {QUICK_BUDGET_MB:.0f}; cuda {CUDA_BUDGET_MB:.0f})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: VmHWM of every process; cuda: max_memory_allocated on one GPU")
    parser.add_argument("--configs", default=None, help="comma list of naive,1,2,4,8")
    parser.add_argument("--quick", action="store_true", help="a small budget, 2 stages, one trial (the suite smoke-tests it)")
    parser.add_argument("--out", default="bench_capacity.json")
    parser.add_argument("--max-trials", type=int, default=4, help="training runs per configuration at most")
    parser.add_argument("--start-blocks", type=int, default=None, help="first trial's L (default: the plan's)")
    parser.add_argument("--resolution", type=float, default=RESOLUTION,
                        help="the search's step as a fraction of the first L (0: one block per stage)")
    parser.add_argument("overrides", nargs="*", help="extra giantpipe-train overrides")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    budget = args.budget_mb or (QUICK_BUDGET_MB if args.quick else CUDA_BUDGET_MB if cuda else 2048.0)
    names = (args.configs or ("2" if args.quick else "naive,1" if cuda else "naive,1,2,4,8")).split(",")
    if cuda and not set(names) <= {"naive", "1"}:
        parser.error("--device cuda measures one GPU: --configs naive,1")
    width = dict(CUDA_WIDTH if cuda else WIDTH, **({"data.max_bytes": 300000} if args.quick else {}))
    micro_batches = CUDA_WIDTH["data.batch_size"] if cuda else MICRO_BATCHES
    started, t0 = datetime.datetime.now(datetime.timezone.utc).isoformat(), time.perf_counter()
    meta = {"started": started, "device": args.device, "budget_mb": budget, "width": width,
            "micro_batches": micro_batches, "resolution": args.resolution,
            "overrides": args.overrides, "quick": args.quick, "loadavg_start": os.getloadavg()[0],
            "fixed_cost_mb": {"empty_process": round(empty_process_mb(), 1)}}
    if cuda:
        import torch

        meta["gpu"] = torch.cuda.get_device_name(0)
        print(f"budget {budget:.0f} MiB of tensors on {meta['gpu']} (max_memory_allocated)", flush=True)
    else:
        print(f"budget {budget:.0f} MiB per process; an empty process with torch + Lightning: "
              f"{meta['fixed_cost_mb']['empty_process']:.0f} MiB", flush=True)
    configs = []
    with tempfile.TemporaryDirectory(prefix="bench_capacity_") as workdir:
        for name in names:
            stages, strategy = config_overrides(name, micro_batches)
            base = [*QUIET, *(f"{k}={v}" for k, v in width.items()), *strategy, *(CUDA_RUN if cuda else []),
                    *args.overrides]
            configs.append(search(name, base, stages, budget, Path(workdir), args.quick,
                                  max_trials=1 if args.quick else args.max_trials, start=args.start_blocks,
                                  resolution=args.resolution, plan_bias=plan_bias(configs), device=args.device))
            partial = {"meta": {**meta, "partial": True}, "configs": configs}
            Path(args.out).write_text(json.dumps(partial, indent=2))  # a long run keeps what it has
    launchers = [t["peaks_mb"].get("launcher") for c in configs if c["name"] != "naive" for t in c["trials"]]
    meta["fixed_cost_mb"]["launcher"] = max((v for v in launchers if v), default=None)
    meta.update(seconds=round(time.perf_counter() - t0, 1), loadavg_end=os.getloadavg()[0])
    result = {"meta": meta, "configs": configs, "summary": summarize(configs)}
    print_table(configs, budget)
    print(json.dumps(result["summary"]))
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
