"""The data pipeline at scale: preparation, start-up, per-process memory and throughput.

    .venv/bin/python scripts/bench_data.py                  # 30k, 300k, 3M pairs; 2k, 20k utterances
    .venv/bin/python scripts/bench_data.py --pairs 30000 --utterances 2000
    .venv/bin/python scripts/bench_data.py --quick          # 3k, 30k pairs; 200 utterances
    .venv/bin/python scripts/bench_data.py --pairs 30000 --utterances --stages --keep-prepared --append
                                                            # re-measure one row's start-up and speed

Translation corpora are JSONL files of `--pairs` pairs (6-20 words a side, words drawn with a
Zipf law from a real vocabulary: the words of the Python standard library's source), written as
a stream; speech corpora are the embedded eSpeak corpus at `--utterances` training utterances.
For each corpus, in fresh processes: the preparation (`prep_s`, and its peak resident memory),
the second run's start-up (`startup_s`: opening the prepared data and building the first
batch; `startup_process_s` with Python's imports), the peak resident memory (VmHWM) of a short
training run with one process and of the launcher and every stage of 2- and 4-stage pipelines,
and training tokens/s of the same model fed by the data pipeline in the training process, by
one DataLoader worker, and from memory (the same batches collated beforehand), in alternating
rounds. Writes `bench_data.json` (with the load average); `--append` updates the rows of the
corpora it measures and keeps the others. Run it alone: its times are the machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from giantpipe.platform.proc_memory import TreeWatcher

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY_GNMT = ["model=gnmt", "model.hidden_size=64", "model.num_encoder_layers=2",
             "model.num_decoder_layers=2", "model.embedding_size=32", "data.vocab_size=2000",
             "data.max_tokens=64", "data.batch_size=32"]
TINY_LAS = ["model=las", "model.listener_hidden=32", "model.listener_layers=3", "model.pyramid_levels=1",
            "model.frame_stack=2", "model.speller_hidden=32", "model.speller_layers=1",
            "model.embedding_size=16", "model.attention=dot", "data.batch_size=16"]
RUN = ["trainer.max_steps=6", "trainer.val_check_interval=6", "trainer.limit_val_batches=1",
       "run_test=false", "logger=none", "callbacks=none", "trainer.enable_progress_bar=false",
       "lr_schedule.warmup_steps=2", "model.decode.beam_size=1"]


# --- corpora -------------------------------------------------------------------------------------
def vocabulary(size: int = 20_000) -> list[str]:
    """Lower-case words of the stdlib's source, most frequent first."""
    from collections import Counter

    from giantpipe.platform.data.text import stdlib_documents

    counts = Counter(w for d in stdlib_documents(8_000_000) for w in re.findall(r"[a-z]{2,}", d["text"]))
    return [w for w, _ in counts.most_common(size)]


def write_translation_corpus(path: Path, pairs: int, seed: int = 0, chunk: int = 20_000) -> None:
    """`pairs` JSONL records, streamed to disk: the target reverses the source and rewrites
    each word (a learnable mapping), so both sides have their own wordpieces."""
    if path.exists():
        return
    words = np.array(vocabulary())
    target = np.array([w[::-1] + "en" for w in words])
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for start in range(0, pairs, chunk):
            n = min(chunk, pairs - start)
            lengths = rng.integers(6, 21, n)
            ids = rng.choice(len(words), size=int(lengths.sum()), p=p)
            cuts = np.cumsum(lengths)[:-1]
            for row in np.split(ids, cuts):
                en = " ".join(words[row])
                de = " ".join(target[row[::-1]])
                f.write(json.dumps({"translation": {"en": en.capitalize() + ".", "de": de + "."}}) + "\n")
    os.replace(tmp, path)


