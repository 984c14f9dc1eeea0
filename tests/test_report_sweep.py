"""giantpipe-report: a sweep's summaries become a table, a CSV and a throughput plot."""

from __future__ import annotations

import csv
import json

import pytest

from giantpipe.platform.report_sweep import main, report


def make_job(
    sweep, num: int, overrides: list[str], samples_per_s: float, config: str | None = None
):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if config is not None:
        (job / ".hydra" / "config.yaml").write_text(config)
    summary = {"choices": {"strategy": "pipeline"}, "metrics": {"train/loss": 2.0 + num},
               "steps": 20, "wall_time_s": 10.0 + num, "samples_per_s": samples_per_s,
               "tokens_per_s": 64 * samples_per_s}  # fmt: skip
    (job / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep(tmp_path):
    sweep = tmp_path / "multirun" / "2024-01-01_00-00-00"
    rates = {(1, 1): 100.0, (1, 4): 96.0, (2, 1): 110.0, (2, 4): 150.0}
    for num, ((k, m), rate) in enumerate(rates.items()):
        make_job(sweep, num, [f"strategy.stages={k}", f"strategy.micro_batches={m}",
                              "experiment=pipeline_throughput"], rate)  # fmt: skip
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_report_pivots_throughput_like_gpipe_table_2(sweep):
    paths = report(sweep)
    text = paths["markdown"].read_text()
    assert "| M \\ stages | K=1 | K=2 |" in text
    assert "| M=1 | 1.00 (100) | 1.10 (110) |" in text
    assert "| M=4 | 0.96 (96) | 1.50 (150) |" in text
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [(r["stages"], r["micro_batches"], r["samples_per_s"]) for r in rows] == [
        ("1", "1", "100.0"),
        ("1", "4", "96.0"),
        ("2", "1", "110.0"),
        ("2", "4", "150.0"),
    ]
    assert rows[3]["train/loss"] == "5.0" and rows[0]["job"] == "0"
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def test_stage_counts_come_from_the_config_when_not_swept(tmp_path):
    sweep = tmp_path / "s"
    config = "strategy:\n  name: pipeline\n  stages: 2\n  micro_batches: 8\n"
    make_job(sweep, 0, ["model.d_model=64"], 50.0, config)
    make_job(sweep, 1, ["model.d_model=128"], 40.0, config)
    make_job(sweep, 2, ["model.d_model=64", "strategy=single"], 30.0, "strategy:\n  name: single\n")
    text = report(sweep, tmp_path / "out")["markdown"].read_text()
    assert "model.d_model" in text.splitlines()[2]  # the swept key is a column
    # strategy=single is the 1-stage column of the same series; other swept keys split series
    assert "## samples_per_s, micro-batches x stages (model.d_model=64)" in text
    assert "| M=1 | 1.00 (30) |  |" in text and "| M=8 |  | 1.67 (50) |" in text
    assert "## samples_per_s, micro-batches x stages (model.d_model=128)" in text
    assert (tmp_path / "out" / "throughput.png").exists()


def test_cli_prints_the_report_and_rejects_an_empty_dir(sweep, tmp_path, capsys):
    main([str(sweep), "--metric", "tokens_per_s"])
    assert "tokens_per_s, micro-batches x stages" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nothing")])
    assert exit_info.value.code == 2
    assert "not a directory" in capsys.readouterr().err
