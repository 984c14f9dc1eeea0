"""Read an offline wandb run (`run-*.wandb`) as the dashboard would: its config, the metric
keys of its history, and its group. Shared by the logger tests (not a test module).

The file is a LevelDB-style log (wandb's datastore): a 7-byte header, then 32 KiB blocks of
chunks (4-byte CRC, 2-byte length, 1-byte type: full, first, middle, last), each record a
`wandb_internal_pb2.Record` protobuf. wandb >= 0.20 reads it in Go only, hence this reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

BLOCK, HEADER = 32 * 1024, 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, chunks = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind == 0:
            continue
        chunks = [payload] if kind in (1, 2) else [*chunks, payload]
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            yield record


@dataclass
class OfflineRun:
    config: dict = field(default_factory=dict)  # top-level key -> decoded value
    metrics: set[str] = field(default_factory=set)  # history keys ("train/loss", "val/samples/_type")
    group: str = ""


def read_run(path: Path) -> OfflineRun:
    run = OfflineRun()
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            run.config.update({item.key: json.loads(item.value_json) for item in items})
            if kind == "run":
                run.group = record.run.run_group
        elif kind == "history":
            run.metrics.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return run
