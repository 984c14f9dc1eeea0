"""Output units of the speller: graphemes (characters of normalized transcripts) or wordpieces."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from pathlib import Path


def normalize_transcript(text: str) -> str:
    """Lowercase letters, apostrophes and single spaces: the grapheme model's alphabet."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    kept = "".join(c if c.isalpha() or c == "'" else " " for c in text)
    return " ".join(kept.split())


class GraphemeVocab:
    """Characters with <pad>=0, <s> (bos)=1, </s> (eos)=2, <unk>=3."""

    SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = list(chars)
        self.index = {c: i + len(self.SPECIALS) for i, c in enumerate(self.chars)}

    @classmethod
    def from_texts(cls, texts) -> GraphemeVocab:
        return cls(sorted({c for t in texts for c in normalize_transcript(t)}))

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, self.unk_id) for c in normalize_transcript(text)]

    def decode(self, ids) -> str:
        """Text of `ids`, cut at the first EOS; pad and bos are dropped, unk becomes '?'."""
        out = []
        for i in (int(i) for i in ids):
            if i == self.eos_id:
                break
            if i >= len(self.SPECIALS):
                out.append(self.chars[i - len(self.SPECIALS)])
            elif i == self.unk_id:
                out.append("?")
        return "".join(out)

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]



def output_units(units: str, texts: Sequence[str], vocab_size: int):
    """The speller's vocabulary: `GraphemeVocab`, or BPE `Wordpieces` (same interface)."""
    if units == "graphemes":
        return GraphemeVocab.from_texts(texts)
    if units == "wordpieces":
        from giantpipe.platform.data.wordpieces import train_wordpieces

        return train_wordpieces(list(texts), vocab_size, "bpe")
    raise ValueError(f"units={units!r}: choose graphemes or wordpieces")


def save_units(vocab, folder: Path) -> None:
    if isinstance(vocab, GraphemeVocab):
        (folder / "graphemes.json").write_text(json.dumps(vocab.chars, ensure_ascii=False))
    else:
        vocab.save(folder / "wordpieces.json")


def load_units(folder: Path):
    if (folder / "graphemes.json").exists():
        return GraphemeVocab(json.loads((folder / "graphemes.json").read_text()))
    from giantpipe.platform.data.wordpieces import Wordpieces

    return Wordpieces.load(folder / "wordpieces.json")
