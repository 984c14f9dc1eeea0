"""Language-model data: text from the Python standard library (embedded default), a Hugging
Face dataset, or local text files; byte-level or trained BPE tokens; fixed-length windows.

The stdlib's own source is real text present on every machine (DESIGN §6), so the default job
needs no download. Splits are deterministic: each document goes to train/val/test by a hash of
its name, so adding files never reshuffles the others.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset

from giantpipe.platform.config import ConfigError
from giantpipe.platform.data.cache import build_once, file_stamps, settings_key
from giantpipe.platform.data.sampling import (
    GlobalBatchSampler,
    ResumableLoader,
    SplitLoaders,
    replica_of,
)
from giantpipe.platform.data.skips import SkipCounts

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")


def stdlib_documents(max_bytes: int) -> list[dict]:
    """The stdlib's .py files (tests and vendored packages excluded), sorted, up to `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "ensurepip", "__pycache__"}
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append({"name": str(path.relative_to(root)), "text": text})
        total += len(text.encode())
        if total >= max_bytes:
            break
    return docs


def split_of(name: str, val_fraction: float, test_fraction: float) -> str:
    u = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "validation" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def read_text_file(path: str | Path, counts: SkipCounts) -> str:
    """A file's text with universal newlines; lines that are not UTF-8 are dropped and counted
    (one bad byte should not cost a corpus, nor end a run with a traceback)."""
    lines = []
    for raw in Path(path).read_bytes().splitlines(keepends=True):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            counts.undecodable += 1
    return "".join(lines).replace("\r\n", "\n").replace("\r", "\n")


def text_files(paths) -> list[str]:
    """The files `data.paths` (files or globs, `~` expanded) name, sorted; ConfigError if a
    path matches no file."""
    matches = {p: sorted(f for f in glob.glob(os.path.expanduser(p), recursive=True) if os.path.isfile(f))
               for p in paths}
    missing = [p for p, found in matches.items() if not found]
    if not paths or missing:
        raise ConfigError(
            f"data.paths {missing or '[]'}: no such files; give existing text files, e.g. data.paths=[notes.txt]"
        )
    return sorted({f for found in matches.values() for f in found})


def load_documents(cfg) -> tuple[dict[str, list[str]], SkipCounts]:
    """Texts per split from the configured source (`stdlib`, `hf` or `files`), and what was
    skipped; ConfigError if a split ends up with no text."""
    counts = SkipCounts()  # lines not UTF-8 (undecodable), documents blank (empty) or not text (malformed)
    if cfg.source == "stdlib":
        docs = stdlib_documents(cfg.max_bytes)
        names, texts = [d["name"] for d in docs], [d["text"] for d in docs]
    elif cfg.source == "files":
        files = text_files(cfg.paths)
        names, texts = [f"{i}" for i in range(len(files))], [read_text_file(f, counts) for f in files]
    elif cfg.source == "hf":
        import datasets

        ds = datasets.load_dataset(cfg.name, cfg.config_name, split=cfg.hf_split)
        names, texts = [f"{i}" for i in range(len(ds))], ds[cfg.text_field]
    else:
        raise ConfigError(f"data.source={cfg.source!r}: choose stdlib, hf or files")
    out = {s: [] for s in SPLITS}
    for name, text in zip(names, texts):
        if not isinstance(text, str):
            counts.malformed += 1
            continue
        if not text.strip():
            counts.empty += 1
            continue
        for k, block in enumerate(blocks(text)):
            out[split_of(f"{name}#{k}", cfg.val_fraction, cfg.test_fraction)].append(block)
    if counts.total:
        log.info("text source: skipped %s", counts)
    if not all(out.values()):
        raise ConfigError(
            f"the text source gave {', '.join(f'{len(v)} {k}' for k, v in out.items())} blocks "
            f"(skipped: {counts}); every split needs text: add more (data.max_bytes, data.paths) "
            "or raise data.val_fraction"
        )
    return out, counts


