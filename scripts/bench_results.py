"""`bench_pipeline.py`'s results: the JSON's rows and summaries from the measurements, and
the printed tables (speedup and bubble, activation memory, tokens/s) with the summary lines."""

from __future__ import annotations

import statistics

from bench_models import MODES, ModelSpec
from giantpipe.strategies import schedule as sched
from giantpipe.strategies.schedule_auto import StageProfile, choose

SCHEDULES = ("gpipe", "1f1b")
# issue 12's targets: MLP and giant net best N=2 speedup, pipeline efficiency over M 4..16
TARGETS = {"mlp": 1.75, "giant": 1.70}
EFFICIENCY_TARGET, EFFICIENCY_MS = 1.80, (4, 8, 16)
BUBBLE_LABELS = ("zb_h1", "1f1b", "1f1b fused")  # the M=8 bubbles the summary compares


def label(schedule: str, virtual_stages: int = 1, costs: str = "equal", backward: str = "split") -> str:
    """A schedule as the tables name it: zbv/V2, zb_h1 (V=1 is left out), zbv/V2 profiled,
    1f1b fused (every backward whole)."""
    name = schedule if virtual_stages == 1 else f"{schedule}/V{virtual_stages}"
    return name + ("" if costs == "equal" else f" {costs}") + ("" if backward == "split" else f" {backward}")


def theoretical_bubble(schedule: str, stages: int, micro_batches: int, chunks: int) -> float | None:
    """The schedule's bubble with one clock per F, B, W (two per fused BW), as schedule.py
    computes it; (N-1)/(M+N-1) for gpipe and 1f1b; None where giantpipe lacks the schedule."""
    try:
        spec = sched.check_schedule(schedule, chunks)
        return sched.bubble(sched.make_schedule(schedule, stages, micro_batches, chunks), spec.placement)
    except ValueError:
        return None


def median(xs):
    return statistics.median(xs) if xs else None


def collect(spec: ModelSpec, parts: list[dict]) -> tuple[list[dict], dict]:
    """Rows of the JSON's `runs`, and the model's baselines: the median plain step of all parts
    (baseline_s), with one process using every core (baseline_threads_s), with every rank
    running it at once (baseline_pair_s), and what that pair does against one process beside
    it (two_process_ceiling: ranks x baseline / pair, the throughput of independent
    single-threaded processes; None where not measured)."""
    runs = []
    all_base, all_threads, all_pair = [], [], []
    ceiling = None
    tokens = spec.mean_tokens
    for part in parts:
        base = median(part["baseline_steps_s"])
        base_min = min(part["baseline_steps_s"], default=None)
        base_cpu = part["baseline_cpu_s"]
        threads = median(part.get("baseline_threads_steps_s", []))
        pair = median(part.get("baseline_pair_steps_s", []))
        again_base = median(part.get("confirm_baseline_steps_s", []))
        again_threads = median(part.get("confirm_baseline_threads_steps_s", []))
        if pair:
            ceiling = 2 * base / pair
        all_base += part["baseline_steps_s"]
        all_threads += part.get("baseline_threads_steps_s", [])
        all_pair += part.get("baseline_pair_steps_s", [])
        for row in part["rows"]:
            cfg = row.pop("cfg")
            n, m = cfg["stages"], cfg["micro_batches"]
            steps = row.pop("steps_s")
            step = median(steps)
            again = median(row.get("confirm_steps_s", []))
            if again:  # timed again after the grid, against the baselines of those rounds
                row.update(confirm_step_s=again, confirm_speedup=again_base / again,
                           confirm_speedup_vs_threads=again_threads / again if again_threads else None)  # fmt: skip
            v = cfg.get("virtual_stages", 1)
            name = label(cfg["schedule"], v, cfg.get("costs", "equal"), cfg.get("backward", "split"))
            runs.append({
                "model": spec.name, **cfg, "label": name, "step_s": step, "steps_s": steps,
                "baseline_s": base, "speedup": base / step if step else None,
                "speedup_of_fastest": base_min / min(steps) if step else None,
                "baseline_threads_s": threads,
                "speedup_vs_threads": threads / step if step and threads else None,
                "ideal_speedup": n * m / (m + n - 1),
                "samples_per_s": spec.samples / step if step else None,
                "tokens_per_s": tokens / step if step and tokens else None,
                "baseline_cpu_s": base_cpu,
                "cpu_ratio": row["cpu_s"] / base_cpu if row.get("cpu_s") and base_cpu else None,
                "bubble_theoretical": theoretical_bubble(cfg["schedule"], n, m, v), **row,
            })  # fmt: skip
    baselines = {"baseline_s": median(all_base), "baseline_threads_s": median(all_threads),
                 "baseline_pair_s": median(all_pair), "two_process_ceiling": ceiling}  # fmt: skip
    return runs, baselines