# --- measuring processes ---------------------------------------------------------------------------
def run_watched(cmd: list[str], env: dict, timeout: float) -> dict:
    """Run `cmd`, polling the peak resident memory (VmHWM) of it and all its descendants."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeWatcher(proc.pid, interval_s=0.2) as watcher:
        output, _ = proc.communicate(timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{output[-3000:]}")
    peaks = watcher.peaks_mb
    return {"wall_s": time.perf_counter() - start, "output": output,
            "launcher_mb": round(peaks.get(proc.pid, 0.0), 1),
            "stage_mb": [round(peaks[p], 1) for p in watcher.workers]}  # ranks start in order


def child(kind: str, mode: str, overrides: list[str], env: dict, timeout: float = 3600) -> dict:
    """Run `--child` in a fresh process; its last output line is its JSON result."""
    result = run_watched([PY, __file__, "--child", kind, mode, *overrides], env, timeout)
    line = [ln for ln in result["output"].splitlines() if ln.startswith("{")][-1]
    return {**json.loads(line), "process_s": round(result["wall_s"], 2), "peak_mb": result["launcher_mb"]}


def train_memory(overrides: list[str], env: dict, stages: int) -> dict:
    strategy = ["strategy=single"] if stages == 1 else [
        "strategy=pipeline", f"strategy.stages={stages}", f"trainer.devices={stages}",
        "strategy.micro_batches=4"]
    result = run_watched([PY, "-m", "giantpipe.platform.train", *overrides, *RUN, *strategy,
                          "hydra.run.dir=/tmp/bench_data_run"], env, timeout=3600)
    return {"launcher_mb": result["launcher_mb"], "stage_mb": result["stage_mb"],
            "wall_s": round(result["wall_s"], 1)}


# --- inside a child process ------------------------------------------------------------------------


def child_main(kind: str, mode: str, overrides: list[str]) -> dict:
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    if mode == "synth":  # the embedded speech corpus, generated before anything is measured
        from giantpipe.platform.data.speech_synth import default_speech_corpus
        from giantpipe.platform.preflight import compose_train

        d = compose_train(overrides).data
        default_speech_corpus(Path(d.cache_dir) / "speech", d.train_size, d.val_size, d.test_size,
                              d.corpus_seed, d.noise_prob)
        return {"synth_s": round(time.perf_counter() - start, 1)}
    from giantpipe.platform.build import build_task
    from giantpipe.platform.preflight import compose_train

    cfg = compose_train(overrides)
    imported = time.perf_counter()  # Python, torch, Lightning and Hydra: not the data's time
    data, task, _ = build_task(cfg)  # prepares (first run) or opens the data
    data.setup("fit")
    loader = data.train_dataloader()
    first = next(iter(loader))
    ready = time.perf_counter() - imported
    if mode == "open":
        return {"startup_s": round(ready, 3), "import_s": round(imported - start, 1),
                "batch_items": int(first["tgt_out"].shape[0])}
    data.cfg.num_workers = 1  # the same batches built by one DataLoader worker process
    return {"open_s": round(ready, 3), **throughput(task, loader, data.train_dataloader())}


def throughput(task, loader, worker_loader, steps: int = 10, rounds: int = 15) -> dict:
    """Training tokens/s fed by the data pipeline in the training process (`loader`), by one
    DataLoader worker (`worker_loader`, the same batches), and from memory (those batches
    collated beforehand): `rounds` rounds of `steps` steps each, every round over the next
    batches for all three feeds, in an order that rotates from round to round; medians. Each
    feed keeps one iterator for all its rounds, as an epoch of training does."""
    import torch

    from giantpipe.models.contract import materialize
    from giantpipe.platform.tasks.base import LocalRunner

    materialize(task.model, range(len(task.model.layers)), torch.device("cpu"), 0)
    runner = LocalRunner(task.model, task.loss_fn)
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=1e-3)

    def train(batches) -> float:
        tokens, start = 0, time.perf_counter()
        for batch in batches:
            loss = runner.train_loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            tokens += task.batch_tokens(batch)
        return tokens / (time.perf_counter() - start)

    feeds = {"pipeline": iter(loader), "worker": iter(worker_loader)}
    in_memory = [batch for _, batch in zip(range(steps * rounds + 1), iter(loader))]
    for feed in feeds.values():  # the same batches in the same order; the worker has started
        assert torch.equal(next(feed)["index"], in_memory[0]["index"])
    train(in_memory[:3])  # warm up
    speeds: dict[str, list[float]] = {"pipeline": [], "worker": [], "memory": []}
    for r in range(rounds):
        names = list(speeds)[r % 3:] + list(speeds)[:r % 3]
        for name in names:
            if name == "memory":
                speeds[name].append(train(in_memory[1 + r * steps:1 + (r + 1) * steps]))
            else:
                speeds[name].append(train(next(feeds[name]) for _ in range(steps)))
    median = {k: float(np.median(v)) for k, v in speeds.items()}
    return {"tokens_per_s_pipeline": round(median["pipeline"], 1),
            "tokens_per_s_worker": round(median["worker"], 1),
            "tokens_per_s_memory": round(median["memory"], 1),
            "ratio": round(median["pipeline"] / median["memory"], 3),
            "ratio_worker": round(median["worker"] / median["memory"], 3)}


# --- the benchmark -------------------------------------------------------------------------------
def bench_corpus(kind: str, size: int, base: list[str], cache: Path, env: dict,
                 keep_prepared: bool = False, stage_counts=(1, 2, 4), speed: bool = True) -> dict:
    """One corpus's row. `keep_prepared`: the preparation was measured beforehand by
    `--prepare-only` (its numbers are in `cache/prep.json`)."""
    import shutil

    row: dict = {"kind": kind, "size": size, "loadavg_start": os.getloadavg()[0]}
    if kind == "speech":
        row["synth_s"] = child(kind, "synth", base, env)["synth_s"]
    if keep_prepared and (cache / "prep.json").exists():
        row.update(json.loads((cache / "prep.json").read_text()))
    else:
        shutil.rmtree(cache / kind / "prepared", ignore_errors=True)
        prep = child(kind, "open", base, env)
        row.update(prep_s=prep["startup_s"], prep_peak_mb=prep["peak_mb"])
        (cache / "prep.json").write_text(json.dumps({k: row[k] for k in ("prep_s", "prep_peak_mb")}))
    if os.environ.get("BENCH_DATA_PREPARE_ONLY"):
        return row
    again = child(kind, "open", base, env)
    row.update(startup_s=again["startup_s"], import_s=again.get("import_s"),
               startup_process_s=again["process_s"],
               open_peak_mb=again["peak_mb"])
    for stages in stage_counts:
        row[f"train_{stages}"] = train_memory(base, env, stages)
        print(f"  {kind} {size}: {stages} stage(s) {row[f'train_{stages}']}", flush=True)
    if kind == "translation" and speed:
        row["throughput"] = {k: v for k, v in child(kind, "throughput", base, env).items()
                             if k.startswith(("tokens", "ratio"))}
    row["loadavg_end"] = os.getloadavg()[0]
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, nargs="*", default=[30_000, 300_000, 3_000_000])
    parser.add_argument("--utterances", type=int, nargs="*", default=[2000, 20_000])
    parser.add_argument("--quick", action="store_true", help="3k and 30k pairs, 200 utterances")
    parser.add_argument("--work", default=os.environ.get("BENCH_DATA_DIR", "/work/cache/bench_data"),
                        help="corpora and caches go here (not the repository)")
    parser.add_argument("--out", default="bench_data.json")
    parser.add_argument("--append", action="store_true", help="update or add rows of an existing --out")
    parser.add_argument("--stages", type=int, nargs="*", default=[1, 2, 4],
                        help="pipeline stage counts whose per-process memory is measured")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--keep-prepared", action="store_true",
                        help="reuse a preparation measured before (BENCH_DATA_PREPARE_ONLY=1 measures only that)")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.utterances = [3000, 30_000], [200]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    result = {"meta": {"loadavg_start": os.getloadavg(), "cpus": os.cpu_count(),
                       "command": " ".join(sys.argv)}, "rows": []}
    if args.append and Path(args.out).exists():
        result = json.loads(Path(args.out).read_text())
        result["meta"]["command"] += " ; " + " ".join(sys.argv)
    for pairs in args.pairs:
        path = work / f"pairs-{pairs}.jsonl"
        start = time.perf_counter()
        write_translation_corpus(path, pairs)
        print(f"translation corpus {pairs}: {path.stat().st_size / 1e6:.0f} MB", flush=True)
        cache = work / f"cache-pairs-{pairs}"
        base = [*TINY_GNMT, "data=translation_files", f"data.paths=[{path}]", f"data.cache_dir={cache}"]
        row = bench_corpus("translation", pairs, base, cache, env, args.keep_prepared, args.stages,
                           not args.no_throughput)
        row["corpus_s"] = round(time.perf_counter() - start, 1)
        _put_row(result, row)
        _save(result, args.out)
    for utterances in args.utterances:
        cache = work / "cache-speech"  # the synthesized corpus is shared; prepared data is keyed
        base = [*TINY_LAS, "data=speech_default", f"data.train_size={utterances}", "data.val_size=100",
                "data.test_size=100", f"data.cache_dir={cache}"]
        _put_row(result, bench_corpus("speech", utterances, base, cache, env, stage_counts=args.stages))
        _save(result, args.out)
    result["meta"]["loadavg_end"] = os.getloadavg()
    _save(result, args.out)
    return result


def _put_row(result: dict, row: dict) -> None:
    """Add `row`, or update the row of the same corpus (kind and size) with what was measured now."""
    same = [r for r in result["rows"] if (r["kind"], r["size"]) == (row["kind"], row["size"])]
    if same:
        same[0].update(row)
    else:
        result["rows"].append(row)


def _save(result: dict, out: str) -> None:
    Path(out).write_text(json.dumps(result, indent=1))


def table(result: dict) -> str:
    """The README table of a result: one row per corpus."""
    lines = ["| corpus | prepare | start-up (process) | peak MB: 1 process | 2 stages: launcher, stages "
             "| 4 stages: launcher, stages | tokens/s: in the process, 1 worker / memory |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        unit = "pairs" if r["kind"] == "translation" else "utterances"
        t1, t2, t4 = (r.get(f"train_{n}", {}) for n in (1, 2, 4))
        stages = [", ".join([f"{t['launcher_mb']:.0f}"] + [f"{m:.0f}" for m in t["stage_mb"]]) if t else "–"
                  for t in (t2, t4)]
        tp = r.get("throughput")
        speed = (f"{tp['tokens_per_s_pipeline']:.0f} ({tp['ratio']:.2f}×), "
                 f"{tp['tokens_per_s_worker']:.0f} ({tp['ratio_worker']:.2f}×) / {tp['tokens_per_s_memory']:.0f}"
                 if tp and "ratio_worker" in tp else "–")
        lines.append(f"| {r['size']:,} {unit} | {r['prep_s']:.1f} s ({r['prep_peak_mb']:.0f} MB) "
                     f"| {r['startup_s']:.2f} s ({r['startup_process_s']:.1f} s) | {t1.get('launcher_mb', 0):.0f} "
                     f"| {stages[0]} | {stages[1]} | {speed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child_main(sys.argv[2], sys.argv[3], sys.argv[4:])), flush=True)
    elif len(sys.argv) > 2 and sys.argv[1] == "--table":
        print(table(json.loads(Path(sys.argv[2]).read_text())))
    else:
        main()
