"""The pipeline's timeline drawn: the GPipe picture (PNG) and a Chrome/Perfetto trace.

The engine records (strategies/timeline.py); this module, on the platform side, draws:

    plot(timelines, path)       stages x time, F/B/W boxes labelled with their micro-batch,
                                recompute hatched, communication as a thin grey band
    write_trace(timelines, p)   Chrome trace-event JSON (chrome://tracing, ui.perfetto.dev)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from giantpipe.strategies.timeline import (
    COMM_KINDS,
    StepTimeline,
    aligned,
    bubble_fraction,
)

# -- outputs -----------------------------------------------------------------------------------

_TRACE_NAMES = {"forward": "F", "backward": "B", "weight": "W", "recompute": "R"}


def to_chrome_trace(timelines: Sequence[StepTimeline]) -> dict:
    """Chrome trace-event JSON: one process per replica, one thread per stage, 'X' events in µs."""
    trace = []
    for t in aligned(timelines):
        pid, tid = t.replica, t.stage
        trace.append(
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
             "args": {"name": f"stage {t.stage} (rank {t.rank})"}}
        )  # fmt: skip
        trace.append(
            {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"replica {pid}"}}
        )
        for e in t.events:
            name = _TRACE_NAMES.get(e.kind, e.kind)
            if e.micro_batch >= 0:
                name += str(e.micro_batch) if e.kind in _TRACE_NAMES else f" {e.micro_batch}"
                name += "'" * e.chunk
            trace.append(
                {"ph": "X", "name": name, "cat": e.kind, "pid": pid, "tid": tid,
                 "ts": e.start * 1e6, "dur": max(e.duration, 0.0) * 1e6,
                 "args": {"micro_batch": e.micro_batch, "chunk": e.chunk, "rank": t.rank,
                          "phase": t.phase}}
            )  # fmt: skip
    first = timelines[0] if timelines else None
    meta = {}
    if first is not None:
        meta = {
            "stages": first.num_stages,
            "micro_batches": first.micro_batches,
            "schedule": first.schedule,
            "bubble_measured": bubble_fraction(timelines),
            "virtual_stages": first.virtual_stages,
            "bubble_theoretical": first.bubble_theory,
        }
    return {"traceEvents": trace, "displayTimeUnit": "ms", "otherData": meta}


def write_trace(timelines: Sequence[StepTimeline], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_chrome_trace(timelines)))
    return path


_COLORS = {
    "forward": "#4C72B0",
    "backward": "#55A868",
    "weight": "#8172B2",
    "recompute": "#C44E52",
}
_COMM_COLOR = "#8C8C8C"


def plot(timelines: Sequence[StepTimeline], path: str | Path, title: str | None = None) -> Path:
    """The GPipe figure (`figure`) written as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(timelines, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def figure(timelines: Sequence[StepTimeline], title: str | None = None):
    """The GPipe figure: one row per stage (replica 0 on top), F/B/W boxes labelled with
    their micro-batch (primed: a later chunk), recompute hatched inside backward,
    communication as a thin grey band; the empty space between boxes is the bubble."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = sorted(aligned(timelines), key=lambda t: (t.replica, t.stage))
    fig, ax = plt.subplots(figsize=(12, 0.7 * len(rows) + 1.6))
    end = max((t.step_s for t in rows), default=1.0) or 1.0
    for y, t in enumerate(rows):
        for e in sorted(t.events, key=lambda e: e.kind == "recompute"):  # hatch over backward
            if e.kind in _COLORS:
                recompute = e.kind == "recompute"
                ax.broken_barh(
                    [(e.start, e.duration)], (y - 0.38, 0.76),
                    facecolors="none" if recompute else _COLORS[e.kind],
                    edgecolors=_COLORS[e.kind] if recompute else "white",
                    hatch="///" if recompute else None, linewidth=0.8,
                )  # fmt: skip
                if not recompute and e.duration > end / 60:
                    label = f"{_TRACE_NAMES[e.kind]}{e.micro_batch}" + "'" * e.chunk
                    ax.text(e.start + e.duration / 2, y, label, ha="center", va="center",
                            color="white", fontsize=7)  # fmt: skip
            elif e.kind in COMM_KINDS:
                ax.broken_barh([(e.start, e.duration)], (y + 0.38, 0.1), facecolors=_COMM_COLOR)
    labels = [f"stage {t.stage}" + (f" r{t.replica}" if t.replica else "") for t in rows]
    ax.set_yticks(range(len(rows)), labels)
    ax.set_ylim(len(rows) - 0.4, -0.6)  # stage 0 on top
    ax.set_xlim(0, end)
    ax.set_xlabel("seconds since the step's start")
    if title is None and rows:
        first = rows[0]
        chunks = f" (V={first.virtual_stages})" if first.virtual_stages > 1 else ""
        title = (
            f"{first.schedule}{chunks}: {first.num_stages} stages x {first.micro_batches} micro-batches; "
            f"bubble {bubble_fraction(rows):.1%} measured, "
            f"{first.bubble_theory:.1%} theoretical"
        )
    ax.set_title(title or "", fontsize=10)
    handles = [Patch(facecolor=c, label=k) for k, c in _COLORS.items() if k != "recompute"]
    handles += [
        Patch(facecolor="none", edgecolor=_COLORS["recompute"], hatch="///", label="recompute"),
        Patch(facecolor=_COMM_COLOR, label="send/recv/wait"),
    ]
    ax.legend(handles=handles, loc="upper right", fontsize=7, ncol=4)
    fig.tight_layout()
    return fig
