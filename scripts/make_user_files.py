"""Write a translation corpus and a speech corpus as a user's own files would be, to try
`data=translation_files` and `data=speech_files` (README "Training on your own files").

    python scripts/make_user_files.py OUT [--pairs 29000] [--utterances 400]

OUT/translation/{train,validation,test}.jsonl: {"translation": {"en": ..., "de": ...}} records
(Hugging Face's translation schema), from the embedded verbalization generator with another
seed than the default corpus. OUT/speech/{train,validation,test}/: 16 kHz WAV files and a
`trans.txt` of "name TRANSCRIPT" lines (LibriSpeech's layout), read by eSpeak NG; validation
and test use voices training never hears.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import soundfile

from giantpipe.platform.data.speech_synth import SAMPLE_RATE, SynthSplit, default_speech_corpus
from giantpipe.platform.data.verbalization_corpus import generate_pairs

SPLITS = ("train", "validation", "test")


def write_translation(out: Path, pairs: int, held_out: int, seed: int) -> None:
    rows = generate_pairs(pairs + 2 * held_out, seed)
    sizes = {"train": pairs, "validation": held_out, "test": held_out}
    out.mkdir(parents=True, exist_ok=True)
    start = 0
    for split in SPLITS:
        with (out / f"{split}.jsonl").open("w") as f:
            for en, de in rows[start:start + sizes[split]]:
                f.write(json.dumps({"translation": {"en": en, "de": de}}, ensure_ascii=False) + "\n")
        start += sizes[split]


def write_speech(out: Path, utterances: int, held_out: int, seed: int, cache: Path) -> None:
    folder = default_speech_corpus(cache, utterances, held_out, held_out, seed=seed)
    for split in SPLITS:
        data = SynthSplit.load(folder, split)
        (out / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(len(data)):
            samples, text = data[i]
            name = f"{split}-{i:05d}"
            soundfile.write(out / split / f"{name}.wav", samples, SAMPLE_RATE, subtype="PCM_16")
            lines.append(f"{name} {text.upper()}")
        (out / split / "trans.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--pairs", type=int, default=29_000, help="training sentence pairs")
    parser.add_argument("--utterances", type=int, default=400, help="training utterances")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    write_translation(args.out / "translation", args.pairs, 1000, args.seed)
    write_speech(args.out / "speech", args.utterances, max(args.utterances // 8, 20), args.seed,
                 args.out / "speech_cache")
    print(f"wrote {args.out}/translation/*.jsonl and {args.out}/speech/*/trans.txt + wav")


if __name__ == "__main__":
    main()