def threads_bound(runs: list[dict]) -> list[dict]:
    """Per M: about the most a 2-stage schedule of giantpipe's could reach against one process
    with 2 threads on this host, were the stages balanced and everything but compute free.
    Each rank computes half of what the fastest 2-stage configuration at that M computes (its
    step less its measured bubble: two processes' contention and the smaller micro-batch
    products stay in), in the shares of F, B and W the zb_h1 run measured (every backward
    split: what W can take; what stays in B, like fused LSTM weights, cannot fill a bubble);
    the fastest candidate schedule the cost model (schedule_auto) predicts for those boxes
    sets the step, against the 2-thread rounds. The gap between it and the measured best is
    what imbalance, messages and the engine cost; below 1.0 at every M, the 2-thread target
    is out of reach on this host for these schedules."""
    out = []
    for m in sorted({r["micro_batches"] for r in runs}):
        fastest = _fastest(runs, "giantpipe", 2, m)
        split = next((r for r in runs if r["impl"] == "giantpipe" and r["stages"] == 2
                      and r["label"] == "zb_h1" and r["micro_batches"] == m
                      and r["checkpoint"] == "never" and r.get("weight_s")), None)  # fmt: skip
        if not (fastest and split and fastest.get("bubble_measured") is not None
                and fastest.get("baseline_threads_s")):  # fmt: skip
            continue
        kinds = [sum(split[f"{kind}_s"]) for kind in ("forward", "backward", "weight")]
        shares = [k / sum(kinds) for k in kinds]
        rank_s = fastest["step_s"] * (1.0 - fastest["bubble_measured"])
        box = StageProfile(*(rank_s * share / m for share in shares), activation_mb=None)
        best, _ = choose([box, box], m)
        out.append({"micro_batches": m, "measured": fastest["label"],
                    "measured_vs_threads": fastest["speedup_vs_threads"], "rank_s": rank_s,
                    "shares": dict(zip(("forward", "backward", "weight"), shares, strict=True)),
                    "schedule": best.label, "predicted_step_s": best.step_s,
                    "predicted_bubble": best.bubble,
                    "bound_vs_threads": fastest["baseline_threads_s"] / best.step_s})  # fmt: skip
    return out