def blocks(text: str, size: int = 4096) -> list[str]:
    """Cut a document into ~`size`-character blocks at line ends: the unit of the split."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, one byte per token."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE trained on the train split with Hugging Face `tokenizers`."""

    def __init__(self, texts: list[str], vocab_size: int, path: Path):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if path.exists():
            self.tok = Tokenizer.from_file(str(path))
        else:
            self.tok = Tokenizer(models.BPE())
            self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            self.tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
            )
            self.tok.train_from_iterator(texts, trainer)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.tok.save(str(path))
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


class WindowDataset(Dataset):
    """Non-overlapping windows of `seq_len + 1` tokens: inputs and next-token targets."""

    def __init__(self, ids: np.ndarray, seq_len: int):
        self.ids, self.seq_len = ids, seq_len

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict:
        chunk = torch.from_numpy(self.ids[i * self.seq_len : (i + 1) * self.seq_len + 1].astype(np.int64))
        return {"tokens": chunk[:-1], "targets": chunk[1:]}


def unigram_entropy_bits(ids: np.ndarray, vocab_size: int) -> float:
    counts = np.bincount(ids, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


class TextDataModule(SplitLoaders, pl.LightningDataModule):
    """Tokenized windows per split, cached on disk by a key of the settings that shape them."""

    def __init__(self, cfg, batch_size: int, seed: int):
        super().__init__()
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.splits: dict[str, np.ndarray] = {}
        self.tokenizer = None
        self.stats: dict[str, float] = {}

    def prepare(self) -> None:
        """Load, tokenize and cache; idempotent, and safe to call before the trainer exists."""
        if self.splits:
            return
        cache = build_once(Path(self.cfg.cache_dir).expanduser() / "text" / self._key(), self._build)
        meta = json.loads((cache / "meta.json").read_text())
        self.tokenizer = ByteTokenizer() if self.cfg.tokenizer == "bytes" else BPETokenizer([], 0, cache / "bpe.json")
        self.splits = {s: np.load(cache / f"{s}.npy", mmap_mode="r") for s in SPLITS}
        self.stats = meta

    def _key(self) -> str:
        fields = ("source", "name", "config_name", "paths", "max_bytes", "tokenizer", "vocab_size",
                  "val_fraction", "test_fraction")
        blob = {f: str(self.cfg.get(f)) for f in fields}
        if self.cfg.source == "files":  # an edited, added or removed file gets a new key
            blob["files"] = file_stamps(text_files(self.cfg.paths))
        return settings_key(blob)

    def _build(self, cache: Path) -> None:
        docs, skipped = load_documents(self.cfg)
        if self.cfg.tokenizer == "bytes":
            tok = ByteTokenizer()
        else:
            tok = BPETokenizer(docs["train"], self.cfg.vocab_size, cache / "bpe.json")
        meta = {"vocab_size": tok.vocab_size, **{f"skipped_{k}": v for k, v in skipped.as_dict().items()}}
        for split in SPLITS:
            text = "\n\n".join(docs[split])
            ids = np.asarray(tok.encode(text), dtype=np.int32)
            np.save(cache / f"{split}.npy", ids)
            meta[f"{split}_tokens"] = int(len(ids))
            meta[f"{split}_bytes_per_token"] = len(text.encode()) / max(len(ids), 1)
        train = np.load(cache / "train.npy")
        meta["unigram_bits_per_token"] = unigram_entropy_bits(train, tok.vocab_size)
        meta["unigram_bpb"] = meta["unigram_bits_per_token"] / meta["train_bytes_per_token"]
        (cache / "meta.json").write_text(json.dumps(meta, indent=2))

    @property
    def vocab_size(self) -> int:
        self.prepare()
        return self.tokenizer.vocab_size

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def _loader(self, split: str, shuffle: bool) -> ResumableLoader:
        dataset = WindowDataset(self.splits[split], self.cfg.seq_len)
        replicas, replica = replica_of(self.trainer)
        sampler = GlobalBatchSampler(
            len(dataset), self.batch_size, seed=self.seed, shuffle=shuffle,
            drop_last=shuffle, num_replicas=replicas, replica=replica,
        )
        return ResumableLoader(dataset, sampler, num_workers=self.cfg.num_workers)
