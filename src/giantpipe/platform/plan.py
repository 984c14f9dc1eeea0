"""`giantpipe-plan [overrides]`: will this configuration fit, before a single step runs?

    giantpipe-plan model.n_layers=96 strategy=pipeline strategy.stages=4 trainer.devices=4 \\
        --device-memory 2048            # MiB per process (default: strategy.memory_budget_mb)
    giantpipe-plan ... --json           # {"stages": [{"stage": s, "peak_mb": ...}], "fits": ...}
    giantpipe-plan ... --device cuda    # torch.cuda.max_memory_allocated per GPU instead

The model is built on the meta device; each distinct layer is profiled once on a one-sample
batch of the configured data, in the run's `trainer.precision` (strategies/memory_model.py).
The per-process fixed cost is measured here: this process's own resident memory once the
training stack is imported and the data loaded, plus what a training process adds on top
(TRAINER_EXTRA_MB; a pipeline stage's worker, forked from a preloaded server,
STAGE_WORKER_EXTRA_MB). The predicted peak of each stage is what `VmHWM` of that stage's process
will show; scripts/bench_capacity.py checks it against the measurement. On CUDA (`--device
cuda`, the default where the run would train on a GPU) it is what
`torch.cuda.max_memory_allocated` will show: tensors only.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from giantpipe.models.keyed_dropout import KEY, sample_keys
from giantpipe.platform.config import ConfigError
from giantpipe.platform.proc_memory import status_kb
from giantpipe.strategies.memory_model import (
    MemoryModel,
    StageMemory,
    precision_dtypes,
    profile_layers,
)
from giantpipe.strategies.partition import _layer_time, _leaf_inputs, _materialized
from giantpipe.strategies.rules import CHECKPOINT_MODES

# A training process's resident memory beyond an idle process that imported the same stack and
# loaded the same data: trainer, loop and logger objects, the gloo group, the dataloader's
# batches, the allocator's first arenas. Measured with a one-layer model (bench_capacity.py).
TRAINER_EXTRA_MB = 40.0
# A pipeline stage's worker forks from a server that imported the stack (fork_server.py): the
# library pages it never touches are not resident in it, so it starts below this process.
# Measured: a 2-block stage peaked at 410 MiB where this process + TRAINER_EXTRA_MB gave 474.
STAGE_WORKER_EXTRA_MB = TRAINER_EXTRA_MB - 64.0


@dataclass
class Plan:
    """The prediction for one configuration: per-stage memory, step time, and the verdict."""

    strategy: str
    stages: list[StageMemory]
    step_s: float
    budget_mb: float | None
    suggestions: list[str] = field(default_factory=list)
    device: str = "cpu"

    @property
    def fits(self) -> bool | None:
        if self.budget_mb is None:
            return None
        return max(s.peak_mb for s in self.stages) <= self.budget_mb

    def as_dict(self) -> dict:
        return {"strategy": self.strategy, "device": self.device, "stages": [s.as_dict() for s in self.stages],
                "step_s": self.step_s, "budget_mb": self.budget_mb, "fits": self.fits,
                "suggestions": self.suggestions}


def plan_device(cfg: DictConfig) -> str:
    """`cuda` where `cfg` would train on a GPU, else `cpu`."""
    accelerator = cfg.trainer.accelerator
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def fixed_cost_mb(cfg: DictConfig, device: str = "cpu") -> float:
    """This process's resident memory now (imports and data done), plus what the process that
    trains `cfg` adds: the launcher itself, or a forked stage worker. On CUDA none of it is
    tensor memory on the device."""
    if device == "cuda":
        return 0.0
    pipeline = cfg.strategy.name == "pipeline"
    return (status_kb("self", "VmRSS") or 0) / 1024 + (STAGE_WORKER_EXTRA_MB if pipeline else TRAINER_EXTRA_MB)


def one_sample(data) -> dict:
    """One training sample (with its dropout key), the profile's input."""
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    sample = {k: v[:1] for k, v in batch.items()}
    sample[KEY] = sample_keys(0, 0, 0, 1)
    return sample