def summarize(name: str, runs: list[dict]) -> dict:
    mine = [r for r in runs if r["model"] == name and r["step_s"]]
    n2 = [r for r in mine if r["impl"] == "giantpipe" and r["stages"] == 2]
    best = max(n2, key=lambda r: r["speedup"], default=None)
    out: dict = {}
    if best:
        out["best_n2_speedup"] = {
            k: best[k] for k in ("speedup", "label", "micro_batches", "checkpoint")
        }
    vs = []
    for peer in (r for r in mine if r["impl"] == "peer"):
        ours = next((r for r in n2 if r["checkpoint"] == "never" and r["label"] == peer["label"]
                     and r["micro_batches"] == peer["micro_batches"]), None)  # fmt: skip
        if ours:
            vs.append({"schedule": peer["label"], "micro_batches": peer["micro_batches"],
                       "giantpipe_s": ours["step_s"], "peer_s": peer["step_s"],
                       "peer_over_giantpipe": peer["step_s"] / ours["step_s"]})  # fmt: skip
    if vs:
        out["vs_peer"] = vs
        out["beats_peer_everywhere"] = all(v["peer_over_giantpipe"] >= 1.0 for v in vs)
    if name in TARGETS and best:
        out["target_best_n2_speedup"] = TARGETS[name]
        out["target_met"] = best["speedup"] >= TARGETS[name]
        fastest = max(n2, key=lambda r: r["speedup_of_fastest"])
        out["best_n2_speedup_of_fastest"] = {
            k: fastest[k] for k in ("speedup_of_fastest", "label", "micro_batches", "checkpoint")
        }
    confirmed = [r for r in n2 if r.get("confirm_step_s")]
    if confirmed:
        top = min(confirmed, key=lambda r: r["confirm_step_s"])
        out["confirmed_best"] = {
            "speedup": top["confirm_speedup"], "speedup_vs_threads": top["confirm_speedup_vs_threads"],
            **{k: top[k] for k in ("label", "micro_batches", "checkpoint")},
            "grid_speedup": top["speedup"], "contenders": len(confirmed),
        }  # fmt: skip
        if name in TARGETS:
            out["confirmed_best"]["target_met"] = top["confirm_speedup"] >= TARGETS[name]
    if best and best.get("schedule_efficiency"):
        out["best_n2_speedup"]["schedule_efficiency"] = best["schedule_efficiency"]
        out["best_n2_speedup"]["compute_s"] = best["compute_s"]
    with_threads = [r for r in n2 if r.get("speedup_vs_threads")]
    if with_threads:
        top = max(with_threads, key=lambda r: r["speedup_vs_threads"])
        out["best_n2_speedup_vs_threads"] = {
            k: top[k] for k in ("speedup_vs_threads", "label", "micro_batches", "checkpoint")
        }
        bound = threads_bound(mine)
        if bound:
            out["threads_bound"] = bound
            out["threads_target_reachable"] = max(b["bound_vs_threads"] for b in bound) >= 1.0
    if vs:
        out["best_vs_peer_best"] = best_against_peer(mine)
    efficiency = efficiency_by_m(mine)
    if efficiency:
        out["efficiency_by_m"] = efficiency
        out["efficiency_target_met"] = all(
            e["efficiency"] >= EFFICIENCY_TARGET for e in efficiency if e["micro_batches"] in EFFICIENCY_MS
        )
    at_m8 = {r["label"]: r for r in n2 if r["micro_batches"] == 8 and r["checkpoint"] == "never"}
    for key, field in (("bubble_m8", "bubble_measured"), ("bubble_busiest_m8", "bubble_busiest")):
        if all(at_m8.get(k, {}).get(field) is not None for k in BUBBLE_LABELS):
            out[key] = {k: at_m8[k][field] for k in BUBBLE_LABELS}
    k1 = next((r for r in mine if r["impl"] == "giantpipe" and r["stages"] == 1
               and r["micro_batches"] == 1 and r["schedule"] == "gpipe"), None)  # fmt: skip
    if k1:
        out["k1_engine_overhead"] = k1["step_s"] / k1["baseline_s"] - 1.0
    if any(r.get("tokens_per_s") for r in mine):
        out["tokens_per_s"] = tokens_summary(mine)
    return out


def _fastest(runs: list[dict], impl: str, stages: int, m: int) -> dict | None:
    """The fastest configuration of `impl` with `stages` stages at M=m, no re-materialization."""
    cands = [r for r in runs if r["impl"] == impl and r["stages"] == stages and r["step_s"]
             and r["micro_batches"] == m and r["checkpoint"] == "never"]  # fmt: skip
    return min(cands, key=lambda r: r["step_s"], default=None)


def best_against_peer(runs: list[dict]) -> list[dict]:
    """Per M: giantpipe's fastest 2-stage schedule against the peer's fastest."""
    out = []
    for m in sorted({r["micro_batches"] for r in runs}):
        ours, peer = _fastest(runs, "giantpipe", 2, m), _fastest(runs, "peer", 2, m)
        if ours and peer:
            out.append({"micro_batches": m, "giantpipe": ours["label"], "giantpipe_s": ours["step_s"],
                        "peer": peer["label"], "peer_s": peer["step_s"],
                        "peer_over_giantpipe": peer["step_s"] / ours["step_s"]})  # fmt: skip
    return out


def efficiency_by_m(runs: list[dict]) -> list[dict]:
    """Per M: the fastest 2-stage configuration's speedup over the 1-stage engine's at the same
    M (the pipeline's efficiency with the smaller micro-batch products taken out; 2.0 is
    perfect). Each speedup is over the baseline rounds interleaved with it: the 1-stage rows run
    in their own process before the 2-stage ones, and the host's speed between those phases
    moved by up to 17%; `step_ratio` is the plain ratio of the two steps, which carries it."""
    out = []
    for m in sorted({r["micro_batches"] for r in runs}):
        one, two = _fastest(runs, "giantpipe", 1, m), _fastest(runs, "giantpipe", 2, m)
        if one and two:
            out.append({"micro_batches": m, "schedule": two["label"],
                        "efficiency": two["speedup"] / one["speedup"],
                        "step_ratio": one["step_s"] / two["step_s"]})  # fmt: skip
    return out


