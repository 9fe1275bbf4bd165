"""scn-train as a user runs it: the run folder, the checkpoint, and errors without traceback soup."""

import json
import re
import subprocess

import pytest
from conftest import ROOT, SCN_TRAIN

from scn import checkpoint, report
from scn.data import synthetic
from scn.evaluation import evaluate


def scn_train(*args, cwd=None):
    return subprocess.run([str(SCN_TRAIN), *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    proc = scn_train("dataset=synthetic", "trainer.max_epochs=1", f"hydra.run.dir={out}",
                     "trainer.progress=false")
    assert proc.returncode == 0, proc.stderr
    return out


def test_run_folder_has_every_file(run_dir):
    for name in ("metrics.csv", "summary.json", "curves.png", "model.safetensors", "train_log.csv"):
        assert (run_dir / name).stat().st_size > 0, name
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("test_accuracy", "bits_per_weight", "float_bits_pct", "weights_left_pct",
                "param_count", "wall_time_s", "status"):
        assert key in summary
    assert summary["status"] == "finished"
    rows = report.read_csv(run_dir / "metrics.csv")
    for key in ("step", "epoch", "train_loss", "test_accuracy", "bits_per_weight",
                "float_bits_pct", "weights_left_pct", "gamma"):
        assert key in rows[-1]
    assert rows[-1]["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-4)
    steps = report.read_csv(run_dir / "train_log.csv")
    assert len(steps) == summary["steps"] and all("gamma" in r for r in steps)


def test_checkpoint_reloads_to_the_same_accuracy(run_dir):
    model, header = checkpoint.load_checkpoint(run_dir / "model.safetensors")
    summary = json.loads((run_dir / "summary.json").read_text())
    data = synthetic()
    assert header["dataset"]["classes"] == data.classes
    acc, _ = evaluate(model, data)
    assert acc == pytest.approx(summary["test_accuracy"], abs=1e-9)


def test_checkpoint_is_safetensors_not_pickle(run_dir):
    raw = (run_dir / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")  # safetensors: u64 length, then JSON
    header = json.loads(raw[8:8 + header_len])
    assert "scn" in header["__metadata__"]


def test_no_code_path_reads_with_pickle():
    for path in (ROOT / "scn").rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


@pytest.mark.parametrize("args,match", [
    (["dataset=imagenet_of_dreams"], "fashion_mnist"),
    (["model=transformer"], "small_cnn"),
    (["quant=magic"], "self_compress"),
    (["size_loss.gamma=-1"], "gamma"),
    (["quant.init_bits=0"], "init_bits"),
    (["dataset=fashion_mnist", "dataset.root=/no/such/folder"], "/no/such/folder"),
])
def test_bad_input_is_one_clear_error_and_leaves_nothing(tmp_path, args, match):
    out = tmp_path / "run"
    proc = scn_train("dataset=synthetic", *args, f"hydra.run.dir={out}")
    assert proc.returncode != 0
    assert match in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "summary.json").exists() and not (out / "metrics.csv").exists()


@pytest.mark.parametrize("mode", ["run", "sweep"])
def test_an_unwritable_run_folder_is_a_clear_error(tmp_path, mode):
    """A path through a file fails like a read-only file system: one paragraph, exit code 2."""
    (tmp_path / "a_file").write_text("not a folder")
    key = "hydra.run.dir" if mode == "run" else "hydra.sweep.dir"
    args = ["dataset=synthetic", "trainer.max_steps=2", f"{key}={tmp_path / 'a_file' / 'run'}"]
    proc = scn_train(*(["-m"] if mode == "sweep" else []), *args)
    assert proc.returncode == 2
    assert "cannot write the run folder" in proc.stderr and f"{key}=DIR" in proc.stderr
    assert "Traceback" not in proc.stderr


def _probe_many(folder: str, barrier) -> None:
    from scn import cli
    barrier.wait()  # every process probes in the same moment
    for _ in range(2000):
        cli._make_folder(folder, "hydra.run.dir")  # exits with code 2 if it fails


def test_processes_probing_one_run_folder_at_once_do_not_trip_each_other(tmp_path):
    """The ranks of a torchrun job check the same run folder at the same moment."""
    import multiprocessing
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(3)
    procs = [spawn.Process(target=_probe_many, args=(str(tmp_path), barrier)) for _ in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    assert list(tmp_path.iterdir()) == []  # no probe left behind