def training_precision(cfg: DictConfig) -> str:
    """The precision the run trains in (`auto` resolved as giantpipe-train resolves it)."""
    from giantpipe.platform.build import resolved_precision

    precision = resolved_precision(cfg.trainer.precision)
    try:
        precision_dtypes(precision)
    except ValueError as err:
        raise ConfigError(f"trainer.precision={precision}: {err}") from None
    return precision


def memory_model(cfg: DictConfig, task, sample: dict, fixed_mb: float, profiles=None,
                 **overrides) -> MemoryModel:
    """The memory model of `cfg` (overrides: micro_batches, checkpoint, schedule, device)."""
    strategy = cfg.strategy
    precision = training_precision(cfg)
    pipeline = strategy.name == "pipeline"
    settings = {
        "micro_batches": strategy.micro_batches if pipeline else 1,
        "schedule": strategy.schedule if pipeline else "gpipe",
        "checkpoint": strategy.checkpoint if pipeline else "single",
        **overrides,
    }
    if profiles is None:
        profiles = profile_layers(task.model, sample, seed=cfg.seed, loss_fn=task.loss_fn, precision=precision)
    replicas = strategy.replicas if pipeline else 1
    first_input = sum(v.numel() * v.element_size() for k, v in sample.items())
    return MemoryModel(profiles, batch_size=cfg.data.batch_size // replicas, fixed_mb=fixed_mb,
                       first_input_bytes=first_input, param_itemsize=precision_dtypes(precision)[0].itemsize,
                       **settings)


def stage_balance(cfg: DictConfig, model: MemoryModel, task, num_stages: int) -> list[int]:
    from giantpipe.strategies.partition import balance_by_cost, param_costs

    balance = cfg.strategy.get("balance", "params")
    if not isinstance(balance, str) and len(balance) == num_stages:
        return list(balance)
    if balance == "memory":
        return model.balance(num_stages)
    return balance_by_cost(param_costs(task.model), num_stages)


def predict_step_s(task, sample: dict, balance: list[int], micro_batches: int, batch: int,
                   checkpoint: str) -> float:
    """Rough step time: per-layer forward+backward on one sample, scaled to a micro-batch; the
    slowest stage sets the pace for (M + stages - 1) slots (GPipe's bubble)."""
    times, carry, cache = [], task.model.first_carry(sample), {}
    for i, layer in enumerate(task.model.layers):
        key = (type(layer), tuple(p.shape for p in layer.parameters()))
        with _materialized(task.model, i, "cpu", 0):
            if key not in cache:
                cache[key] = _layer_time(task.model, i, _leaf_inputs(carry), repeats=1)
            with torch.no_grad():
                carry = task.model.run_layers(dict(carry), [i])
        times.append(cache[key])
    per_sample = [sum(times[i] for i in range(start, start + n))
                  for start, n in zip([sum(balance[:s]) for s in range(len(balance))], balance)]
    recompute = 4 / 3 if checkpoint in ("always", "except_last") else 1.0
    slot = max(per_sample) * batch / micro_batches * recompute
    return slot * (micro_batches + len(balance) - 1)


def make_plan(cfg: DictConfig, *, budget_mb: float | None = None, suggest: bool = True,
              built: tuple | None = None, device: str | None = None) -> Plan:
    """Build the data and the meta model as a training run would (or take `built`, build_task's
    result), and predict every stage (on `device`: cpu or cuda; default `plan_device`)."""
    from giantpipe.platform.build import build_task

    data, task, _ = built or build_task(cfg)
    sample = one_sample(data)
    device = device or plan_device(cfg)
    fixed = fixed_cost_mb(cfg, device)
    strategy = cfg.strategy
    pipeline = strategy.name == "pipeline"
    num_stages = strategy.stages if pipeline else 1
    model = memory_model(cfg, task, sample, fixed, device=device)
    balance = stage_balance(cfg, model, task, num_stages)
    budget = budget_mb if budget_mb is not None else (strategy.get("memory_budget_mb") if pipeline else None)
    micro = model.micro_batches
    plan = Plan(strategy.name, model.predict(balance),
                predict_step_s(task, sample, balance, micro, model.batch_size, model.checkpoint), budget,
                device=device)
    if suggest and plan.fits is False:
        plan.suggestions = suggestions(cfg, task, sample, fixed, budget, device)
    return plan