def tokens_summary(runs: list[dict]) -> dict:
    """Sequence models: tokens/s of one process (whole batch) and, per M, of the engine on one
    and on two stages (the faster schedule, no re-materialization) with their ratios."""
    base = next(r for r in runs if r["stages"] == 1)
    single = base["tokens_per_s"] * base["step_s"] / base["baseline_s"]
    per_m = []
    for m in sorted({r["micro_batches"] for r in runs}):
        row: dict = {"micro_batches": m}
        for n in (1, 2):
            top = _fastest(runs, "giantpipe", n, m)
            if top:
                row[f"n{n}_tokens_per_s"] = top["tokens_per_s"]
                row[f"n{n}_schedule"] = top["label"]
                row[f"n{n}_over_single"] = top["speedup"]
        per_m.append(row)
    return {"single": single, "by_micro_batches": per_m}


def print_tables(result: dict) -> None:
    from rich.console import Console

    console = Console(width=max(Console().width, 150))
    for name, model in result["models"].items():
        runs = [r for r in result["runs"] if r["model"] == name]
        micro = sorted({r["micro_batches"] for r in runs})
        console.print(_speed_table(name, model, runs, micro))
        console.print(_memory_table(name, runs, micro))
        summary = result["summary"].get(name, {})
        if "tokens_per_s" in summary:
            console.print(_tokens_table(name, summary["tokens_per_s"]))
        for line in _summary_lines(name, model, summary):
            console.print(line)


def _grid(title: str, first: list[str], micro: list[int]):
    from rich.table import Table

    table = Table(title=title)
    for col in first:
        table.add_column(col)
    for m in micro:
        table.add_column(f"M={m}", justify="right")
    return table


def _speed_table(name: str, model: dict, runs: list[dict], micro: list[int]):
    table = _grid(
        f"{name}: {model['description']} - speedup over 1 process "
        f"({model['baseline_s'] * 1e3:.0f} ms/step); bubble measured/theory",
        ["impl", "N", "schedule", "remat"], micro,
    )  # fmt: skip
    groups: dict = {}
    for r in runs:
        key = (r["impl"], r["stages"], r["label"], r["checkpoint"])
        groups.setdefault(key, {})[r["micro_batches"]] = r
    for (impl, n, schedule, mode), by_m in groups.items():
        cells = []
        for m in micro:
            r = by_m.get(m)
            if r is None or not r["step_s"]:
                cells.append("n/a")
                continue
            cell = f"{r['speedup']:.2f}x"
            if r.get("bubble_measured") is not None and r.get("bubble_theoretical") is not None and n > 1:
                cell += f" {r['bubble_measured']:.0%}/{r['bubble_theoretical']:.0%}"
            cells.append(cell)
        table.add_row(impl, str(n), schedule, mode, *cells)
    return table


def _memory_table(name: str, runs: list[dict], micro: list[int]):
    table = _grid(
        f"{name}: peak activation memory, MB (stage 0 / stage 1), N=2", ["schedule", "remat"], micro
    )
    modes = sorted({r["checkpoint"] for r in runs if r["stages"] == 2}, key=MODES.index)
    labels = dict.fromkeys(r["label"] for r in runs if r["impl"] == "giantpipe" and r["stages"] == 2)
    for schedule in labels:
        for mode in modes:
            cells = []
            for m in micro:
                r = next((r for r in runs if (r["impl"], r["stages"], r["label"], r["checkpoint"], r["micro_batches"])
                          == ("giantpipe", 2, schedule, mode, m)), None)  # fmt: skip
                peaks = (r or {}).get("peak_step_mb")
                ok = peaks and None not in peaks
                cells.append("/".join(f"{p:.1f}" for p in peaks) if ok else "n/a")
            if any(c != "n/a" for c in cells):
                table.add_row(schedule, mode, *cells)
    return table


def _tokens_table(name: str, tokens: dict):
    rows = tokens["by_micro_batches"]
    table = _grid(
        f"{name}: tokens/s; 1 process (whole batch) {tokens['single']:,.0f}; ratio to it",
        ["engine"], [r["micro_batches"] for r in rows],
    )  # fmt: skip
    for n in (1, 2):
        cells = []
        for r in rows:
            value = r.get(f"n{n}_tokens_per_s")
            cells.append(
                f"{value:,.0f} ({r[f'n{n}_over_single']:.2f}x, {r[f'n{n}_schedule']})"
                if value
                else "n/a"
            )
        table.add_row(f"{n} stage{'s' if n > 1 else ''}", *cells)
    return table


