"""`giantpipe-export CKPT [--out PATH]`: consolidate a pipelined checkpoint's stage shards into
one ordinary checkpoint that `strategy=single` (or any stage count, via init_from) loads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from giantpipe.strategies.stage_checkpoint import atomic_save, consolidate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="giantpipe-export", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path, help="the manifest of a pipelined checkpoint (e.g. checkpoints/last.ckpt)")
    parser.add_argument("--out", type=Path, help="output file (default: <ckpt stem>.consolidated.ckpt beside it)")
    args = parser.parse_args(argv)
    out = args.out or args.ckpt.with_name(f"{args.ckpt.stem}.consolidated.ckpt")
    try:
        if not args.ckpt.exists():
            raise FileNotFoundError(f"checkpoint {args.ckpt} does not exist")
        checkpoint = consolidate(args.ckpt)
    except (FileNotFoundError, ValueError) as err:
        print(f"giantpipe-export: error: {err}", file=sys.stderr)
        sys.exit(2)
    atomic_save(checkpoint, out)
    print(f"wrote {out} ({len(checkpoint['state_dict'])} tensors)")


if __name__ == "__main__":
    main()
