"""The task base: Lightning hooks written once, the forward/backward delegated to a runner.

A task never asks which strategy runs it. `self.runner` computes a step's loss: by default
`LocalRunner` (the whole model in this process; Lightning does the backward), and the pipeline
strategy swaps in its own runner, which runs the micro-batch schedule across processes.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import hydra
import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from giantpipe.models.beam_search import BeamSearchResult, beam_search
from giantpipe.models.candidate_sampling import sample_candidates
from giantpipe.models.contract import Batch, LayeredModel, SumLoss, materialize
from giantpipe.models.keyed_dropout import KEY, sample_keys
from giantpipe.platform.config import ConfigError
from giantpipe.platform.data.sampling import replica_of
from giantpipe.strategies.stage_checkpoint import (
    CheckpointError,
    load_checkpoint,
    optimizer_param_names,
)


class LocalRunner:
    """The whole layer list in this process: loss = sum-loss / normalizer, as the pipeline does."""

    def __init__(self, model: LayeredModel, loss_fn: SumLoss):
        self.model, self.loss_fn = model, loss_fn

    def train_loss(self, batch: Batch) -> Tensor:
        return self.loss_fn(self.model(batch), batch) / self.loss_fn.normalizer(batch)

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> Tensor:
        return self.train_loss(batch)

    @torch.no_grad()
    def decode(self, batch: Batch, **search) -> BeamSearchResult:
        """Beam search over a batch (`beam_search`'s keyword arguments) for seq2seq models."""
        encoded = self.model.encode(batch)
        return beam_search(self.model.step_decoder(), encoded, encoded["src_len"], **search)

    @torch.no_grad()
    def sample(self, batch: Batch, **sampling) -> BeamSearchResult:
        """Sampled candidates over a batch (`sample_candidates`' keyword arguments)."""
        encoded = self.model.encode(batch)
        return sample_candidates(self.model.step_decoder(), encoded, encoded["src_len"], **sampling)


class Task(pl.LightningModule):
    """Shared training machinery: meta-device model, per-layer seeded init, the configured
    optimizer and LR schedule (`optim`: {optimizer, lr_schedule} config nodes)."""

    def __init__(self, model_factory, loss_fn: SumLoss, optim, seed: int):
        super().__init__()
        self.optim_cfg, self.seed, self.loss_fn = optim, seed, loss_fn
        with torch.device("meta"):
            self.model: LayeredModel = model_factory()
        self.runner = None
        self.samples_seen = 0
        self.tokens_seen = 0

    # ----------------------------------------------------------- model placement
    def configure_model(self) -> None:
        """Materialize the model: all of it here, or only this stage's share under a pipeline."""
        if self.runner is not None:
            return
        place_task = getattr(self.trainer.strategy, "place_task", None)
        if place_task is not None:
            self.runner = place_task(self)
        else:
            materialize(self.model, range(len(self.model.layers)), self.device, self.seed)
            self.runner = LocalRunner(self.model, self.loss_fn)

    def local_parameters(self):
        """Parameters this process holds (a pipeline stage leaves the others on meta)."""
        return [p for p in self.parameters() if not p.is_meta]

    def load_weights(self, path: str) -> None:
        """Start from a checkpoint's weights (fresh optimizer and step count), e.g. a CE model for MWER."""
        if not Path(path).exists():
            raise ConfigError(f"init_from={path}: no such checkpoint file")
        try:
            # any kind (one file, or a manifest and its stage shards), memory-mapped: a pipeline
            # stage reads only its own layers' weights (on_fit_start)
            state = load_checkpoint(path, mmap=True)
        except CheckpointError as err:
            raise ConfigError(f"init_from={path}: {err}") from None
        self._pending_weights = state.get("state_dict", state)

    def on_fit_start(self) -> None:
        pending = getattr(self, "_pending_weights", None)
        if pending is not None:
            local = {k for k, v in self.state_dict().items() if not v.is_meta}
            missing = local - set(pending)
            if missing:
                raise ValueError(f"init_from checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
            self.load_state_dict({k: v for k, v in pending.items() if k in local}, strict=False)
            self._pending_weights = None

    # ----------------------------------------------------------- exact resume
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save the RNG streams too, so a resumed run draws the same dropout masks, and the
        optimizer's parameter names, so a pipeline of any stage count can take its state."""
        checkpoint["rng_states"] = rng_states()
        if self.trainer.optimizers and "optimizer_states" in checkpoint:
            checkpoint["optimizer_param_names"] = optimizer_param_names(self.trainer.optimizers, self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            self._rng_to_restore = checkpoint["rng_states"]

    def on_train_start(self) -> None:
        states = getattr(self, "_rng_to_restore", None)
        if states is not None:
            set_rng_states(states)
            self._rng_to_restore = None

    # ----------------------------------------------------------- optimization
    def configure_optimizers(self):
        """The `optim` option (a `_partial_` torch.optim class) over this process's parameters,
        in two groups: matrices with the option's weight decay, vectors (biases, norms) without;
        and the `lr_schedule` option as a per-step multiplier of its learning rate."""
        optimizer_cfg, schedule = self.optim_cfg.optimizer, self.optim_cfg.lr_schedule
        decay = [p for p in self.local_parameters() if p.ndim >= 2]
        no_decay = [p for p in self.local_parameters() if p.ndim < 2]
        make_optimizer = hydra.utils.instantiate(optimizer_cfg, _convert_="all")
        optimizer = make_optimizer([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        total = max(int(total), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------- steps
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self.runner.train_loss(self.with_sample_keys(batch, batch_idx))
        self.count_batch(batch)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=self.batch_items(batch))
        return loss

    def with_sample_keys(self, batch: Batch, batch_idx: int) -> Batch:
        """Add each sample's dropout key: (seed, step, position in the *global* batch), so the
        masks are the same whatever the stages, micro-batches or replicas (KeyedDropout)."""
        size = self.batch_items(batch)
        _, replica = replica_of(self.trainer)
        step = self.global_step * 65_537 + batch_idx  # distinct for batches accumulated into one step
        keys = sample_keys(self.seed, step, replica * size, size, device=self.device)
        return {**batch, KEY: keys}

    def count_batch(self, batch: Batch) -> None:
        self.samples_seen += self.batch_items(batch)
        self.tokens_seen += self.batch_tokens(batch)

    @staticmethod
    def batch_items(batch: Batch) -> int:
        return next(iter(batch.values())).shape[0]

    def batch_tokens(self, batch: Batch) -> int:
        return 0


def lr_factor(step: int, total: int, cfg) -> float:
    """`lr_schedule`: linear warmup, then cosine decay to `min_lr_ratio`, constant, or inverse square root."""
    warmup = max(cfg.warmup_steps, 1)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "inverse_sqrt":
        return math.sqrt(warmup / (step + 1))
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def rng_states() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached": float(cached)}
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
