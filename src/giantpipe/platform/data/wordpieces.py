"""Subword vocabularies (Hugging Face `tokenizers`) trained on a corpus and cached on disk.

Pre-tokenization is SentencePiece-style: spaces become "▁" inside pieces (Metaspace), digits
and punctuation are split off, and pieces carry no continuation marker, so decoding is plain
concatenation and `decode(encode(text)) == text` for any whitespace-normalized text. Kinds:
"bpe", "unigram" and "wordpiece" (greedy longest-match). Special tokens take ids 0-3:
<pad>, <s> (bos), </s> (eos), <unk>.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
KINDS = ("bpe", "unigram", "wordpiece")
WORDPIECES_VERSION = 1


class Wordpieces:
    """A trained subword vocabulary: text <-> ids, with pad/bos/eos/unk ids."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != [0, 1, 2, 3]:
            raise ValueError(f"special tokens {SPECIAL_TOKENS} must have ids 0-3, got {ids}")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = ids

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, cut at the first EOS; pad and bos are dropped."""
        ids = [int(i) for i in ids]  # numpy rows of a prepared corpus, too
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode([i for i in ids if i not in (self.pad_id, self.bos_id)],
                                     skip_special_tokens=False)

    def decode_batch(self, batch: Iterable[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def save(self, path: str | Path) -> None:
        _atomic_write(Path(path), self.tokenizer.to_str())

    @classmethod
    def load(cls, path: str | Path) -> Wordpieces:
        return cls(Tokenizer.from_file(str(path)))


def train_wordpieces(texts: Iterable[str], vocab_size: int = 8000, kind: str = "bpe") -> Wordpieces:
    """Train a subword vocabulary of at most `vocab_size` pieces (specials included) on `texts`."""
    if kind not in KINDS:
        raise ValueError(f"unknown wordpiece kind {kind!r}; choose one of {KINDS}")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)}, got {vocab_size}")
    special = list(SPECIAL_TOKENS)
    if kind == "bpe":
        model = models.BPE(unk_token="<unk>")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                      show_progress=False)
    elif kind == "wordpiece":
        model = models.WordPiece(unk_token="<unk>", continuing_subword_prefix="")
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special,
                                            continuing_subword_prefix="", show_progress=False)
    else:
        model = models.Unigram()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special,
                                          unk_token="<unk>", show_progress=False)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return Wordpieces(tokenizer)


def cached_wordpieces(texts: Sequence[str], cache_dir: str | Path, vocab_size: int = 8000,
                      kind: str = "bpe", name: str = "wordpieces") -> Wordpieces:
    """Train on `texts` once; later calls with the same texts and settings load from `cache_dir`."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\n")
    digest.update(f"{vocab_size}|{kind}|{WORDPIECES_VERSION}".encode())
    path = Path(cache_dir) / f"{name}-{kind}{vocab_size}-{digest.hexdigest()[:16]}.json"
    if path.exists():
        return Wordpieces.load(path)
    pieces = train_wordpieces(texts, vocab_size, kind)
    pieces.save(path)
    return pieces


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so concurrent ranks never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
