"""Where prepared data lives, how it is keyed, and how it is built exactly once.

A prepared corpus is a folder under the cache, named by a hash of every setting that shapes it
(and, for local files, their sizes and modification times). The first process to need it takes
a file lock and builds it into a temporary folder that is renamed into place when complete; any
other process (another pipeline stage, another Hydra job) waits on the lock and then only opens
it. Progress of long steps is shown with `rich` (plain log lines when stderr is not a terminal).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
# the configs' default `data.cache_dir`: the same rule as `default_cache_dir`, for OmegaConf
CACHE_DIR = "${oc.env:GIANTPIPE_CACHE,${oc.env:HOME}/.cache/giantpipe}"


def default_cache_dir() -> Path:
    """$GIANTPIPE_CACHE, else ~/.cache/giantpipe (`CACHE_DIR` for configs)."""
    return Path(os.environ.get("GIANTPIPE_CACHE", Path.home() / ".cache" / "giantpipe"))


def cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def settings_key(settings: dict) -> str:
    """A short stable hash of JSON-able settings."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_stamps(paths: Iterable[str | Path]) -> list[tuple[str, int, float]]:
    """(path, size, mtime) per file: a changed file gets a new cache key."""
    return [(str(p), os.path.getsize(p), os.path.getmtime(p)) for p in paths]


def build_once(folder: Path, build: Callable[[Path], None]) -> Path:
    """`folder`, built by `build(tmp_folder)` unless it exists; one builder at a time (flock)."""
    if (folder / "done").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (folder / "done").exists():  # built by another process while we waited
                return folder
            tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                build(tmp)
                (tmp / "done").touch()
                shutil.rmtree(folder, ignore_errors=True)  # a half-built folder of an old crash
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder


@contextmanager
def progress(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A progress bar for a long step: yields `advance(n)`; logs start and end either way."""
    log.info("%s ...", description)
    if not sys.stderr.isatty():
        yield lambda n=1: None
        log.info("%s: done", description)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
    log.info("%s: done", description)
