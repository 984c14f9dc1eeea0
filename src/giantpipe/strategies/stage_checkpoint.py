"""Checkpoints of a pipelined run: one shard per stage plus a manifest, and their consolidation.

Layout for a checkpoint `step300.ckpt` of a 2-stage run:

    step300.ckpt                 manifest: Lightning's trainer state + {"giantpipe_shards": ...}
    step300.ckpt.stage0-of-2     stage 0: state_dict (its layers), optimizer_states, rng_states
    step300.ckpt.stage1-of-2     stage 1: ...

Shards and manifest are written to a temporary name and renamed, shards first, so a crash
mid-save never leaves a manifest that points at a missing or half-written shard.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SHARD_KEYS = ("state_dict", "optimizer_states", "rng_states")


def shard_path(filepath: str | Path, stage: int, num_stages: int) -> Path:
    return Path(f"{filepath}.stage{stage}-of-{num_stages}")


def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)


def split_shard(checkpoint: dict) -> dict:
    """Take this stage's own entries out of a Lightning checkpoint dict."""
    return {k: checkpoint.pop(k) for k in SHARD_KEYS if k in checkpoint}


def manifest_entry(filepath: str | Path, num_stages: int) -> dict:
    return {"stages": num_stages, "files": [shard_path(filepath, s, num_stages).name for s in range(num_stages)]}


def load_shard(manifest_path: str | Path, manifest: dict, stage: int) -> dict:
    shard_file = Path(manifest_path).parent / manifest["files"][stage]
    if not shard_file.exists():
        raise FileNotFoundError(
            f"checkpoint shard {shard_file} of stage {stage} is missing; the checkpoint {manifest_path} is incomplete"
        )
    try:
        return torch.load(shard_file, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"checkpoint shard {shard_file} of stage {stage} cannot be read ({err})") from None


def consolidate(manifest_path: str | Path) -> dict:
    """One ordinary Lightning checkpoint with every stage's weights (optimizer state dropped:
    it is per stage). `strategy=single` loads it through ckpt_path, init_from or giantpipe-eval."""
    checkpoint = torch.load(manifest_path, map_location="cpu", weights_only=False)
    manifest = checkpoint.pop("giantpipe_shards", None)
    if manifest is None:
        raise ValueError(f"{manifest_path} is not a pipelined checkpoint (no stage manifest)")
    state_dict = {}
    for stage in range(manifest["stages"]):
        shard = load_shard(manifest_path, manifest, stage)
        state_dict.update(shard["state_dict"])
        if stage == 0 and "rng_states" in shard:
            checkpoint["rng_states"] = shard["rng_states"]
    checkpoint["state_dict"] = state_dict
    checkpoint["optimizer_states"] = []
    checkpoint["lr_schedulers"] = []
    return checkpoint
