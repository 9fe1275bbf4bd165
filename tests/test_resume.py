"""Faults during training: killed runs resume exactly, checkpoints survive a kill mid-write and
a failing disk, NaN never replaces a good checkpoint, a sweep outlives one diverging run."""

import csv
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SCN_TRAIN
from omegaconf import OmegaConf

from scn import checkpoint, experiment, report, resume
from scn.cli import build_experiment
from scn.errors import ConfigError, FormatError, NumericalError, ScnError
from scn.sweep import compose_config
from scn.train import Trainer

# Channels die within a few steps (3 initial bits, gamma 2, fast b) and surgery runs every 3
# steps, so every checkpoint after the first few holds a shrunk model; augmentation draws from
# the data generator, so its replay is tested too. 16 steps per epoch.
FAST = ["dataset=synthetic", "trainer.batch_size=32", "quant.init_bits=3", "size_loss=constant",
        "size_loss.gamma=2", "trainer.lr_quant=0.5", "trainer.prune_every=3",
        "trainer.progress=false", "dataset.augment.crop_padding=2", "dataset.augment.flip=true"]
IN_PROCESS = [*FAST, "trainer.max_epochs=2", "trainer.eval_every=5"]
CLI = [*FAST, "trainer.max_epochs=6", "trainer.eval_every=10"]
SUMMARY_KEYS = ("test_accuracy", "bits_per_weight", "param_count", "steps", "surgeries",
                "file_bytes", "float_bits_pct", "weights_left_pct", "channels_left", "best")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def exp_of(*overrides):
    return build_experiment(compose_config([*IN_PROCESS, *overrides]))


def assert_same_run(a, b):
    """Two run folders hold the same result: summary figures, CSV rows, model bit for bit."""
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sb["status"] == "finished"
    for key in SUMMARY_KEYS:
        assert sa[key] == sb[key], key
    for name in ("metrics.csv", "train_log.csv"):
        assert (a / name).read_text() == (b / name).read_text(), name
    ma, mb = (checkpoint.load_checkpoint(d / "model.safetensors")[0].state_dict() for d in (a, b))
    assert ma.keys() == mb.keys()
    for key in ma:
        assert torch.equal(ma[key], mb[key]), key


class Crash(Exception):
    """Stands in for a kill: the process's memory is lost, the run folder stays."""


