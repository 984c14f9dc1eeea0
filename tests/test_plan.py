"""giantpipe-plan and its memory model: stage formulas, the memory balance, the CLI, and the budget
checks before and during training."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY, run_cli, run_train
from giantpipe.models.giant_net import GiantNet
from giantpipe.models.losses import TokenCrossEntropy
from giantpipe.strategies.memory_model import (
    ALLOC_OVERHEAD,
    MB,
    LayerProfile,
    MemoryModel,
    profile_layers,
)
from giantpipe.strategies.pipeline_runner import check_stage_memory

PIPE = ["strategy=pipeline", "strategy.micro_batches=4", "strategy.checkpoint=always"]


def block_profiles(blocks: int, head_act: float = 5e4) -> list[LayerProfile]:
    """An embedding, `blocks` equal blocks and a head whose logits weigh `head_act` per sample."""
    emb = LayerProfile(param_bytes=2 * MB, act_bytes=1e4, out_bytes=1e4)
    block = LayerProfile(param_bytes=MB, act_bytes=2e5, out_bytes=1e4)
    head = LayerProfile(param_bytes=2 * MB, act_bytes=head_act, out_bytes=4e4)
    return [emb] + [block] * blocks + [head]


def worst(model: MemoryModel, balance) -> float:
    return max(s.peak_mb for s in model.predict(balance))


def test_rematerialization_and_1f1b_hold_less_than_keeping_every_micro_batch():
    profiles = block_profiles(6)
    peaks = {}
    for checkpoint, schedule in [("never", "gpipe"), ("always", "gpipe"), ("never", "1f1b")]:
        model = MemoryModel(profiles, batch_size=32, micro_batches=8, checkpoint=checkpoint, schedule=schedule)
        peaks[checkpoint, schedule] = [s.act_mb for s in model.predict([4, 4])]
    assert peaks["always", "gpipe"][0] < peaks["never", "1f1b"][0] < peaks["never", "gpipe"][0]
    # 1F1B's last stage holds one micro-batch in flight, its first stage two (of 2 stages)
    assert peaks["never", "1f1b"][1] < peaks["never", "1f1b"][0]
    single = MemoryModel(profiles, batch_size=32, checkpoint="single").predict([8])[0]
    assert single.act_mb > peaks["never", "gpipe"][0] / 2  # the whole batch's activations at once
    assert single.optim_mb == 2 * single.param_mb == 2 * single.grad_mb


def test_memory_balance_is_the_best_contiguous_cut_and_knows_the_heavy_head():
    profiles = block_profiles(7, head_act=2e6)  # logits heavier than four blocks
    model = MemoryModel(profiles, batch_size=16, micro_batches=4, checkpoint="always", fixed_mb=100)
    balance = model.balance(3)
    brute = min((worst(model, [a, b, 9 - a - b]), [a, b, 9 - a - b])
                for a, b in itertools.product(range(1, 8), repeat=2) if 9 - a - b >= 1)
    assert worst(model, balance) == pytest.approx(brute[0])
    assert balance[-1] < balance[0]  # the stage with the head gets fewer blocks
    assert model.balance(1) == [9]


def test_fits_says_whether_the_best_cut_fits_the_budget():
    """`fits` (greedy, O(L): what giantpipe-plan --largest asks for thousands of layers) agrees
    with the best cut's largest stage on both sides of every budget that matters."""
    for head_act, stages in itertools.product((5e4, 2e6), (1, 2, 3, 5)):
        model = MemoryModel(block_profiles(9, head_act), batch_size=16, micro_batches=4,
                            checkpoint="always", fixed_mb=100)
        best = worst(model, model.balance(stages))
        assert model.fits(stages, best) and not model.fits(stages, best - 0.01)
    assert not model.fits(12, 1e9)  # more stages than layers


def test_profile_is_per_sample_and_linear_in_the_batch():
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GiantNet(vocab_size=64, d_model=32, n_layers=3, n_heads=2, d_ff=64, max_len=16)
    batch = {"tokens": torch.randint(0, 64, (4, 16)), "targets": torch.randint(0, 64, (4, 16))}
    one = profile_layers(model, {k: v[:1] for k, v in batch.items()}, loss_fn=TokenCrossEntropy())
    four = profile_layers(model, batch, loss_fn=TokenCrossEntropy())
    assert len(one) == 5 and one[1] == one[2] == one[3]  # equal blocks: measured once
    for a, b in zip(one, four):
        assert a.param_bytes == b.param_bytes and a.act_bytes > 0
    for a, b in zip(one[1:], four[1:]):  # the embedding also saves batch-free position ids
        assert a.act_bytes == pytest.approx(b.act_bytes, rel=0.1)  # plus a few constant scalars
    assert all(p.is_meta for p in model.parameters())  # profiled one layer at a time, then dropped


