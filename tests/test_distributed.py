"""One run over two processes (torchrun, gloo on CPU): surgery on every rank, one run folder,
resume, and a rank that dies."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SCN_TRAIN

from scn import format as fmt

TORCHRUN = Path(sys.executable).parent / "torchrun"
RUN = ["dataset=synthetic", "model.width=4", "trainer.batch_size=32", "trainer.max_steps=24",
       "trainer.prune_every=6", "size_loss=constant", "size_loss.gamma=2.0", "trainer.lr_quant=0.2",
       "quant.init_bits=2", "trainer.progress=false", "trainer.checkpoint_every=6"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def torchrun(cwd, *overrides, timeout=300):
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(SCN_TRAIN), *RUN, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_two_ranks_cut_the_same_channels_into_one_run_folder(tmp_path):
    proc = torchrun(tmp_path, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world_size"] == 2
    assert summary["surgeries"] >= 1 and summary["weights_left_pct"] < 100
    assert proc.stdout.count("scn: finished") == 1  # rank 0 reports
    model, _ = fmt.load(tmp_path / "run" / "model.scn")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no folder of another rank


def test_a_paused_distributed_run_resumes_to_the_uninterrupted_result(tmp_path):
    whole = torchrun(tmp_path, f"hydra.run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-2000:]
    cut = [f"hydra.run.dir={tmp_path / 'cut'}"]
    first = torchrun(tmp_path, *cut, "trainer.pause_after_steps=12")
    assert first.returncode == 0 and "paused at step 12" in first.stdout, first.stderr[-2000:]
    second = torchrun(tmp_path, *cut, "resume=true")
    assert second.returncode == 0, second.stderr[-2000:]
    assert (tmp_path / "cut" / "metrics.csv").read_text() == (tmp_path / "whole" / "metrics.csv").read_text()
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("cut", "whole"))
    assert a["resumed_at_steps"] == [12] and a["test_accuracy"] == b["test_accuracy"]


def test_a_batch_that_does_not_split_is_refused_before_training(tmp_path):
    proc = torchrun(tmp_path, "trainer.batch_size=31", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert "must divide evenly among the 2 ranks" in proc.stderr
    assert not re.search(r'File "[^"]*/scn/', proc.stderr)  # torchrun's own report only, no scn traceback
    assert not (tmp_path / "run" / "summary.json").exists()


def _rank_pids(parent: int) -> dict[int, int]:
    """RANK -> pid of torchrun's workers."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().split()
        except OSError:
            continue
        ranks = [e for e in env if e.startswith(b"RANK=")]
        if ranks and b"TORCHELASTIC_RUN_ID=" in b" ".join(env) and int(stat[3]) == parent:
            found[int(ranks[0][5:])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_a_rank_that_dies_stops_the_others(tmp_path):
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(SCN_TRAIN), *RUN,
           "trainer.max_steps=100000", "trainer.max_epochs=1000", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "metrics.csv").exists() and time.time() < deadline:
            time.sleep(0.5)  # training has begun on both ranks
        pids = _rank_pids(proc.pid)
        assert 1 in pids, pids
        os.kill(pids[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)  # not a hang
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "rank" in err and "SIGKILL" in err  # torchrun names the rank that failed, and how


def test_two_ranks_with_synchronised_norms_train_as_one_process(tmp_path):
    """float64, SyncBatchNorm2d: the same per-step losses as one process with the same global
    batch, to 1e-6, through two surgeries."""
    script = Path(__file__).parent / "ddp_losses.py"
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.json")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(script),
                          str(tmp_path / "two.json")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["surgeries"] == b["surgeries"] >= 1 and a["params"] == b["params"]
    assert len(a["loss"]) == len(b["loss"]) == 16
    assert max(abs(x - y) for x, y in zip(a["loss"], b["loss"], strict=True)) < 1e-6
    assert a["accuracy"] == b["accuracy"]


def test_ranks_that_disagree_on_bit_depths_stop_with_a_clear_error(tmp_path):
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2",
                           str(Path(__file__).parent / "ddp_disagree.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stdout.count("the ranks disagree on the bit depths") == 2, proc.stdout


def test_a_rank_whose_peer_already_stopped_says_so_without_a_traceback(monkeypatch, capsys):
    # a rank still waiting in a collective (the run folder's broadcast) when the rank it waits for
    # has failed gets the clean one-paragraph error, as every other ScnError does
    from scn import cli, distributed

    def closed():
        raise RuntimeError("Connection closed by peer")

    def peer_gone(cfg, group):
        distributed._collective(closed)

    stopped = []
    monkeypatch.setattr(cli.distributed, "start", lambda device_type: distributed.Group(1, 2, 1))
    monkeypatch.setattr(cli.distributed, "stop", lambda: stopped.append(True))
    monkeypatch.setattr(cli, "_train", peer_gone)
    with pytest.raises(SystemExit) as exit_:
        cli.train_main.__wrapped__({"trainer": {"device": "cpu"}})
    assert exit_.value.code == 2 and stopped == [True]
    err = capsys.readouterr().err
    assert "scn: error: another rank stopped or cannot be reached (Connection closed by peer)" in err