def crash_at(monkeypatch, step):
    original = Trainer.train_step

    def train_step(self, *args):
        if self.step == step:
            raise Crash(f"crash after step {step}")
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    monkeypatch.setattr(report, "plot_curves", lambda *a, **k: None)  # ~0.5 s each, not tested here


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs (no training checkpoint but the last), by model."""
    done = {}

    def get(*model):
        if model not in done:
            out = tmp_path_factory.mktemp("reference")
            experiment.run(exp_of(*model, "trainer.checkpoint_every=0"), out)
            done[model] = out
        return done[model]

    return get


RESNET = ("model.name=ResNet", "+model.blocks=[1,1]", "model.width=4")


@pytest.mark.parametrize("every,crashes,model", [
    (1, [7], ()),  # resumes at the very step it stopped
    (4, [10], ()),  # replays two steps, a surgery and an evaluation among them
    (5, [16, 26], ()),  # an epoch boundary, then a second crash of the resumed run
    (3, [8], RESNET),  # residual streams, folded constants in 4-d input offsets
])
def test_resumed_run_ends_exactly_as_an_uninterrupted_one(tmp_path, monkeypatch, reference,
                                                          every, crashes, model):
    exp = exp_of(*model, f"trainer.checkpoint_every={every}")
    for step in crashes:
        with monkeypatch.context() as m:
            crash_at(m, step)
            with pytest.raises(Crash):
                experiment.run(exp, tmp_path, resume=True)
        state = resume.load(resume.path_in(tmp_path))
        assert state.step == step - step % every
        assert json.loads((tmp_path / "summary.json").read_text())["checkpoint_step"] == state.step
    assert state.meta["surgeries"] > 0  # the checkpoint holds a shrunk model
    notices = []
    summary = experiment.run(exp, tmp_path, resume=True, notify=notices.append)
    assert f"at step {state.step} of 32" in notices[0]
    assert summary["resumed_at_steps"][-1] == state.step
    assert_same_run(reference(*model), tmp_path)


def test_a_run_trained_in_paused_slices_ends_as_an_uninterrupted_one(tmp_path, reference):
    """trainer.pause_after_steps: each call trains that many steps, leaves a checkpoint and a
    'paused' summary; resume goes on; wall time adds up over the slices (bench_removal's turns)."""
    exp = exp_of("trainer.checkpoint_every=0", "trainer.pause_after_steps=10")
    walls = []
    for stop in (10, 20, 30):
        summary = experiment.run(exp, tmp_path, resume=True)
        assert (summary["status"], summary["step"], summary["total_steps"]) == ("paused", stop, 32)
        assert json.loads((tmp_path / "summary.json").read_text())["status"] == "paused"
        assert resume.load(resume.path_in(tmp_path)).step == stop
        assert not (tmp_path / "model.safetensors").exists()
        walls.append(summary["wall_time_s"])
    summary = experiment.run(exp, tmp_path, resume=True)
    assert summary["resumed_at_steps"] == [10, 20, 30]
    assert walls[0] < walls[1] < walls[2] < summary["wall_time_s"]
    assert_same_run(reference(), tmp_path)


def test_pausing_a_run_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(ScnError, match="pause_after_steps"):
        experiment.run(exp_of("quant=diffq", "trainer.pause_after_steps=5"), tmp_path)
    assert not tmp_path.joinpath("summary.json").exists()


@pytest.mark.parametrize("off", ["trainer.prune_every=0", "trainer.surgery=off"])
def test_a_charge_without_surgery_is_refused(tmp_path, off):
    """quant.live_input_grad and quant.flops_charge need the channel graph: without surgery
    they would silently do nothing."""
    with pytest.raises(ConfigError, match=r"flops_charge acts through channel surgery.*flops_charge=0"):
        experiment.run(exp_of("quant.flops_charge=2", off), tmp_path)
    assert not tmp_path.joinpath("summary.json").exists()


def test_cli_says_where_a_paused_run_stands(tmp_path):
    done = subprocess.run([str(SCN_TRAIN), *CLI, "trainer.pause_after_steps=5",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True,
                          env=ONE_THREAD, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "paused at step 5 of 96" in done.stdout and "resume=true" in done.stdout
    assert resume.load(resume.path_in(tmp_path)).step == 5


def test_a_run_killed_after_training_only_writes_its_files(tmp_path, monkeypatch, reference):
    """Killed between the last checkpoint and the model files: nothing is trained again."""
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash):
            experiment.run(exp_of("trainer.checkpoint_every=0"), tmp_path)
    assert resume.load(resume.path_in(tmp_path)).step == 32
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", lambda *a: pytest.fail("trained again"))
        experiment.run(exp_of("trainer.checkpoint_every=0"), tmp_path, resume=True)
    assert_same_run(reference(), tmp_path)


def _surgeries_in(path: Path) -> int:
    """Surgeries recorded in a checkpoint that a live trainer keeps replacing (0: unreadable now).

    The trainer writes a temporary and renames it over the file, but safetensors' reader has
    been seen racing that rename ("file size 518092 is smaller than the required mapping size
    574509": one version's header, the other's size), so a failed read here means "poll again".
    """
    try:
        return resume.load(path).meta["surgeries"]
    except FormatError:
        return 0


def test_killed_run_resumes_to_the_same_result(tmp_path):
    """scn-train killed with SIGKILL at a random point after a checkpoint with removed
    channels, then the same command with resume=true: the uninterrupted run's result."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = [str(SCN_TRAIN), *CLI, "trainer.checkpoint_every=4"]
    done = subprocess.run([*args, f"hydra.run.dir={ref}"], capture_output=True, text=True,
                          env=ONE_THREAD, timeout=600)
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen([*args, f"hydra.run.dir={run}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ONE_THREAD)
    path = resume.path_in(run)
    deadline = time.time() + 300
    while not (path.exists() and _surgeries_in(path) > 0):
        assert proc.poll() is None and time.time() < deadline, "the run ended before a checkpoint"
        time.sleep(0.02)
    time.sleep(random.uniform(0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "running"  # killed mid-run, nothing had a chance to clean up
    killed_at = resume.load(path).step
    resumed = subprocess.run([*args, f"hydra.run.dir={run}", "resume=true"], capture_output=True,
                             text=True, env=ONE_THREAD, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} from its training checkpoint at step {killed_at}" in resumed.stderr
    assert_same_run(ref, run)


def test_a_second_run_on_a_locked_folder_is_refused(tmp_path):
    """Two scn-train processes on one folder: the second fails at once, naming the first
    process, and changes nothing; the first finishes with its own results."""
    run = tmp_path / "run"
    args = [str(SCN_TRAIN), *CLI, "trainer.checkpoint_every=4", f"hydra.run.dir={run}"]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    path = resume.path_in(run)
    deadline = time.time() + 300
    while not path.exists():
        assert first.poll() is None and time.time() < deadline, "the run ended before a checkpoint"
        time.sleep(0.02)
    second = subprocess.run([*args[:-1], "size_loss.gamma=1", f"hydra.run.dir={run}"],
                            capture_output=True, text=True, env=ONE_THREAD, timeout=600)
    running = first.poll() is None
    assert first.wait(timeout=600) == 0
    assert running, "the first run finished before the second started: no overlap was tested"
    assert second.returncode != 0
    assert f"is in use by another scn-train (process {first.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["config"]["size_loss"]["gamma"] == 2  # the first run's own config
    record = OmegaConf.load(run / ".hydra" / "config.yaml")  # its record, not the refused one's
    assert record.size_loss.gamma == 2
    assert "size_loss.gamma=1" not in (run / ".hydra" / "overrides.yaml").read_text()


CHILD = """
import os, pathlib, signal, sys
real, calls = pathlib.Path.write_bytes, []

def dying_write(self, data):
    if self.name.startswith(".train_state.safetensors."):  # io.atomic_write's temporary
        calls.append(self)
        if len(calls) == 2:  # the second checkpoint: half written, then the process dies
            real(self, data[:len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return real(self, data)

pathlib.Path.write_bytes = dying_write
from scn.cli import train_main
sys.argv = ["scn-train", *sys.argv[1:]]
train_main()
"""


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    run = tmp_path / "run"
    args = [*IN_PROCESS, "trainer.checkpoint_every=4", f"hydra.run.dir={run}"]
    child = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                           env=ONE_THREAD, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr
    folder = resume.path_in(run).parent
    assert [p.name for p in folder.glob(".*.tmp")], "the half-written file is a temporary"
    assert resume.load(resume.path_in(run)).step == 4  # the previous checkpoint, intact
    done = subprocess.run([str(SCN_TRAIN), *args, "resume=true"], capture_output=True, text=True,
                          env=ONE_THREAD, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "at step 4 of 32" in done.stderr
    assert not list(folder.glob(".*.tmp"))
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"


def test_a_failing_disk_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real, calls = Path.write_bytes, []

    def full_disk(self, data):
        if self.name.startswith(".train_state.safetensors."):
            calls.append(self)
            if len(calls) == 2:  # some of it gets out before the disk fills up
                real(self, data[:1000])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(ScnError, match="train_state.safetensors failed: No space left on device"):
        experiment.run(exp_of("trainer.checkpoint_every=4"), tmp_path)
    assert resume.load(resume.path_in(tmp_path)).step == 4
    assert not list(resume.path_in(tmp_path).parent.glob(".*.tmp"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["checkpoint_step"] == 4


def poison_at(monkeypatch, step):
    """Weights turn NaN at `step` (the loss only follows a step later)."""
    original = Trainer.train_step

    def train_step(self, *args):
        out = original(self, *args)
        if self.step == step:
            with torch.no_grad():
                self.model[0].weight[0, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison_at(monkeypatch, 6)
    with pytest.raises(NumericalError, match="diverged at step 6: parameters 0.weight"):
        experiment.run(exp_of("trainer.checkpoint_every=4"), tmp_path)
    state = resume.load(resume.path_in(tmp_path))
    assert state.step == 4 and all(bool(torch.isfinite(t).all()) for t in state.tensors.values()
                                   if t.is_floating_point())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "diverged at step 6" in summary["error"]
    assert summary["checkpoint_step"] == 4


def test_unchecked_steps_never_reach_a_checkpoint(tmp_path, monkeypatch):
    """On CUDA the loop checks only at log points, evaluations and checkpoints: a NaN between
    them is caught before the next checkpoint is written."""
    original_init = Trainer.__init__

    def as_if_cuda(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.cuda = True  # skips the per-step check, as on a GPU (autocast stays off: amp=false)

    monkeypatch.setattr(Trainer, "__init__", as_if_cuda)
    poison_at(monkeypatch, 5)
    with pytest.raises(NumericalError, match="diverged at step 8"):
        experiment.run(exp_of("trainer.checkpoint_every=4", "trainer.log_every=100",
                              "trainer.eval_every=100", "trainer.prune_every=16",
                              "trainer.amp=false"), tmp_path)
    assert resume.load(resume.path_in(tmp_path)).step == 4


def test_a_diverged_state_is_never_saved(tmp_path):
    exp = exp_of("trainer.max_steps=3", "trainer.checkpoint_every=0")
    experiment.run(exp, tmp_path)
    path = resume.path_in(tmp_path)
    state = resume.load(path)
    before = path.read_bytes()
    key = next(k for k in state.tensors if k.endswith("exp_avg_sq"))
    state.tensors[key][0] = float("inf")  # the optimizer's moments can overflow on their own
    with pytest.raises(NumericalError, match=f"step 3: {key}"):
        resume.save(path, state)
    assert path.read_bytes() == before


def test_resume_without_checkpoint_starts_afresh_and_other_configs_are_refused(tmp_path, monkeypatch):
    notices = []
    with monkeypatch.context() as m:
        crash_at(m, 5)
        with pytest.raises(Crash):
            experiment.run(exp_of("trainer.max_steps=8", "trainer.checkpoint_every=2"), tmp_path,
                           resume=True, notify=notices.append)
    assert "holds no training checkpoint: starting from step 0" in notices[0]
    with pytest.raises(ScnError, match=r"another config \(trainer.max_steps: 8 -> 9\)"):
        experiment.run(exp_of("trainer.max_steps=9", "trainer.checkpoint_every=2"), tmp_path,
                       resume=True)
    # resume=false over an unfinished run's checkpoint: a notice, and a fresh start
    summary = experiment.run(exp_of("trainer.max_steps=9", "trainer.checkpoint_every=0"), tmp_path,
                             notify=notices.append)
    assert "(step 4); starting from step 0 as resume=false" in notices[1]
    assert summary["status"] == "finished" and "resumed_at_steps" not in summary


def test_unreadable_checkpoint_is_a_format_error(tmp_path):
    path = resume.path_in(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(FormatError, match="not a readable training checkpoint.*without resume=true"):
        experiment.run(exp_of("trainer.max_steps=2"), tmp_path, resume=True)


def test_a_flipped_header_byte_is_refused(tmp_path):
    """One digit of the JSON header changed (the step): the whole-file checksum refuses it, and
    resume never starts from it."""
    with pytest.raises(Crash):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(checkpoint, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(Crash()))
            experiment.run(exp_of("trainer.max_steps=8", "trainer.checkpoint_every=4"), tmp_path)
    path = resume.path_in(tmp_path)
    raw = path.read_bytes()
    edited = raw.replace(b'\\"step\\":8', b'\\"step\\":9', 1)
    assert edited != raw
    path.write_bytes(edited)
    with pytest.raises(FormatError, match="SHA-256 checksum"):
        experiment.run(exp_of("trainer.max_steps=8", "trainer.checkpoint_every=4"), tmp_path, resume=True)
    assert path.read_bytes() == edited  # refused before anything was written


def test_a_finished_run_is_never_overwritten(tmp_path, reference):
    done = reference()
    before = {p.name: p.read_bytes() for p in done.iterdir() if p.is_file()}
    with pytest.raises(ScnError, match="already holds a finished run of another config"):
        experiment.run(exp_of("trainer.checkpoint_every=0", "size_loss.gamma=1"), done)
    same = experiment.run(exp_of("trainer.checkpoint_every=7"), done, resume=True)
    assert same["status"] == "finished"
    assert {p.name: p.read_bytes() for p in done.iterdir() if p.is_file()} == before


def test_checkpoint_settings_do_not_change_the_config_hash():
    a = compose_config([*IN_PROCESS, "trainer.checkpoint_every=3"])
    b = compose_config([*IN_PROCESS, "trainer.checkpoint_every=0", "resume=true"])
    ha, hb = (experiment.config_hash(OmegaConf.to_container(c, resolve=True)) for c in (a, b))
    assert ha == hb


def test_a_new_setting_at_its_neutral_value_keeps_finished_runs_recognisable():
    """A run finished before trainer.channel_multiple existed is the same config as one with
    channel_multiple=1; with 8 it is another."""
    config = OmegaConf.to_container(compose_config(IN_PROCESS), resolve=True)
    before = {**config, "trainer": {k: v for k, v in config["trainer"].items() if k != "channel_multiple"}}
    assert config["trainer"]["channel_multiple"] == 1
    assert experiment.config_hash(before) == experiment.config_hash(config)
    config["trainer"]["channel_multiple"] = 8
    assert experiment.config_hash(before) != experiment.config_hash(config)


@pytest.mark.parametrize("key", ["min_bits", "exponent_refit"])
def test_self_compression_settings_added_later_keep_finished_runs_recognisable(key):
    config = OmegaConf.to_container(compose_config([*IN_PROCESS, "quant=self_compress"]), resolve=True)
    before = {**config, "quant": {k: v for k, v in config["quant"].items() if k != key}}
    assert key in config["quant"]
    assert experiment.config_hash(before) == experiment.config_hash(config)


def test_runs_from_before_batchnorm_recalibration_are_recalibrate_bn_0():
    """Runs finished before trainer.recalibrate_bn existed evaluated with the running averages:
    the same config as recalibrate_bn=0, another one than the default (20)."""
    config = OmegaConf.to_container(compose_config(IN_PROCESS), resolve=True)
    before = {**config, "trainer": {k: v for k, v in config["trainer"].items() if k != "recalibrate_bn"}}
    assert config["trainer"]["recalibrate_bn"] == 20
    assert experiment.config_hash(before) != experiment.config_hash(config)
    config["trainer"]["recalibrate_bn"] = 0
    assert experiment.config_hash(before) == experiment.config_hash(config)


def test_a_sweep_goes_on_when_one_run_diverges(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([str(SCN_TRAIN), "-m", "dataset=synthetic", "trainer.max_steps=3",
                           "trainer.progress=false", "trainer.lr=1e30,0.003",
                           f"hydra.sweep.dir={sweep}"], capture_output=True, text=True,
                          env=ONE_THREAD, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "scn: error: training diverged at step" in proc.stderr
    assert "Traceback" not in proc.stderr
    failed, finished = (json.loads((sweep / n / "summary.json").read_text()) for n in "01")
    assert failed["status"] == "failed" and "diverged" in failed["error"]
    assert finished["status"] == "finished"


def test_every_file_scn_writes_goes_through_scn_io():
    """Checkpoints, model files, summaries, CSVs, plots, reports, benchmark outputs: all are
    written by scn.io's atomic writers (a kill leaves the old file or the new one)."""
    direct = re.compile(r"(?<!\bio)\.write_text\(|(?<!\bio)\.write_bytes\(|"
                        r"open\([^)]*[\"'][wax]b?[\"']|torch\.save\(|np\.save|json\.dump\(|"
                        r"savefig\(|save_file\(")
    for path in [*(ROOT / "scn").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        if path.name == "io.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if direct.search(code) and "atomic_write(" not in code and "not a result" not in line:
                pytest.fail(f"{path.relative_to(ROOT)}:{number} writes a file directly: {line.strip()}")


@pytest.mark.parametrize("budget", [("trainer.stop_shrinking_at=80",),
                                    ("trainer.stop_shrinking_at=80", "trainer.budget_bits=4"),
                                    ("trainer.stop_shrinking_at=80", "trainer.hold_bits=true")])
def test_a_resumed_run_keeps_its_size_budget(tmp_path, monkeypatch, reference, budget):
    """trainer.stop_shrinking_at is read off the model: a run resumed from a checkpoint taken
    after the budget was reached keeps gamma at 0 and ends exactly as the uninterrupted run
    (with trainer.budget_bits too: the raised bit depths are part of the state)."""
    with open(reference(*budget) / "train_log.csv", newline="") as f:
        steps = list(csv.DictReader(f))
    reached = next(int(float(r["step"])) for r in steps if float(r["gamma"]) == 0)
    assert 0 < reached < 12 and all(float(r["gamma"]) == 0 for r in steps if float(r["step"]) > reached)
    exp = exp_of(*budget, "trainer.checkpoint_every=4")
    with monkeypatch.context() as m:
        crash_at(m, 14)
        with pytest.raises(Crash):
            experiment.run(exp, tmp_path, resume=True)
    assert resume.load(resume.path_in(tmp_path)).step == 12
    experiment.run(exp, tmp_path, resume=True)
    assert_same_run(reference(*budget), tmp_path)
