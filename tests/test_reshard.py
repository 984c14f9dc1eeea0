"""Checkpoints across stage counts: a 4-stage checkpoint of each seq2seq family reloads on one
device with identical outputs, training resumed with another stage count (4 -> 2 -> 1 stages,
and V-shaped chunks -> 4 stages) restores the optimizer and LR schedule too, so it continues as
if uninterrupted, and a stage of another layout reads only its own share of the shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY, TINY_GNMT, losses, read_summary, run_train, shard_files

# A LAS small enough to train, test and decode in seconds.
TINY_LAS = [
    "model=las", "model.listener_hidden=16", "model.listener_layers=2", "model.pyramid_levels=1",
    "model.speller_hidden=16", "model.speller_layers=1", "model.dropout=0", "model.decode.beam_size=2",
    "model.decode.max_len=20", "data.train_size=48", "data.val_size=8", "data.test_size=8",
    "data.batch_size=8", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "lr_schedule.warmup_steps=2",
]

FAMILIES = {  # the seq2seq families, whose test outputs include decoded hypotheses
    "gnmt": (TINY_GNMT + ["trainer.max_steps=2"], ["test/loss", "test/bleu"]),
    "las": (TINY_LAS, ["test/loss", "test/wer"]),
}


def stages(n: int) -> list[str]:
    return ["strategy=single"] if n == 1 else ["strategy=pipeline", f"strategy.stages={n}", f"trainer.devices={n}"]


def samples(run_dir: Path) -> list[str]:
    """The decoded test hypotheses the run wrote (seq2seq families), in file order."""
    return [p.read_text() for p in sorted((run_dir / "samples").glob("test_*.md"))]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_four_stage_checkpoint_reloads_on_one_device_with_identical_outputs(tmp_path, family):
    args, metrics = FAMILIES[family]
    args = args + ["logger=none"]
    four, one = tmp_path / "four", tmp_path / "one"
    run_train(args + stages(4) + [f"hydra.run.dir={four}"], tmp_path, timeout=400)
    ckpt = four / "checkpoints" / "last.ckpt"
    assert len(shard_files(ckpt)) == 4
    # resume at the final step: no more training, just the test
    run_train(args + stages(1) + [f"ckpt_path={ckpt}", f"hydra.run.dir={one}"], tmp_path, timeout=400)
    expected, got = read_summary(four)["metrics"], read_summary(one)["metrics"]
    for key in metrics:
        assert got[key] == pytest.approx(expected[key], abs=1e-5), key
    assert samples(one) == samples(four)  # the same hypotheses, word for word


def test_resuming_with_another_stage_count_continues_the_optimizer_and_schedule(tmp_path):
    """4 stages for 8 steps; its step-2 checkpoint resumed as 2 stages, whose step-4 checkpoint
    is resumed on one device: every resumed step's loss equals the uninterrupted run's. AdamW's
    moments and the warmup/cosine schedule must come back for that (a fresh AdamW differs at the
    first resumed update by ~1e-2)."""
    args = TINY + ["trainer.max_steps=8", "trainer.val_check_interval=2", "callbacks.model_checkpoint.save_top_k=-1",
                   "logger=csv", "lr_schedule.warmup_steps=4"]
    four, two, one = tmp_path / "four", tmp_path / "two", tmp_path / "one"
    run_train(args + stages(4) + [f"hydra.run.dir={four}"], tmp_path, timeout=400)
    run_train(args + stages(2) + [f"ckpt_path={four}/checkpoints/step2.ckpt", f"hydra.run.dir={two}"], tmp_path)
    saved = torch.load(two / "checkpoints" / "step4.ckpt", weights_only=False)
    assert saved["giantpipe_shards"]["stages"] == 2 and saved["global_step"] == 4
    run_train(args + stages(1) + [f"ckpt_path={two}/checkpoints/step4.ckpt", f"hydra.run.dir={one}"], tmp_path)
    expected = losses(four)
    for run_dir, first in ((two, 2), (one, 4)):
        got = losses(run_dir)
        assert sorted(got) == list(range(first, 8)), run_dir.name
        for step in got:
            assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (run_dir.name, step)


def test_a_v_shaped_checkpoint_resumes_with_one_chunk_per_stage_and_another_stage_count(tmp_path):
    """2 stages holding 2 chunks each in a V (zbv: stage 0 holds layers 0 and 3) save shards
    that do not follow the layer order; resumed as 4 stages of one chunk, the optimizer and
    schedule come back and every resumed step's loss equals the uninterrupted run's."""
    args = TINY + ["model.dropout=0", "trainer.max_steps=6", "trainer.val_check_interval=2", "logger=csv",
                   "callbacks.model_checkpoint.save_top_k=-1", "lr_schedule.warmup_steps=4"]
    zbv, four = tmp_path / "zbv", tmp_path / "four"
    run_train(args + stages(2) + ["strategy.schedule=zbv", "strategy.virtual_stages=2", f"hydra.run.dir={zbv}"],
              tmp_path, timeout=400)
    saved = torch.load(zbv / "checkpoints" / "step2.ckpt", weights_only=False)
    assert saved["giantpipe_shards"]["virtual_stages"] == 2
    run_train(args + stages(4) + [f"ckpt_path={zbv}/checkpoints/step2.ckpt", f"hydra.run.dir={four}"],
              tmp_path, timeout=400)
    expected, got = losses(zbv), losses(four)
    assert sorted(got) == [2, 3, 4, 5]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def adamw(params: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.AdamW:
    """The platform's grouping: weight decay on matrices, none on vectors."""
    return torch.optim.AdamW([{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": 0.1},
                              {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}], lr=0.01)


def test_optimizer_states_merge_and_split_by_parameter_name():
    from giantpipe.strategies.stage_checkpoint import (
        merge_optimizer_states,
        optimizer_param_names,
        select_optimizer_state,
    )

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(4)])
    named = list(model.named_parameters())
    whole = adamw(named)
    parts = [adamw([(n, p) for n, p in named if n.split(".")[0] in layers]) for layers in ({"0"}, {"1", "2", "3"})]
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        whole.step()  # same gradients, separate states: each part must hold the whole's share
        for part in parts:
            part.step()
    shards = [{"optimizer_states": [p.state_dict()], "optimizer_param_names": optimizer_param_names([p], model)}
              for p in parts]
    (merged,), (names,) = merge_optimizer_states(shards, [n for n, _ in named])
    assert names == optimizer_param_names([whole], model)[0]
    torch.testing.assert_close(merged, whole.state_dict())
    resplit = adamw([(n, p) for n, p in named if n.split(".")[0] in {"0", "1"}])  # another partition
    local = optimizer_param_names([resplit], model)[0]
    resplit.load_state_dict(select_optimizer_state(merged, names, local))
    by_name = {n: p for n, p in named}
    for group in local:
        for name in group:
            torch.testing.assert_close(resplit.state[by_name[name]], whole.state[by_name[name]])
    with pytest.raises(ValueError, match="lacks 1 parameters"):
        select_optimizer_state(merged, names, [local[0], [*local[1], "extra.bias"]])