def _summary_lines(name: str, model: dict, summary: dict) -> list[str]:
    lines = []
    if "best_n2_speedup" in summary:
        b = summary["best_n2_speedup"]
        line = f"{name}: best N=2 speedup {b['speedup']:.2f}x ({b['label']}, M={b['micro_batches']}, {b['checkpoint']})"
        if "schedule_efficiency" in b:
            compute = "/".join(f"{c * 1e3:.0f}" for c in b["compute_s"])
            line += (f"; stage compute {compute} ms, the schedule allows"
                     f" {b['schedule_efficiency']:.0%} of the measured step time")  # fmt: skip
        if "target_met" in summary:
            target = summary["target_best_n2_speedup"]
            line += f"; target {target}x {'met' if summary['target_met'] else 'NOT met'}"
            f = summary["best_n2_speedup_of_fastest"]
            line += (f" (fastest rounds: {f['speedup_of_fastest']:.2f}x, {f['label']},"
                     f" M={f['micro_batches']})")  # fmt: skip
        if "beats_peer_everywhere" in summary:
            worst = min(summary["vs_peer"], key=lambda v: v["peer_over_giantpipe"])
            line += (f"; vs peer: {'faster or equal everywhere' if summary['beats_peer_everywhere'] else 'slower somewhere'}"
                     f" (closest: {worst['schedule']} M={worst['micro_batches']}, peer/giantpipe time {worst['peer_over_giantpipe']:.2f})")  # fmt: skip
        lines.append(line)
    if "confirmed_best" in summary:
        c = summary["confirmed_best"]
        line = (f"{name}: the {c['contenders']} fastest timed again in fresh rounds (the grid's best is the luckiest"
                f" of many medians): {c['label']}, M={c['micro_batches']} {c['speedup']:.2f}x (grid {c['grid_speedup']:.2f}x)")  # fmt: skip
        if c.get("speedup_vs_threads"):
            line += f", {c['speedup_vs_threads']:.2f}x the 2-thread process"
        if "target_met" in c:
            line += f"; target {summary['target_best_n2_speedup']}x {'met' if c['target_met'] else 'NOT met'}"
        lines.append(line)
    if "best_n2_speedup_vs_threads" in summary:
        t = summary["best_n2_speedup_vs_threads"]
        line = (f"{name}: against 1 process with 2 threads ({model['baseline_threads_s'] * 1e3:.0f} ms/step):"
                f" best N=2 {t['speedup_vs_threads']:.2f}x ({t['label']}, M={t['micro_batches']})")  # fmt: skip
        ceiling = model.get("two_process_ceiling")
        if ceiling:
            line += (f"; two independent 1-thread processes reach {ceiling:.2f}x one process,"
                     f" {ceiling * model['baseline_threads_s'] / model['baseline_s']:.2f}x the 2-thread one")  # fmt: skip
        lines.append(line)
    if "threads_bound" in summary:
        cells = ", ".join(f"M={b['micro_batches']} {b['bound_vs_threads']:.2f}x ({b['schedule']}, bubble {b['predicted_bubble']:.0%};"
                          f" measured {b['measured_vs_threads']:.2f}x, {b['measured']})" for b in summary["threads_bound"])  # fmt: skip
        lines.append(f"{name}: the most a 2-stage pipeline could reach against the 2-thread process "
                     f"(balanced stages, all but compute free): {cells}")  # fmt: skip
    if "efficiency_by_m" in summary:
        cells = ", ".join(f"M={e['micro_batches']} {e['efficiency']:.2f} ({e['schedule']})"
                          for e in summary["efficiency_by_m"])  # fmt: skip
        lines.append(f"{name}: best N=2 speedup over the 1-stage engine's at the same M (each over its own baseline rounds): {cells}")
    if "best_vs_peer_best" in summary:
        cells = ", ".join(f"M={v['micro_batches']} {v['peer_over_giantpipe']:.2f} ({v['giantpipe']} vs {v['peer']})"
                          for v in summary["best_vs_peer_best"])  # fmt: skip
        lines.append(f"{name}: peer's best step / giantpipe's best step: {cells}")
    for key, what in (("bubble_m8", "measured bubble"), ("bubble_busiest_m8", "the busiest stage's bubble")):
        if key in summary:
            b = summary[key]
            lines.append(f"{name}: {what} at M=8: zb_h1 {b['zb_h1']:.0%}, 1f1b {b['1f1b']:.0%} (backward split at "
                         f"fill and drain), textbook 1f1b {b['1f1b fused']:.0%} (every backward whole)")  # fmt: skip
    if "k1_engine_overhead" in summary:
        lines.append(
            f"{name}: the engine with 1 stage, M=1 costs {summary['k1_engine_overhead']:+.1%} "
            f"against the plain step; load average {model['loadavg_start']:.2f} -> {model['loadavg_end']:.2f}"
        )  # fmt: skip
    return lines


