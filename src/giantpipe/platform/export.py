"""`giantpipe-export CKPT [--out PATH]`: consolidate a pipelined checkpoint's stage shards into
one ordinary checkpoint that `strategy=single` (or any stage count, via init_from) loads.

Every shard is verified against the checksum its manifest recorded, so an export never carries
a corrupt shard into a file that no longer knows it was one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from giantpipe.strategies.stage_checkpoint import (
    CONSOLIDATED_SUFFIX,
    atomic_save,
    consolidate,
    consolidated_path,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="giantpipe-export", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path, help="the manifest of a pipelined checkpoint (e.g. checkpoints/last.ckpt)")
    parser.add_argument("--out", type=Path, help=f"output file (default: <ckpt stem>{CONSOLIDATED_SUFFIX} beside it)")
    args = parser.parse_args(argv)
    out = args.out or consolidated_path(args.ckpt)
    try:
        checkpoint = consolidate(args.ckpt)
    except ValueError as err:  # CheckpointError: missing, unreadable, mismatched or corrupt
        print(f"giantpipe-export: error: {err}", file=sys.stderr)
        sys.exit(2)
    atomic_save(checkpoint, out)
    print(f"wrote {out} ({len(checkpoint['state_dict'])} tensors)")


if __name__ == "__main__":
    main()
