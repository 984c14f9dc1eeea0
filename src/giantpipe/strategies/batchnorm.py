"""Deferred BatchNorm (torchgpipe's idea): running statistics of the mini-batch, not of each
micro-batch.

Under GPipe a BatchNorm layer sees M micro-batches per step and would update its running
statistics M times with micro-batch estimates. `DeferredBatchNorm` still normalizes each
micro-batch with its own statistics (the forward is unchanged), but only accumulates sums;
after the M-th micro-batch it updates the running statistics once, with the mean and
unbiased variance of the whole mini-batch, exactly as a single-device BatchNorm would.
The accumulators are buffers, so the engine's re-materialization (which restores BatchNorm
buffers after a recompute) never counts a micro-batch twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class DeferredBatchNorm(_BatchNorm):
    def __init__(self, num_features: int, chunks: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True, device=device, dtype=dtype)
        self.chunks = chunks
        self.register_buffer("sum", torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("sum_squares", torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("count", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long, device=device))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "sum"):
            for name in ("sum", "sum_squares", "count", "seen"):
                getattr(self, name).zero_()

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        dims = [0] + list(range(2, x.dim()))
        with torch.no_grad():
            self.sum += x.sum(dims)
            self.sum_squares += (x * x).sum(dims)
            self.count += x.numel() // x.shape[1]
            self.seen += 1
            if self.seen == self.chunks:
                self._commit()
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)

    def _commit(self) -> None:
        n = self.count.item()
        mean = self.sum / n
        var = (self.sum_squares / n - mean * mean) * (n / max(n - 1, 1))
        self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
        self.running_var.mul_(1 - self.momentum).add_(var, alpha=self.momentum)
        self.num_batches_tracked += 1
        for name in ("sum", "sum_squares", "count", "seen"):
            getattr(self, name).zero_()

    @classmethod
    def convert(cls, module: nn.Module, chunks: int) -> nn.Module:
        """Replace every BatchNorm in `module` by a DeferredBatchNorm (meta-device modules too)."""
        if isinstance(module, _BatchNorm) and not isinstance(module, cls) and module.track_running_stats:
            device = module.running_mean.device
            deferred = cls(module.num_features, chunks, module.eps, module.momentum or 0.1, module.affine,
                           device=device, dtype=module.running_mean.dtype)
            if device.type != "meta":
                deferred.load_state_dict(module.state_dict(), strict=False)
            return deferred
        for name, child in module.named_children():
            setattr(module, name, cls.convert(child, chunks))
        return module
