"""One count of what a reader dropped, by reason, for text, translation and speech alike.

Readers skip what they cannot use (a bad line, an unreadable file) rather than fail a run that
may be hours in; the platform logs the counts per split so a user sees what a corpus lost.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class SkipCounts:
    """Records skipped, by reason. Not every reader meets every reason: a text file has no
    `silent` audio. `as_dict` lists the nonzero counts only."""

    empty: int = 0  # no text (a blank line or document, an empty side of a pair, no samples)
    too_long: int = 0  # over the configured words, tokens or seconds
    undecodable: int = 0  # bytes that are not UTF-8 (or lone surrogates)
    malformed: int = 0  # bad JSON, a missing field, a wrong type or column count
    silent: int = 0  # audio whose peak is below the silence threshold
    unreadable: int = 0  # audio that cannot be opened or decoded (or holds NaN/inf)
    no_text: int = 0  # audio without a usable transcript

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}

    def __add__(self, other: SkipCounts) -> SkipCounts:
        return SkipCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __str__(self) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.as_dict().items()) or "nothing"


def skip_summary(counts: dict[str, int]) -> str:
    """", skipped 3 (empty 1, malformed 2)" for the nonzero counts, or "" when none."""
    lost = {k: v for k, v in counts.items() if v}
    if not lost:
        return ""
    return f", skipped {sum(lost.values())} ({', '.join(f'{k} {v}' for k, v in lost.items())})"