def suggestions(cfg, task, sample, fixed: float, budget: float, device: str = "cpu") -> list[str]:
    """The smallest stage count that fits, for each re-materialization mode (or none fits).
    More stages never raise the largest stage's predicted peak, so the count is bisected."""
    most = min(len(task.model.layers), 64)
    micro = cfg.strategy.micro_batches if cfg.strategy.name == "pipeline" else 1
    micro = min(micro if micro > 1 else 4, cfg.data.batch_size)
    out = []
    for checkpoint in CHECKPOINT_MODES:
        model = memory_model(cfg, task, sample, fixed, checkpoint=checkpoint, micro_batches=micro, device=device)

        def peak(stages: int, model: MemoryModel = model) -> float:
            return max(s.peak_mb for s in model.predict(model.balance(stages)))

        if peak(most) > budget:
            continue
        lo, hi = 0, most  # peak(lo) > budget (or lo = 0), peak(hi) <= budget
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if peak(mid) <= budget else (mid, hi)
        out.append(f"fits with: strategy=pipeline strategy.stages={hi} trainer.devices={hi} "
                   f"strategy.checkpoint={checkpoint} strategy.micro_batches={micro} "
                   f"strategy.balance=memory (largest stage {peak(hi):.0f} MiB)")
    return out or [f"nothing fits: no stage count up to {most} fits {budget:.0f} MiB per process: "
                   f"a smaller batch, more micro-batches or a smaller model"]


def largest_blocks(cfg: DictConfig, budget: float, built: tuple | None = None, limit: int = 8192,
                   device: str = "cpu") -> int:
    """The most Transformer blocks (`model.n_layers` of the giant net) whose largest predicted
    stage fits `budget` MiB, at this configuration's width, batch and strategy (0: none)."""
    from giantpipe.platform.build import build_task

    data, task, _ = built or build_task(cfg)
    sample = one_sample(data)
    fixed = fixed_cost_mb(cfg, device)
    profiles = profile_layers(task.model, sample, seed=cfg.seed, loss_fn=task.loss_fn,
                              precision=training_precision(cfg))
    if len(profiles) < 3:
        raise ConfigError("--largest searches model.n_layers of the giant net: give model.n_layers>=1")
    stages = cfg.strategy.stages if cfg.strategy.name == "pipeline" else 1

    def fits(blocks: int) -> bool:
        model = memory_model(cfg, task, sample, fixed, [profiles[0], *[profiles[1]] * blocks, profiles[-1]],
                             device=device)
        return model.fits(stages, budget)

    lo, hi = 0, max(stages - 2, 1)
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def plan_table(plan: Plan):
    """The per-stage prediction as a rich Table."""
    from rich.table import Table

    verdict = "" if plan.fits is None else (" — fits" if plan.fits else " — DOES NOT FIT")
    unit = "GPU (tensors)" if plan.device == "cuda" else "process"
    budget = f" in {plan.budget_mb:.0f} MiB per {unit}" if plan.budget_mb is not None else ""
    table = Table(title=f"giantpipe-plan: predicted peak memory (MiB) per {unit}{budget}{verdict}",
                  caption=f"predicted step time ~{plan.step_s:.2f} s (rough; no load from other work)")
    step = plan.device == "cuda"  # the optimizer step's temporaries (none on CPU)
    for name in ("stage", "layers", "params", "weights", "grads", "AdamW", *(["AdamW step"] if step else []),
                 "activ.", "fixed", "peak"):
        table.add_column(name, justify="right")
    for s in plan.stages:
        over = plan.budget_mb is not None and s.peak_mb > plan.budget_mb
        peak = f"[bold red]{s.peak_mb:.0f}[/]" if over else f"{s.peak_mb:.0f}"
        table.add_row(str(s.stage), s.layers, f"{s.params / 1e6:.1f}M", f"{s.param_mb:.0f}", f"{s.grad_mb:.0f}",
                      f"{s.optim_mb:.0f}", *([f"{s.optim_step_mb:.0f}"] if step else []), f"{s.act_mb:.0f}",
                      f"{s.fixed_mb:.0f}", peak)
    return table