def markdown(result: dict) -> str:
    """The README's tables for a run: per model, every 2-stage schedule's speedup with its
    measured / theoretical bubble (no re-materialization), each side's best, the efficiency over
    the 1-stage engine, and tokens/s for sequence models."""
    out = []
    for name, model in result["models"].items():
        runs = [r for r in result["runs"] if r["model"] == name and r["stages"] == 2
                and r["checkpoint"] == "never"]  # fmt: skip
        micro = sorted({r["micro_batches"] for r in runs})
        summary = result["summary"].get(name, {})
        head = (f"**{name}** ({model['description']}; baseline {model['baseline_s'] * 1e3:.0f} ms/step, "
                f"1 process, 1 thread")  # fmt: skip
        if model.get("baseline_threads_s"):
            head += f"; 2 threads {model['baseline_threads_s'] * 1e3:.0f} ms/step"
        if model.get("two_process_ceiling"):
            head += f"; two independent processes {model['two_process_ceiling']:.2f}×"
        out += [head + "). 2 stages: speedup over the baseline (measured / theoretical bubble):", ""]
        out.append("| schedule | " + " | ".join(f"M={m}" for m in micro) + " |")
        out.append("|---" * (len(micro) + 1) + "|")
        for impl in ("giantpipe", "peer"):
            for lab in dict.fromkeys(r["label"] for r in runs if r["impl"] == impl):
                cells = []
                for m in micro:
                    r = next((r for r in runs if (r["impl"], r["label"], r["micro_batches"]) == (impl, lab, m)), None)
                    if r is None or not r["step_s"]:
                        cells.append("–")
                        continue
                    cell = f"{r['speedup']:.2f}×"
                    if r.get("bubble_measured") is not None and r.get("bubble_theoretical") is not None:
                        cell += f" ({r['bubble_measured']:.0%} / {r['bubble_theoretical']:.0%})"
                    cells.append(cell)
                out.append(f"| {impl} {lab} | " + " | ".join(cells) + " |")
        for impl in ("giantpipe", "peer"):
            cells = []
            for m in micro:
                top = _fastest(runs, impl, 2, m)
                cells.append(f"**{top['speedup']:.2f}×** ({top['label']})" if top else "–")
            if any(c != "–" for c in cells):
                out.append(f"| {impl}'s best | " + " | ".join(cells) + " |")
        eff = {e["micro_batches"]: e for e in summary.get("efficiency_by_m", [])}
        out.append("| best over the 1-stage engine at that M | "
                   + " | ".join(f"{eff[m]['efficiency']:.2f}" if m in eff else "–" for m in micro) + " |")  # fmt: skip
        out.append("")
        if "tokens_per_s" in summary:
            tokens = summary["tokens_per_s"]
            rows = tokens["by_micro_batches"]
            out.append(f"{name}, tokens/s (1 process, whole batch: {tokens['single']:,.0f}):")
            out.append("")
            out.append("| engine | " + " | ".join(f"M={r['micro_batches']}" for r in rows) + " |")
            out.append("|---" * (len(rows) + 1) + "|")
            for n in (1, 2):
                cells = [f"{r[f'n{n}_tokens_per_s']:,.0f} ({r[f'n{n}_over_single']:.2f}×, {r[f'n{n}_schedule']})"
                         if r.get(f"n{n}_tokens_per_s") else "–" for r in rows]  # fmt: skip
                out.append(f"| {n} stage{'s' if n > 1 else ''} | " + " | ".join(cells) + " |")
            out.append("")
        out += _summary_lines(name, model, summary)
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # re-render a run's README tables: python scripts/bench_results.py run.json
    import json
    import sys

    print(markdown(json.loads(open(sys.argv[1]).read())))