def test_a_stage_of_another_layout_reads_only_its_share_of_the_shards(tmp_path):
    """Resharding or init_from on a pipeline: the shards are memory-mapped and a process reads
    only the tensors of the names it keeps (its stage's), weights and optimizer state alike."""
    from giantpipe.strategies.memory_model import status_kb
    from giantpipe.strategies.stage_checkpoint import (
        MANIFEST,
        consolidate,
        manifest_entry,
        optimizer_param_names,
        shard_stamp,
    )

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), torch.nn.Linear(2048, 4096))
    named = list(model.named_parameters())
    parts = [adamw([(n, p) for n, p in named if n.split(".")[0] in layers]) for layers in ({"0"}, {"1", "2"})]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    for part in parts:
        part.step()
    path = tmp_path / "step2.ckpt"
    entry = manifest_entry(path, 2, [n for n, _ in named], save_id="s")
    for stage, (part, layers) in enumerate(zip(parts, ({"0"}, {"1", "2"}), strict=True)):
        torch.save({"state_dict": {k: v for k, v in model.state_dict().items() if k.split(".")[0] in layers},
                    "optimizer_states": [part.state_dict()],
                    "optimizer_param_names": optimizer_param_names([part], model),
                    "giantpipe_shard": shard_stamp(stage, 2, "s")}, tmp_path / entry["files"][stage])
    torch.save({"global_step": 2, MANIFEST: entry}, path)
    wanted = {"0.weight", "0.bias", "1.weight", "1.bias"}  # a stage of another layout: layers 0 and 1

    before_kb = status_kb("self", "VmRSS")
    share = consolidate(path, keep=wanted.__contains__)
    for value in share["state_dict"].values():
        value.sum()  # read what was kept
    grown_mb = (status_kb("self", "VmRSS") - before_kb) / 1024
    assert set(share["state_dict"]) == wanted
    (names,) = share["optimizer_param_names"]
    assert sorted(n for group in names for n in group) == sorted(wanted)
    whole = consolidate(path)  # layer 2's 32 MB weight and its 64 MB of AdamW moments: all read
    for name in wanted:
        torch.testing.assert_close(share["state_dict"][name], whole["state_dict"][name])
    assert grown_mb < 16, f"reading a share of the shards grew the process by {grown_mb:.0f} MB"
