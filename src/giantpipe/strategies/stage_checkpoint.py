"""The checkpoint format: one module reads and writes every kind giantpipe makes.

Three kinds, all read by `load_checkpoint` as one ordinary Lightning checkpoint:

    last.ckpt                    one file (strategy=single)
    step300.ckpt                 a pipelined run's manifest: Lightning's trainer state +
                                 {"giantpipe_shards": {"files", "sha256", "save_id", ...}}
    step300.ckpt.stage0-of-2     stage 0's shard: state_dict (its layers), optimizer_states,
                                 rng_states, optimizer_param_names
    last.consolidated.ckpt       a manifest and its shards merged into one file (giantpipe-export)

Shards and manifest are written to a temporary name and renamed, shards first, so a crash
mid-save never leaves a manifest that points at a missing or half-written shard. Saving again
to the same path (`last.ckpt`, every few steps) writes the shards under the other of two
names (`last.ckpt.stage0-of-2` / `last.ckpt.1.stage0-of-2`), never over the ones the current
manifest lists, and removes those only after the new manifest is in place: a crash at any
moment leaves the old checkpoint whole, never new shards under an old manifest. Every shard
carries its save's id, so a shard that does not belong to its manifest is refused at load, and
the manifest holds each shard's SHA-256 (what `sha256sum` prints), so a shard changed on disk
after the save (bit rot, a bad copy) is refused before a single weight is used.

Resharding: an optimizer's state dict numbers its parameters 0, 1, ... in its own order, which
differs with every stage count. Each shard therefore also names its parameters
(`optimizer_param_names`: per optimizer, per parameter group), `consolidate` merges the shards'
states by name into the order one device's optimizer has (the manifest's `param_order`), and
`select_optimizer_state` cuts out any stage's share of it again, by name. A process that takes
only a share (a stage of another layout, `init_from` on a pipeline) passes `keep`: the files are
memory-mapped and only the tensors it keeps are ever read, so no process holds the whole model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

MANIFEST = "giantpipe_shards"  # the key that makes a checkpoint file a manifest
CONSOLIDATED_SUFFIX = ".consolidated.ckpt"
SHARD_KEYS = ("state_dict", "optimizer_states", "rng_states", "optimizer_param_names")
ParamNames = list[list[str]]  # one optimizer's parameter names, per parameter group


def shard_path(filepath: str | Path, stage: int, num_stages: int, generation: int = 0) -> Path:
    infix = f".{generation}" if generation else ""
    return Path(f"{filepath}{infix}.stage{stage}-of-{num_stages}")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, incomplete, mismatched or corrupt; the message
    names the file (and the stage, for a shard)."""


def read_file(path: str | Path, mmap: bool = False) -> dict:
    """The dict stored in one checkpoint file (a manifest stays a manifest); `mmap`: its tensors
    map the file and are read when used."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({first_line(err)})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a checkpoint (it holds a {type(checkpoint).__name__})")
    return checkpoint


def load_checkpoint(path: str | Path, keep: Callable[[str], bool] | None = None, mmap: bool = False) -> dict:
    """Any checkpoint giantpipe wrote (one file, a manifest and its shards, or a consolidated
    file) as one ordinary Lightning checkpoint, every shard verified. `keep`: only the weights
    (and optimizer state) of the names it accepts; `mmap` (implied by `keep`): the files are
    memory-mapped, so a tensor is read only when it is used."""
    mmap = mmap or keep is not None
    checkpoint = read_file(path, mmap=mmap)
    if is_manifest(checkpoint):
        return consolidate(path, checkpoint, keep, mmap)
    return _share(checkpoint, keep) if keep is not None and "state_dict" in checkpoint else checkpoint


def is_manifest(checkpoint: dict) -> bool:
    return MANIFEST in checkpoint


def consolidated_path(path: str | Path) -> Path:
    """Where giantpipe-export writes the one-file form of the manifest at `path`."""
    path = Path(path)
    return path.with_name(f"{path.stem}{CONSOLIDATED_SUFFIX}")


def read_manifest(filepath: str | Path) -> dict | None:
    """The stage manifest of the checkpoint at `filepath`, or None (no file, unreadable, or
    not a pipelined checkpoint)."""
    try:
        return read_file(filepath).get(MANIFEST)
    except CheckpointError:
        return None


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def next_generation(previous: dict | None) -> int:
    """The shard names a new save uses: not those of the manifest it replaces."""
    return 1 - previous.get("generation", 0) if previous else 0


def stale_files(filepath: str | Path, previous: dict | None, current: dict) -> list[Path]:
    """Shard files of the replaced manifest that the new one does not list (to delete)."""
    if not previous:
        return []
    return [Path(filepath).parent / f for f in previous["files"] if f not in current["files"]]


def atomic_save(obj, path: Path) -> str:
    """Write `obj` to a temporary name, then rename it to `path`; return the file's SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    digest = sha256(tmp)
    tmp.replace(path)
    return digest


