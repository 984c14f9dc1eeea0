"""The pipeline as a Lightning strategy: Lightning keeps the loop, the engine owns the step.

Lightning's automatic optimization runs `training_step`, then `zero_grad`, then `backward`.
The pipeline computes a mini-batch's forward *and* backward inside `training_step` (1F1B
interleaves them, so they cannot be split), so the runner parks the gradients before
Lightning zeroes them and `backward` hands them back. Optimizer and scheduler steps,
gradient clipping (global norm across stages), logging and checkpoint callbacks stay
Lightning's.

Built on `DDPStrategy` for process-group setup and cluster environments, with four
deliberate differences: no DDP wrapper (replicas all-reduce inside each stage's group), no
`_sync_module_states` (it would copy rank 0's stage over every other stage), one checkpoint
shard per stage (the default saves rank 0 only and loses the other stages; shards reshard to
any stage count, optimizer state included), and a rendezvous that names a stage that never
joins (strategies/rendezvous.py).
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _init_dist_connection
from lightning.fabric.utilities.optimizer import _optimizer_to_device, _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from giantpipe.strategies import schedule_auto
from giantpipe.strategies.batchnorm import DeferredBatchNorm
from giantpipe.strategies.engine import PipelineEngine
from giantpipe.strategies.faults import maybe_inject_in_save, maybe_skip_join
from giantpipe.strategies.memory_model import memory_balance
from giantpipe.strategies.partition import (
    auto_balance,
    partition_table,
    validate_balance,
)
from giantpipe.strategies.pipeline_runner import PipelineRunner
from giantpipe.strategies.rendezvous import join_store
from giantpipe.strategies.rules import check_stage_count
from giantpipe.strategies.schedule import LIST_SCHEDULED, check_schedule, owner
from giantpipe.strategies.stage_checkpoint import (
    MANIFEST,
    atomic_save,
    consolidate,
    is_manifest,
    load_shard,
    manifest_entry,
    next_generation,
    optimizer_param_names,
    read_file,
    read_manifest,
    select_optimizer_state,
    shard_path,
    shard_stamp,
    split_shard,
    stale_files,
)
from giantpipe.strategies.topology import Topology

log = logging.getLogger(__name__)


class PipelineStrategy(DDPStrategy):
    """GPipe across `stages x replicas` processes (gloo on CPU, NCCL on GPU)."""

    strategy_name = "giantpipe_pipeline"

    def __init__(self, cfg, **kwargs):
        super().__init__(timeout=timedelta(seconds=cfg.timeout_s), **kwargs)
        self.cfg = cfg
        placement = [list(r) for r in cfg.placement] if cfg.placement else None
        self.topology = Topology(cfg.stages, cfg.replicas, placement)  # validated once, read everywhere
        self.runner: PipelineRunner | None = None
        self._balances: dict[tuple[int, str], list[int]] = {}  # by (virtual_stages, placement)
        self.saves = 0  # checkpoints this process has saved (fault injection counts them)

    # ------------------------------------------------------------------ placement
    @property
    def distributed_sampler_kwargs(self) -> dict:
        """All stages of one replica read the same batches; replicas split each global batch."""
        return {"num_replicas": self.cfg.replicas, "rank": self.topology.replica_of(self.global_rank)}

    def place_task(self, task) -> PipelineRunner:
        """Build this rank's stage of `task.model` (called from the task's `configure_model`)."""
        if self.runner is not None:
            return self.runner
        if self.cfg.deferred_batch_norm:
            DeferredBatchNorm.convert(task.model, self.cfg.micro_batches)
        if self.cfg.schedule == "auto":
            engine = self.auto_schedule(task)
        else:
            engine = self.build_engine(task, self.cfg.schedule, self.virtual_stages)
        if self.cfg.get("schedule_costs", "equal") == "profiled" and engine.schedule in LIST_SCHEDULED:
            self.profile_schedule(task, engine)
        if self.global_rank == 0:
            from rich.console import Console

            Console().print(self.partition(task, engine))
        self.runner = PipelineRunner(engine, self.cfg.timeout_s, self.cfg.get("memory_budget_mb"))
        return self.runner

    def build_engine(self, task, schedule: str, chunks: int, groups=None) -> PipelineEngine:
        return PipelineEngine(
            task.model,
            task.loss_fn,
            self.resolve_balance(task, chunks, check_schedule(schedule, chunks).placement),
            micro_batches=self.cfg.micro_batches,
            topology=self.topology,
            schedule=schedule,
            checkpoint=self.cfg.checkpoint,
            device=self.root_device,
            seed=task.seed,
            virtual_stages=chunks,
            groups=groups,
        )

    def auto_schedule(self, task) -> PipelineEngine:
        """Profile a few zb_h1 steps, predict every schedule and V (strategies/schedule_auto.py),
        print why, and rebuild the engine with the choice (same process groups)."""
        engine = self.build_engine(task, schedule_auto.PROFILE_SCHEDULE, 1)
        try:
            profile = schedule_auto.profile_engine(engine, self.profile_batch(task))
        except Exception as err:
            raise ValueError(f"strategy.schedule=auto could not profile a training step ({err}); "
                             f"choose a schedule by name (strategy.schedule=zb_h1, ...)") from err
        profiles = schedule_auto.gather_profiles(profile, engine.stage, self.cfg.stages)
        layers = len(task.model.layers)
        max_chunks = 1 if not isinstance(self.cfg.balance, str) else min(2, layers // self.cfg.stages)
        best, predictions = schedule_auto.choose(
            profiles, self.cfg.micro_batches, self.cfg.get("memory_budget_mb"), max_chunks
        )
        if self.global_rank == 0:
            print(schedule_auto.explain(best, predictions), flush=True)
        if (best.schedule, best.chunks) == (engine.schedule, engine.virtual_stages):
            return engine
        return self.build_engine(task, best.schedule, best.chunks, groups=engine.groups)

    def profile_batch(self, task):
        """The first training batch, as the profiling steps see it."""
        batch = next(iter(task.trainer.datamodule.train_dataloader()))
        if hasattr(task, "with_sample_keys"):  # keyed dropout reads per-sample keys
            batch = task.with_sample_keys(batch, 0)
        return batch

    def profile_schedule(self, task, engine: PipelineEngine) -> None:
        """`strategy.schedule_costs=profiled`: time every rank's F, B and W per chunk in a few
        steps, rebuild the schedule's lists for those times (kept only if the simulation says
        the step gets shorter) and print both predictions."""
        try:
            cost = schedule_auto.profile_costs(engine, self.profile_batch(task))
        except Exception as err:
            raise ValueError(f"strategy.schedule_costs=profiled could not profile a training step "
                             f"({err}); use strategy.schedule_costs=equal") from err  # fmt: skip
        engine.replan(cost)
        if self.global_rank == 0:
            print(schedule_auto.explain_costs(cost, engine.schedule, self.cfg.stages,
                                              self.cfg.micro_batches, engine.virtual_stages), flush=True)  # fmt: skip

    def partition(self, task, engine: PipelineEngine):
        """The partition table: one row per virtual stage, with the ranks holding it."""
        balance = self.resolve_balance(task, engine.virtual_stages, engine.placement)
        holders = [owner(k, self.cfg.stages, engine.placement)[0] for k in range(len(balance))]
        ranks = [self.topology.stage_ranks(s) for s in holders]
        return partition_table(task.model, balance, ranks=ranks)

    @property
    def virtual_stages(self) -> int:
        """Chunks per stage (V); the balance lists stages x V layer counts."""
        return int(self.cfg.get("virtual_stages", 1) or 1)

    def resolve_balance(self, task, chunks: int | None = None, placement: str = "looped") -> list[int]:
        """The layer counts per virtual stage: given, or chosen automatically (balancing each
        rank's chunks together, as `placement` puts them). A measured balance (time, memory) is
        measured on rank 0 and broadcast: each rank timing its own run could pick other cuts,
        and stages built from different partitions exchange the wrong carries."""
        balance = self.cfg.balance
        num_layers = len(task.model.layers)
        chunks = self.virtual_stages if chunks is None else chunks
        key = (chunks, placement)
        if key in self._balances:  # measured balances are measured once (on every rank together)
            return self._balances[key]
        parts = self.cfg.stages * chunks
        check_stage_count(parts, num_layers)
        measured = balance in ("time", "memory")
        if measured and self.global_rank != 0:
            balance = None
        elif balance == "memory":  # the same memory model as giantpipe-plan
            sample = next(iter(task.trainer.datamodule.train_dataloader()))
            balance = memory_balance(task.model, task.loss_fn, sample, parts,
                                     micro_batches=self.cfg.micro_batches, schedule=self.cfg.schedule,
                                     checkpoint=self.cfg.checkpoint, seed=task.seed,
                                     precision=str(task.trainer.precision))
        elif isinstance(balance, str):
            sample = next(iter(task.trainer.datamodule.train_dataloader())) if measured else None
            balance = auto_balance(task.model, self.cfg.stages, by=balance, sample=sample,
                                   chunks=chunks, placement=placement, seed=task.seed,
                                   loss_fn=task.loss_fn)  # fmt: skip
        if measured and self.world_size > 1:
            balance = self.broadcast(balance, src=0)
        self._balances[key] = validate_balance(list(balance), num_layers, parts)
        return self._balances[key]

    # ------------------------------------------------------------------ Lightning hooks
    def setup_distributed(self) -> None:
        """As DDP's, with a rendezvous that names a stage that never joins (strategies/rendezvous.py)."""
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = self._get_process_group_backend()
        if dist.is_initialized():
            return
        env = self.cluster_environment
        maybe_skip_join(self.topology.stage_of(self.global_rank))

        def describe(rank: int) -> str:
            stage, replica = self.topology.coords(rank)
            return f"stage {stage} (rank {rank}, replica {replica})"

        store = join_store(env.main_address, env.main_port, self.global_rank, self.world_size, self._timeout,
                           describe)
        device_id = self.root_device if self.root_device.type != "cpu" else None
        _init_dist_connection(env, self._process_group_backend, timeout=self._timeout, store=store,
                              device_id=device_id)

    def model_to_device(self) -> None:
        """The engine already placed this stage's layers; the rest stay on meta."""

    def configure_ddp(self) -> None:
        """No DDP wrapper: replicas of a stage all-reduce in the engine's stage group."""

    def setup(self, trainer) -> None:
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        self.precision_plugin.clip_grad_by_norm = self.clip_grad_by_global_norm
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def clip_grad_by_global_norm(self, optimizer, clip_val: float) -> None:
        """Clip by the norm over *all* stages, as `strategy=single` clips the whole model."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = global_grad_norm(params, self.cfg.replicas)
        scale = float(clip_val) / (float(norm) + 1e-6)
        if scale < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)

    def teardown(self) -> None:
        """As Lightning's, minus moving the module to CPU: other stages' layers are on meta."""
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    def backward(self, closure_loss: Tensor, optimizer, *args, **kwargs) -> Tensor:
        """Hand back the gradients the pipeline computed in training_step, between the
        on_before_backward / on_after_backward hooks Lightning's own backward calls (the
        non-finite guard reads the loss there)."""
        trainer = self.lightning_module.trainer
        call._call_callback_hooks(trainer, "on_before_backward", closure_loss)
        call._call_lightning_module_hook(trainer, "on_before_backward", closure_loss)
        self.runner.restore_gradients(1.0 / trainer.accumulate_grad_batches)
        call._call_callback_hooks(trainer, "on_after_backward")
        call._call_lightning_module_hook(trainer, "on_after_backward")
        return closure_loss

    def _get_process_group_backend(self) -> str:
        return "nccl" if self.root_device.type == "cuda" else "gloo"

    # ------------------------------------------------------------------ checkpoints: one shard per stage
    def lightning_module_state_dict(self) -> dict:
        return {k: v for k, v in self.lightning_module.state_dict().items() if not v.is_meta}

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """Replica 0 of each stage writes its shard, then rank 0 the manifest (stage_checkpoint)
        with every shard's SHA-256: shards under the names the current manifest at `filepath`
        does not use, stamped with this save's id, so a crash anywhere in between leaves the
        previous checkpoint whole. (The task added the optimizer's parameter names.)"""
        stage, replica = self.topology.coords(self.global_rank)
        previous = read_manifest(filepath) if self.global_rank == 0 else None
        generation, save_id = self.broadcast((next_generation(previous), uuid.uuid4().hex), src=0)
        shard = split_shard(checkpoint)
        shard["giantpipe_shard"] = shard_stamp(stage, self.cfg.stages, save_id)
        digest = None
        if replica == 0:
            digest = atomic_save(shard, shard_path(filepath, stage, self.cfg.stages, generation))
            maybe_inject_in_save(stage, self.saves, self.cfg.timeout_s)
        self.saves += 1
        digests = self.gather_digests((stage, digest))  # also the barrier: every shard is on disk
        if self.global_rank == 0:
            order = [name for name, _ in self.lightning_module.named_parameters()]
            manifest = manifest_entry(filepath, self.cfg.stages, order, generation, save_id, digests)
            manifest["virtual_stages"] = self.virtual_stages  # which layers each shard holds
            checkpoint[MANIFEST] = manifest
            atomic_save(checkpoint, Path(filepath))
            for stale in stale_files(filepath, previous, manifest):
                stale.unlink(missing_ok=True)

    def gather_digests(self, mine: tuple[int, str | None]) -> list[str]:
        """Every stage's shard checksum, in stage order (from the replica that wrote it)."""
        if not (dist.is_available() and dist.is_initialized()):
            return [mine[1]]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        by_stage = {stage: digest for stage, digest in gathered if digest is not None}
        return [by_stage[s] for s in range(self.cfg.stages)]

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        checkpoint = read_file(checkpoint_path)
        if not is_manifest(checkpoint):  # one file (consolidated or strategy=single): each stage takes its share
            return checkpoint
        manifest = checkpoint[MANIFEST]
        layout = (manifest["stages"], manifest.get("virtual_stages", 1))
        if layout != (self.cfg.stages, self.virtual_stages):
            # Resharding: the shards are mapped, and this rank reads and merges (optimizer states
            # by parameter name) only its own parameters' share (load_model/optimizer_state_dict).
            local = set(self.lightning_module_state_dict())
            checkpoint = consolidate(checkpoint_path, checkpoint, keep=local.__contains__)
            if checkpoint["optimizer_states"]:
                log.info("%s has %d stages, this run %d: resharding weights and optimizer state",
                         checkpoint_path, manifest["stages"], self.cfg.stages)
            else:
                log.warning("%s has %d stages, this run %d, and its shards do not name their optimizer's "
                            "parameters: resharding the weights; the optimizer and LR schedule restart",
                            checkpoint_path, manifest["stages"], self.cfg.stages)
            return checkpoint
        checkpoint.update(load_shard(checkpoint_path, manifest, self.topology.stage_of(self.global_rank)))
        return checkpoint

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        local = self.lightning_module_state_dict()
        missing = [k for k in local if k not in checkpoint["state_dict"]]
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} weights of this stage, e.g. {missing[:3]}")
        self.lightning_module.load_state_dict({k: checkpoint["state_dict"][k] for k in local}, strict=False)

    def load_optimizer_state_dict(self, checkpoint) -> None:
        """Each optimizer takes its parameters' state by name: any stage count saved it."""
        saved_names = checkpoint.get("optimizer_param_names")
        states = checkpoint["optimizer_states"]
        if saved_names is None:
            if states and self.cfg.stages > 1 and not is_manifest(checkpoint):
                log.warning("the checkpoint's optimizer state does not name its parameters, so it cannot be "
                            "split into stages; the optimizer restarts (the weights are loaded)")
                return
            super().load_optimizer_state_dict(checkpoint)
            return
        local_names = optimizer_param_names(self.optimizers, self.lightning_module)
        for optimizer, state, saved, local in zip(self.optimizers, states, saved_names, local_names, strict=True):
            optimizer.load_state_dict(select_optimizer_state(state, saved, local))
            _optimizer_to_device(optimizer, self.root_device)

    def remove_checkpoint(self, filepath) -> None:
        if self.global_rank == 0:
            manifest = read_manifest(filepath)
            listed = [Path(filepath).parent / f for f in manifest["files"]] if manifest else []
            for generation in (0, 1):  # and shards a crash left unlisted
                listed += [shard_path(filepath, s, self.cfg.stages, generation) for s in range(self.cfg.stages)]
            for path in listed:
                path.unlink(missing_ok=True)
            Path(filepath).unlink(missing_ok=True)


def global_grad_norm(parameters, replicas: int = 1) -> Tensor:
    """The L2 gradient norm over all stages (each rank holds only its stage's gradients;
    replicas hold identical, already all-reduced copies, so they are counted once)."""
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    device = parameters[0].device if parameters else torch.device("cpu")  # NCCL needs device tensors
    squares = torch.zeros((), dtype=torch.float64, device=device)
    if grads:  # per-tensor norms in one foreach kernel, as clip_grad_norm_ computes them
        squares = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True).double().square()
    if dist.is_initialized():
        dist.all_reduce(squares)
    return (squares / replicas).sqrt()


__all__ = ["PipelineStrategy", "PipelineRunner", "global_grad_norm"]