def test_cuda_model_counts_tensors_and_the_optimizer_step():
    """On CUDA the figure is max_memory_allocated: no process cost, no heap overhead, and AdamW's
    foreach temporary (one parameter size) where it outweighs the activations it never meets."""
    profiles = block_profiles(8)
    cpu = MemoryModel(profiles, batch_size=8, micro_batches=4, checkpoint="always", fixed_mb=100)
    for act_scale in (1, 100):  # activations below, then above the optimizer step's temporary
        cuda = MemoryModel(profiles, batch_size=8 * act_scale, micro_batches=4, checkpoint="always", device="cuda")
        for c, g in zip(cpu.predict([5, 5]), cuda.predict([5, 5]), strict=True):
            assert g.fixed_mb == 0 and g.optim_step_mb == g.param_mb
            assert g.act_mb == pytest.approx(act_scale * c.act_mb / ALLOC_OVERHEAD, rel=0.01)
            assert g.peak_mb == pytest.approx(4 * g.param_mb + max(g.act_mb, g.optim_step_mb))
        assert (max(g.act_mb for g in cuda.predict([5, 5])) > g.param_mb) == (act_scale == 100)


def test_profile_in_the_training_precision():
    """bf16 autocast saves a block's activations in bf16 (about half of float32's per sample) and
    a bf16 copy of each weight once, whatever the batch; bf16-true halves every byte."""
    with torch.device("meta"):
        model = GiantNet(vocab_size=64, d_model=64, n_layers=1, n_heads=2, d_ff=256, max_len=16)
    sample = {"tokens": torch.randint(0, 64, (1, 16)), "targets": torch.randint(0, 64, (1, 16))}
    fp32, mixed, true = (profile_layers(model, sample, loss_fn=TokenCrossEntropy(), precision=p)[1]
                         for p in ("32-true", "bf16-mixed", "bf16-true"))
    assert fp32.act_fixed_bytes == 0 and mixed.param_bytes == fp32.param_bytes
    weights = sum(p.numel() for n, p in model.layers[1].named_parameters() if n.endswith("weight") and p.dim() == 2)
    assert mixed.act_fixed_bytes == pytest.approx(2 * weights, rel=0.05)  # the linear layers' bf16 copies
    assert 0.4 < mixed.act_bytes / fp32.act_bytes < 0.75  # norms and softmax stay in float32
    assert (true.param_bytes, true.act_bytes) == (fp32.param_bytes // 2, pytest.approx(fp32.act_bytes / 2))


def plan_cli(args, tmp_path):
    return run_cli("plan", args, tmp_path, timeout=180, check=False)


def test_plan_json_per_stage_and_the_fix_when_it_does_not_fit(tmp_path):
    args = TINY + PIPE + ["model.n_layers=6", "strategy.stages=3", "trainer.devices=3",
                          "strategy.balance=memory"]
    ok = plan_cli(args + ["--device-memory", "100000", "--json"], tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    plan = json.loads(ok.stdout)
    assert [s["stage"] for s in plan["stages"]] == [0, 1, 2] and plan["fits"] is True
    for s in plan["stages"]:
        assert s["peak_mb"] == pytest.approx(s["fixed_mb"] + s["param_mb"] + s["grad_mb"] + s["optim_mb"]
                                             + s["act_mb"])
        assert s["fixed_mb"] > 100  # torch and Lightning are part of what VmHWM shows
    # below the framework's own cost (which varies by a few MiB from one process to the next)
    gpu = json.loads(plan_cli(args + ["--device-memory", "100000", "--json", "--device", "cuda"], tmp_path).stdout)
    assert gpu["device"] == "cuda" and all(s["fixed_mb"] == 0 and s["optim_step_mb"] > 0 for s in gpu["stages"])
    tight = plan["stages"][0]["fixed_mb"] - 50
    no = plan_cli(args + ["--device-memory", str(tight)], tmp_path)
    text = " ".join(no.stdout.split())
    assert no.returncode == 1 and "DOES NOT FIT" in text
    assert "nothing fits: no stage count" in text or "fits with: strategy=pipeline" in text


def test_budget_stops_a_run_before_training_with_the_table(tmp_path):
    args = TINY + PIPE + ["strategy.stages=2", "trainer.devices=2", "strategy.memory_budget_mb=64",
                          f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_train(args, tmp_path, check=False)
    assert proc.returncode == 2
    assert "strategy.memory_budget_mb=64" in proc.stderr and "activ." in proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_on_a_gpu_the_cards_memory_is_the_budget(tmp_path, monkeypatch):
    """With no strategy.memory_budget_mb, a run that would train on CUDA is checked against the
    GPU's memory (the plan's tensors-only figure: a model whose tensors alone overflow the card)."""
    from giantpipe.platform import preflight
    from giantpipe.platform.config import ConfigError
    from giantpipe.platform.plan import check_budget

    monkeypatch.chdir(tmp_path)
    cfg = preflight.compose_train(TINY + PIPE + ["strategy.stages=2", "trainer.devices=2", "trainer.accelerator=gpu"])
    card = SimpleNamespace(total_memory=2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: card)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Test GPU")
    check_budget(cfg)  # a tiny model in 1 GiB
    card.total_memory = 2**20 // 2  # half a MiB: the weights alone do not fit
    with pytest.raises(ConfigError, match=r"over the 0 MiB of the GPU \(Test GPU\)") as err:
        check_budget(cfg)
    assert "per GPU (tensors)" in " ".join(str(err.value).split())


def test_a_stage_over_the_budget_at_run_time_is_named():
    engine = SimpleNamespace(stage=1, rank=3, device=torch.device("cpu"))
    check_stage_memory(engine, None)
    check_stage_memory(engine, 1e9)
    with pytest.raises(MemoryError, match=r"stage 1 \(rank 3\).*strategy.memory_budget_mb=1"):
        check_stage_memory(engine, 1.0)
