"""Sweeps as a user runs them: scn-train -m, a re-launch that skips finished runs, scn-report."""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS, SCN_TRAIN

from scn import aggregate, report_cli, sweep_report

SCN_REPORT = Path(sys.executable).parent / "scn-report"
# Three gammas that end at different bits/weight within 4 steps on the synthetic data.
SWEEP = ["dataset=synthetic", "trainer.max_epochs=1", "trainer.progress=false", "trainer.eval_every=2",
         "size_loss=constant", "trainer.lr_quant=0.2", "size_loss.gamma=0.001,1,10"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def scn_train_multirun(sweep_dir):
    return subprocess.run([str(SCN_TRAIN), "-m", *SWEEP, f"hydra.sweep.dir={sweep_dir}"],
                          capture_output=True, text=True, timeout=600)


def read_report(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep") / "gamma"
    proc = scn_train_multirun(sweep_dir)
    assert proc.returncode == 0, proc.stderr
    return sweep_dir


@pytest.fixture(scope="module")
def reported(sweep):
    """The sweep after scn-report SWEEP_DIR (the report written into the sweep folder)."""
    assert report_cli.main([str(sweep)]) == 0
    return sweep


def test_multirun_writes_one_run_folder_per_job(sweep):
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]
    gammas = [json.loads((sweep / n / "summary.json").read_text())["config"]["size_loss"]["gamma"]
              for n in "012"]
    assert gammas == [0.001, 1, 10]


def test_report_copies_each_runs_own_figures(reported):
    rows = read_report(reported / "report.csv")
    assert [r["run_dir"] for r in rows] == ["0", "1", "2"]
    for row in rows:
        summary = json.loads((reported / row["run_dir"] / "summary.json").read_text())
        assert row["status"] == summary["status"] == "finished"
        assert summary["config"]["quant"]["_target_"] == "scn.methods.SelfCompress"
        assert row["quant"] == "self_compress"
        assert float(row["gamma"]) == pytest.approx(summary["config"]["size_loss"]["gamma"])
        for key in ("test_accuracy", "bits_per_weight", "float_bits_pct", "weights_left_pct",
                    "param_count", "wall_time_s"):
            assert float(row[key]) == pytest.approx(summary[key], rel=1e-5), key
        expected_bytes = summary.get("file_bytes", summary["ideal_bytes"])
        assert float(row["file_bytes"]) == pytest.approx(expected_bytes, rel=1e-5)
        assert row["bytes_source"] == ("file" if "file_bytes" in summary else "ideal")
        assert row["pareto"] in ("true", "false")
    # the pareto column is the front of these very rows
    finished = aggregate.collect(reported, warn=None)
    front = {r["run_dir"] for r in aggregate.pareto(finished, "bits_per_weight", "test_accuracy")}
    assert front and {r["run_dir"] for r in rows if r["pareto"] == "true"} == front


def test_plots_are_non_empty_pngs(reported):
    for name in sweep_report.PLOT_NAMES:
        data = (reported / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name


def test_layer_bits_come_from_the_model(sweep):
    bits = sweep_report.layer_bits(sweep / "0")
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert bits is not None and set(bits) == set(summary["channels_left"])
    assert all(0 <= b <= 32 for b in bits.values())


def test_relaunched_sweep_skips_finished_runs(reported):
    before = {n: (reported / n / "summary.json").stat().st_mtime_ns for n in "012"}
    walls = {n: json.loads((reported / n / "summary.json").read_text())["wall_time_s"] for n in "012"}
    proc = scn_train_multirun(reported)
    assert proc.returncode == 0, proc.stderr
    assert {n: (reported / n / "summary.json").stat().st_mtime_ns for n in "012"} == before
    assert {n: json.loads((reported / n / "summary.json").read_text())["wall_time_s"] for n in "012"} == walls
    assert proc.stdout.count("skipped") == 3, proc.stdout


def test_configs_read_back_are_data(tmp_path, monkeypatch):
    """An interpolation in a run folder's config is reported as written: no resolver runs."""
    monkeypatch.setenv("SCN_TEST_SECRET", "hunter2")
    run = tmp_path / "sweep" / "0" / ".hydra"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("quant:\n  kind: ${oc.env:SCN_TEST_SECRET}\nseed: ${oc.env:HOME}\n")
    (row,) = aggregate.collect(tmp_path / "sweep", warn=None)
    assert row["quant"] == "${oc.env:SCN_TEST_SECRET}" and row["seed"] == "${oc.env:HOME}"
    assert "hunter2" not in json.dumps(row)


def test_malformed_summaries_and_metrics_are_listed_as_broken(sweep, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(sweep, broken, ignore=shutil.ignore_patterns("report.csv", "*.png"))
    for run, edit in (("0", {"test_accuracy": "92.5%"}), ("1", {"channels_left": {"0": "many"}})):
        summary = json.loads((broken / run / "summary.json").read_text())
        (broken / run / "summary.json").write_text(json.dumps({**summary, **edit}))
    (broken / "2" / "summary.json").unlink()
    metrics = broken / "2" / "metrics.csv"
    metrics.write_text(metrics.read_text().replace("\n", "," + "9" * 200_000 + "\n", 1))
    out = tmp_path / "out"
    assert report_cli.main([str(broken), "--out", str(out)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    rows = {r["run_dir"]: r for r in read_report(out / "report.csv")}
    assert rows["0"]["status"] == rows["1"]["status"] == "broken" and rows["2"]["status"] == "missing"
    assert "test_accuracy is not a number" in rows["0"]["note"] and "channels_left" in rows["1"]["note"]
    assert all(rows[k]["pareto"] == "false" for k in "012")


def test_report_survives_crashed_runs(sweep, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(sweep, broken, ignore=shutil.ignore_patterns("report.csv", "*.png"))
    (broken / "1" / "summary.json").unlink()  # crashed before the final summary
    summary = json.loads((broken / "2" / "summary.json").read_text())
    summary.update(status="failed", error="training produced NaN")
    (broken / "2" / "summary.json").write_text(json.dumps(summary))
    (broken / "3" / ".hydra").mkdir(parents=True)  # died right after Hydra started it
    shutil.copy(broken / "0" / ".hydra" / "config.yaml", broken / "3" / ".hydra" / "config.yaml")
    shutil.copytree(broken / "2", broken / "4")  # stopped by trainer.pause_after_steps
    (broken / "4" / "summary.json").write_text(json.dumps({**summary, "status": "paused", "step": 7}))
    (broken / "0" / "model.safetensors").write_bytes(b"not a checkpoint")

    out = tmp_path / "out"
    assert report_cli.main([str(broken), "--run", "0", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("scn-report: warning:")]
    assert len(warnings) == 5, err  # runs 1, 2, 3, 4, and run 0's unreadable model
    rows = {r["run_dir"]: r for r in read_report(out / "report.csv")}
    assert {k: r["status"] for k, r in rows.items()} == {"0": "finished", "1": "missing",
                                                         "2": "failed", "3": "missing", "4": "paused"}
    assert rows["0"]["pareto"] == "true"
    assert all(rows[k]["pareto"] == "false" for k in "1234")
    assert "NaN" in rows["2"]["note"] and "metrics.csv" in rows["1"]["note"]
    assert "step 7" in rows["4"]["note"] and "resume=true" in rows["4"]["note"]
    assert rows["3"]["quant"] == "self_compress" and rows["3"]["test_accuracy"] == ""
    last = aggregate.read_metrics(broken / "1")[-1]  # an unfinished run shows its last evaluation
    assert float(rows["1"]["bits_per_weight"]) == pytest.approx(last["bits_per_weight"], rel=1e-5)
    for name in sweep_report.PLOT_NAMES:
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
    assert not (broken / "report.csv").exists()  # --out: nothing written into the sweep


def test_unknown_run_is_a_clear_error(reported, capsys):
    assert report_cli.main([str(reported), "--run", "7"]) == 2
    err = capsys.readouterr().err
    assert "scn-report: error: --run 7" in err and "Traceback" not in err


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    proc = subprocess.run([str(SCN_REPORT), str(tmp_path / "empty")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "scn-report: error:" in proc.stderr and "holds no runs" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert report_cli.main([str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_pareto_on_hand_made_points():
    pts = [(1, 50), (2, 70), (2, 60), (3, 70), (4, 90), (5, 85), (4, 90), (None, 99), (0.5, math.nan)]
    rows = [{"name": i, "x": x, "y": y} for i, (x, y) in enumerate(pts)]
    front = aggregate.pareto(rows, "x", "y")
    assert [(r["x"], r["y"]) for r in front] == [(1, 50), (2, 70), (4, 90), (4, 90)]
    assert aggregate.pareto([], "x", "y") == []
    assert aggregate.pareto([{"x": 3, "y": 1}], "x", "y") == [{"x": 3, "y": 1}]


def test_choose_run_prefers_accurate_front_point_under_4_bits():
    rows = [
        {"run_dir": "a", "status": "finished", "pareto": True, "bits_per_weight": 2.0, "test_accuracy": 80.0},
        {"run_dir": "b", "status": "finished", "pareto": True, "bits_per_weight": 3.5, "test_accuracy": 85.0},
        {"run_dir": "c", "status": "finished", "pareto": True, "bits_per_weight": 6.0, "test_accuracy": 90.0},
        {"run_dir": "d", "status": "failed", "pareto": False, "bits_per_weight": 1.0, "test_accuracy": 99.0},
    ]
    assert aggregate.choose_run(rows)["run_dir"] == "b"
    assert aggregate.choose_run(rows, max_bits=1.5)["run_dir"] == "c"  # none under: the best
    assert aggregate.choose_run(rows[3:]) is None


def _compose_hydra(overrides):
    from hydra import compose, initialize_config_dir

    from scn.cli import register_defaults

    register_defaults()  # the config classes' defaults, which configs/ extends
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_optuna_search_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = _compose_hydra(["+hparams_search=fashion_mnist_optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert list(sweeper.direction) == ["maximize", "minimize"]
    assert set(sweeper.params) == {"size_loss.gamma", "trainer.lr_quant"}
    assert all("log" in v for v in sweeper.params.values())
    assert "hparams_search" not in cfg  # only Hydra settings: run hashes are unchanged


@pytest.mark.parametrize("launcher, plugin, key, value", [
    ("parallel", "hydra_plugins.hydra_joblib_launcher", "n_jobs", -1),
    ("slurm", "hydra_plugins.hydra_submitit_launcher", "gpus_per_node", 1),
    ("slurm_ddp", "hydra_plugins.hydra_submitit_launcher", "tasks_per_node", 4),
])
def test_launcher_configs_compose(launcher, plugin, key, value):
    pytest.importorskip(plugin)
    cfg = _compose_hydra([f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher[key] == value