def sha256(path: Path) -> str:
    """The file's SHA-256 in hex, as `sha256sum` prints it (read in 4 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def split_shard(checkpoint: dict) -> dict:
    """Take this stage's own entries out of a Lightning checkpoint dict."""
    return {k: checkpoint.pop(k) for k in SHARD_KEYS if k in checkpoint}


def manifest_entry(filepath: str | Path, num_stages: int, param_order: list[str] | None = None,
                   generation: int = 0, save_id: str | None = None, sha256: list[str] | None = None) -> dict:
    """`param_order`: every parameter's name in the whole model's order (what one device's
    optimizer follows), so that consolidated optimizer states index like one device's;
    `sha256`: each stage's shard file's checksum, in stage order."""
    files = [shard_path(filepath, s, num_stages, generation).name for s in range(num_stages)]
    return {"stages": num_stages, "files": files, "param_order": param_order, "generation": generation,
            "save_id": save_id, "sha256": sha256}


def shard_stamp(stage: int, num_stages: int, save_id: str) -> dict:
    """What a shard records of its save, checked against the manifest at load."""
    return {"stage": stage, "stages": num_stages, "save_id": save_id}


def optimizer_param_names(optimizers, module) -> list[ParamNames]:
    """Per optimizer, per parameter group, the names (in `module`) of the parameters it holds."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    return [[[name_of[id(p)] for p in group["params"]] for group in opt.param_groups] for opt in optimizers]


def load_shard(manifest_path: str | Path, manifest: dict, stage: int, mmap: bool = False) -> dict:
    """Stage `stage`'s shard of the manifest at `manifest_path`, after checking that it exists,
    has the checksum the manifest recorded and belongs to the same save."""
    shard_file = Path(manifest_path).parent / manifest["files"][stage]
    if not shard_file.exists():
        raise CheckpointError(
            f"checkpoint shard {shard_file} of stage {stage} is missing; the checkpoint {manifest_path} is incomplete"
        )
    expected = (manifest.get("sha256") or [None] * manifest["stages"])[stage]
    if expected is not None and (actual := sha256(shard_file)) != expected:
        raise CheckpointError(
            f"checkpoint shard {shard_file} of stage {stage} is corrupt: its SHA-256 is {actual[:16]}..., the "
            f"manifest {manifest_path} recorded {expected[:16]}... at save; resume from another checkpoint"
        )
    try:
        shard = torch.load(shard_file, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint shard {shard_file} of stage {stage} cannot be read ({first_line(err)})"
        ) from None
    stamp = shard.get("giantpipe_shard")
    if stamp is not None and stamp != shard_stamp(stage, manifest["stages"], manifest.get("save_id")):
        raise CheckpointError(
            f"checkpoint shard {shard_file} of stage {stage} belongs to another save (stage {stamp['stage']} of "
            f"{stamp['stages']}, save {stamp['save_id']}) than {manifest_path} (save {manifest.get('save_id')}); "
            "the checkpoint is mismatched"
        )
    return shard


def consolidate(manifest_path: str | Path, checkpoint: dict | None = None,
                keep: Callable[[str], bool] | None = None, mmap: bool = False) -> dict:
    """One ordinary Lightning checkpoint with every stage's weights and optimizer state (indexed
    as one device's optimizer, and named in `optimizer_param_names`), the trainer state and the
    LR schedulers; with `keep`, only the parameters (and buffers) it accepts, read from
    memory-mapped shards (`mmap` maps them without choosing). `strategy=single` loads it
    (ckpt_path, init_from, giantpipe-eval) and so does a pipeline of any stage count. A
    checkpoint from before shards named their parameters keeps only the weights: its optimizer
    and schedulers restart."""
    checkpoint = dict(read_file(manifest_path) if checkpoint is None else checkpoint)
    manifest = checkpoint.pop(MANIFEST, None)
    if manifest is None:
        raise CheckpointError(f"{manifest_path} is not a pipelined checkpoint (no stage manifest)")
    mmap = mmap or keep is not None
    shards = [load_shard(manifest_path, manifest, stage, mmap=mmap) for stage in range(manifest["stages"])]
    if keep is not None:
        shards = [_share(shard, keep) for shard in shards]
    checkpoint["state_dict"] = {k: v for shard in shards for k, v in shard["state_dict"].items()}
    if "rng_states" in shards[0]:
        checkpoint["rng_states"] = shards[0]["rng_states"]
    merged = merge_optimizer_states(shards, manifest.get("param_order"))
    if merged is None:
        checkpoint["optimizer_states"], checkpoint["lr_schedulers"] = [], []
    else:
        checkpoint["optimizer_states"], checkpoint["optimizer_param_names"] = merged
    return checkpoint


def _share(checkpoint: dict, keep: Callable[[str], bool]) -> dict:
    """`checkpoint` (one file or one shard) with the weights and the optimizer state of the names
    `keep` accepts; the optimizer's parameter groups and hyperparameters stay."""
    checkpoint = {**checkpoint, "state_dict": {k: v for k, v in checkpoint["state_dict"].items() if keep(k)}}
    if "optimizer_param_names" not in checkpoint:
        return checkpoint
    states, names = [], []
    for state, group_names in zip(checkpoint["optimizer_states"], checkpoint["optimizer_param_names"], strict=True):
        groups, kept_names = [], []
        for group, names_of_group in zip(state["param_groups"], group_names, strict=True):
            pairs = [(n, pid) for n, pid in zip(names_of_group, group["params"], strict=True) if keep(n)]
            groups.append({**group, "params": [pid for _, pid in pairs]})
            kept_names.append([n for n, _ in pairs])
        kept_ids = {pid for g in groups for pid in g["params"]}
        states.append({"state": {pid: s for pid, s in state["state"].items() if pid in kept_ids},
                       "param_groups": groups})
        names.append(kept_names)
    checkpoint["optimizer_states"], checkpoint["optimizer_param_names"] = states, names
    return checkpoint