def render(plan: Plan) -> str:
    """The table and the fix as plain text (for error messages)."""
    from rich.console import Console

    console = Console(width=120, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(plan_table(plan))
    lines = [console.export_text()]
    lines += plan.suggestions
    return "\n".join(lines)


def check_budget(cfg: DictConfig, built: tuple | None = None) -> None:
    """Stop before training if a stage is predicted not to fit `strategy.memory_budget_mb`, or,
    unset, on CUDA the GPU's memory (the tensors alone, a lower bound of what the card needs);
    the error carries the plan's table and the fix."""
    if cfg.strategy.name != "pipeline":
        return
    budget = cfg.strategy.get("memory_budget_mb")
    limit = f"strategy.memory_budget_mb={budget}"
    if budget is None and plan_device(cfg) == "cuda" and torch.cuda.is_available():
        budget = torch.cuda.get_device_properties(0).total_memory / 2**20
        limit = f"the {budget:.0f} MiB of the GPU ({torch.cuda.get_device_name(0)})"
    if budget is None:
        return
    plan = make_plan(cfg, built=built, budget_mb=budget)
    if plan.fits is False:
        worst = max(plan.stages, key=lambda s: s.peak_mb)
        raise ConfigError(
            f"stage {worst.stage} is predicted to peak at {worst.peak_mb:.0f} MiB, over {limit}:\n{render(plan)}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="giantpipe-plan", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="the same overrides giantpipe-train takes")
    parser.add_argument("--device-memory", type=float, default=None,
                        help="MiB per process (default: strategy.memory_budget_mb)")
    parser.add_argument("--json", action="store_true", help="print the prediction as JSON")
    parser.add_argument("--largest", action="store_true",
                        help="also find the most blocks (model.n_layers) that fit --device-memory")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="predict VmHWM of a CPU process or max_memory_allocated of a GPU "
                             "(default: where trainer.accelerator would train)")
    args = parser.parse_args(argv)
    from giantpipe.platform import preflight
    from giantpipe.platform.checks import validate_config as validate

    try:
        preflight.check(args.overrides)
        cfg = preflight.compose_train(args.overrides)
        validate(cfg)
        from giantpipe.platform.build import build_task

        built = build_task(cfg)  # data and the meta model, once for both questions
        plan = make_plan(cfg, budget_mb=args.device_memory, built=built, device=args.device)
        largest = None
        if args.largest:
            if plan.budget_mb is None:
                raise ConfigError("--largest needs --device-memory (or strategy.memory_budget_mb)")
            largest = largest_blocks(cfg, plan.budget_mb, built=built, device=plan.device)
    except ConfigError as err:
        print(f"giantpipe-plan: error: {err}", file=sys.stderr)
        sys.exit(2)
    if args.json:
        print(json.dumps({**plan.as_dict(), "largest_blocks": largest}, indent=2))
    else:
        from rich.console import Console

        console = Console()
        console.print(plan_table(plan))
        for line in plan.suggestions:
            console.print(line)
        if largest is not None:
            console.print(f"the most blocks that fit {plan.budget_mb:.0f} MiB: model.n_layers={largest}")
    sys.exit(0 if plan.fits in (True, None) else 1)


if __name__ == "__main__":
    main()
