"""No process of a pipelined run holds another stage's parameters: not the model, not the
optimizer, not a checkpoint shard, and not even for a moment while the stage is built."""

from __future__ import annotations

import torch

from giantpipe.models.giant_net import GiantNet
from giantpipe.models.losses import TokenCrossEntropy
from giantpipe.strategies.engine import PipelineEngine
from giantpipe.strategies.memory_model import memory_balance, status_kb
from pipeline_harness import spawn

MODEL = dict(vocab_size=64, d_model=256, n_layers=18, n_heads=4, d_ff=1024, max_len=16, dropout=0.0)


def batch(size: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"tokens": torch.randint(0, 64, (size, 16), generator=g),
            "targets": torch.randint(0, 64, (size, 16), generator=g)}


def run_stage(rank: int, world_size: int) -> dict:
    with torch.device("meta"):
        model = GiantNet(**MODEL)
    whole_bytes = sum(p.numel() * 4 for p in model.parameters())
    loss = TokenCrossEntropy()
    balance = memory_balance(model, loss, batch(), world_size, micro_batches=2, schedule="gpipe",
                             checkpoint="always")
    before_kb = status_kb("self", "VmRSS")
    engine = PipelineEngine(model, loss, balance, micro_batches=2, checkpoint="always")
    built_kb = status_kb("self", "VmHWM")
    optimizer = torch.optim.AdamW(list(engine.parameters()), lr=1e-3)
    for _ in range(2):
        engine.train_step(batch())
        optimizer.step()
        optimizer.zero_grad()
    local = {f"layers.{i}." for i in engine.layer_indices}
    held = [n for n, p in model.named_parameters() if not p.is_meta]
    state = [t for s in optimizer.state.values() for t in s.values() if t.dim() > 0]
    shard = {k for k, v in model.state_dict().items() if not v.is_meta}  # what a shard would save
    return {
        "balance": balance, "held": held, "foreign": [n for n in held if not n.startswith(tuple(local))],
        "foreign_in_shard": [k for k in shard if not k.startswith(tuple(local))],
        "local_numel": sum(p.numel() for p in engine.parameters()),
        "optimizer_numel": sum(t.numel() for t in state),
        "build_growth_bytes": (built_kb - before_kb) * 1024, "whole_bytes": whole_bytes,
    }


def test_no_stage_holds_another_stages_parameters():
    results = spawn(run_stage, 3)
    assert sum(results[0]["balance"]) == MODEL["n_layers"] + 2
    for r in results:
        assert r["held"] and r["foreign"] == [] and r["foreign_in_shard"] == []
        assert r["optimizer_numel"] == 2 * r["local_numel"]  # AdamW's two moments, local only
        # building the stage allocated its own share, never the whole model (about 3x as much)
        local_bytes = 4 * r["local_numel"]
        assert r["build_growth_bytes"] < (local_bytes + r["whole_bytes"]) / 2, r
    assert sum(r["local_numel"] for r in results) * 4 == results[0]["whole_bytes"]