def merge_optimizer_states(shards: list[dict], param_order: list[str] | None = None
                           ) -> tuple[list[dict], list[ParamNames]] | None:
    """The stages' optimizer states as one optimizer's over the whole model: parameters of each
    group in `param_order` (else stage by stage), hyperparameters from stage 0 (all stages
    share them). None if a shard does not name its parameters."""
    if not shards or any("optimizer_param_names" not in s for s in shards):
        return None
    position = {name: i for i, name in enumerate(param_order or [])}
    states, names = [], []
    for o, first in enumerate(shards[0]["optimizer_states"]):
        by_name: dict[str, dict] = {}
        group_names: ParamNames = [[] for _ in first["param_groups"]]
        for shard in shards:
            state, shard_names = shard["optimizer_states"][o], shard["optimizer_param_names"][o]
            if len(shard_names) != len(group_names):
                raise ValueError(f"stage shards disagree on optimizer {o}'s parameter groups")
            for g, (group, group_of_names) in enumerate(zip(state["param_groups"], shard_names, strict=True)):
                for name, pid in zip(group_of_names, group["params"], strict=True):
                    group_names[g].append(name)
                    if pid in state["state"]:
                        by_name[name] = state["state"][pid]
        if position:
            group_names = [sorted(g, key=lambda n: position.get(n, len(position))) for g in group_names]
        states.append(_indexed_state(by_name, group_names, first["param_groups"]))
        names.append(group_names)
    return states, names


def select_optimizer_state(state: dict, saved_names: ParamNames, local_names: ParamNames) -> dict:
    """An optimizer state dict for the parameters `local_names` (per group), taken by name
    from `state`, whose parameters are named `saved_names`."""
    if len(saved_names) != len(local_names):
        raise ValueError(
            f"the checkpoint's optimizer has {len(saved_names)} parameter groups, this run's {len(local_names)}; "
            "resume with the same optimizer settings"
        )
    id_of = {n: pid for group, names in zip(state["param_groups"], saved_names, strict=True)
             for n, pid in zip(names, group["params"], strict=True)}
    missing = [n for names in local_names for n in names if n not in id_of]
    if missing:
        raise ValueError(f"the checkpoint's optimizer state lacks {len(missing)} parameters of this stage, "
                         f"e.g. {missing[:3]}")
    by_name = {n: state["state"][pid] for n, pid in id_of.items() if pid in state["state"]}
    return _indexed_state(by_name, local_names, state["param_groups"])


def _indexed_state(by_name: dict[str, dict], group_names: ParamNames, groups: list[dict]) -> dict:
    """torch's optimizer state-dict layout: parameters numbered 0, 1, ... group after group."""
    out_state, out_groups, index = {}, [], 0
    for names, group in zip(group_names, groups, strict=True):
        ids = list(range(index, index + len(names)))
        out_state.update({i: by_name[n] for i, n in zip(ids, names) if n in by_name})
        out_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        index += len(names)
    return {"state": out_state, "param_groups": out_groups}
