"""One run, start to finish: build, train, and leave a complete run folder.

The run folder (every file written atomically): what scn.run_folder writes while training
(metrics.csv, train_log.csv, curves.png, checkpoint/train_state.safetensors), and at the end
    summary.json       final figures at top level, best figures, status, config
    model.safetensors  the trained (shrunk) model with float weights, b and e; reloadable
    model.scn          the same model packed: each channel's codes at its own bit depth

A killed run continues with `run(exp, run_dir, resume=True)` (scn-train ... resume=true): from
its last training checkpoint, to the same result, the CSVs cut back to the checkpoint's rows.
With trainer.pause_after_steps=N a run stops itself after N steps (summary status "paused",
a checkpoint written) and resumes the same way: a run trained in slices ends as one that was not.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from scn import checkpoint, distributed, evaluation, followers, io, size
from scn import format as scn_format
from scn import resume as train_state
from scn.data import ImageData
from scn.errors import ConfigError, FormatError, ScnError
from scn.loggers import Logger
from scn.methods import Method, quantize_
from scn.report import machine
from scn.run_folder import RunFolder
from scn.train import TrainConfig, Trainer, TrainResult, learns_bits, pick_device

SUMMARY_KEYS = ("test_accuracy", "bits_per_weight", "float_bits_pct", "weights_left_pct",
                "param_count", "wall_time_s", "status")


@dataclass
class Experiment:
    """Everything one run needs, as plain objects (the CLI builds it from Hydra configs)."""

    data: ImageData
    model: Callable[..., torch.nn.Module]  # scn.models.build with its name and arguments bound
    scheme: Method  # a scn.methods config class (SelfCompress, FixedBits, Float, a plugin)
    schedule: Callable[[int, int], float]
    trainer: TrainConfig
    seed: int = 0
    config: dict | None = None  # the resolved config, recorded in summary.json
    logger: Logger | None = None  # beside the run folder's CSVs (scn.loggers); None: CSVs only

    def build_model(self) -> torch.nn.Module:
        c, h, _ = self.data.input_shape
        torch.manual_seed(self.seed)  # the same initial weights for every scheme
        model = self.model(in_channels=c, num_classes=self.data.num_classes, image_size=h)
        return quantize_(model, self.scheme)

    def check_fits(self) -> None:
        """Refuse, before anything is allocated, a model that cannot take the data's inputs or
        cannot train in the device's memory: built and run on the meta device (nothing is
        allocated), the estimate counts weights, gradients and AdamW's two moments, and each
        layer's output at trainer.batch_size kept for the backward pass with its gradient."""
        c, h, _ = self.data.input_shape
        outputs: list[int] = []
        try:
            with torch.device("meta"):
                model = quantize_(self.model(in_channels=c, num_classes=self.data.num_classes,
                                             image_size=h), self.scheme)
            hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.numel()))
                     for m in model.modules() if not list(m.children())]
            with torch.no_grad():
                model(torch.zeros((self.trainer.batch_size, *self.data.input_shape), device="meta"))
        except (RuntimeError, ValueError, IndexError, ZeroDivisionError) as exc:
            raise ConfigError(f"the model cannot take the dataset's inputs of shape "
                              f"{list(self.data.input_shape)} ({str(exc).splitlines()[0]}). Check "
                              "model.* against dataset.image_size (a smaller image leaves no pixels "
                              "for the deeper layers).") from None
        for hook in hooks:
            hook.remove()
        params = sum(p.numel() for p in model.parameters())
        need = 4 * (4 * params + 2 * sum(outputs))  # float32 bytes
        device = pick_device(self.trainer.device)
        have = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        if need > have:
            raise ConfigError(
                f"this model has {params:,} parameters and needs about {need / 2**30:,.1f} GiB to "
                f"train at trainer.batch_size={self.trainer.batch_size}, more than the "
                f"{have / 2**30:,.1f} GiB of {device.type} memory here. Lower model.width (or "
                "trainer.batch_size, or dataset.image_size).")

    def dataset_info(self) -> dict:
        info = {"name": self.data.name, "classes": self.data.classes,
                "input_shape": list(self.data.input_shape),
                "mean": self.data.mean.tolist(), "std": self.data.std.tolist()}
        loader = loader_of((self.config or {}).get("dataset"))
        return {**info, "loader": loader} if loader else info


# The loader arguments a file records so scn-eval can rebuild the test split; never a path
# (root, cache_dir: a file is shared, the data's place is the reader's to say with --root).
_LOADER_KEYS = {"fashion_mnist": (), "cifar10": (), "image_folder": ("image_size", "channels", "name"),
                "synthetic": ("num_train", "num_test", "num_classes", "image_size", "channels", "seed")}


def loader_of(dataset_config: dict | None) -> dict | None:
    """{"name": loader, "kwargs": {...}} for one of scn's own dataset loaders, else None."""
    target = str((dataset_config or {}).get("_target_", ""))
    name = target.rpartition(".")[2]
    if not target.startswith("scn.data.") or name not in _LOADER_KEYS:
        return None
    return {"name": name, "kwargs": {k: dataset_config[k] for k in _LOADER_KEYS[name]
                                     if dataset_config.get(k) is not None}}


# Keys that change nothing about the result: a run differing only in these is the same run
# (`resume`, checkpoint_every and pause_after_steps included: a resumed run ends exactly as an
# uninterrupted one).
_HASH_IGNORED = {("trainer", "progress"), ("trainer", "log_every"), ("trainer", "checkpoint_every"),
                 ("trainer", "pause_after_steps")}
_HASH_IGNORED_TOP = {"hydra", "resume", "logger"}
# Settings added after runs were made, at the value that does what those runs did: left out of
# the hash, so that a new setting does not turn every finished run into "another config".
_HASH_NEUTRAL = {("trainer", "channel_multiple"): 1, ("trainer", "recalibrate_bn"): 0,
                 ("trainer", "freeze_quant"): 0.0, ("trainer", "entropy_code"): False,
                 ("trainer", "sync_norms"): False, ("model", "init_from"): None,
                 ("trainer", "quant_lr_schedule"): "cosine", ("quant", "min_bits"): 1,
                 ("quant", "exponent_refit"): False, ("quant", "flops_charge"): 0.0,
                 ("quant", "channel_price"): "bits",
                 ("trainer", "stop_shrinking_at"): 0.0, ("trainer", "budget_bits"): 0,
                 ("trainer", "hold_bits"): False}


def _hashed(config: dict | None) -> dict:
    """The part of a resolved config that decides the result."""
    def kept(k: str, kk: str, vv) -> bool:
        return (k, kk) not in _HASH_IGNORED and _HASH_NEUTRAL.get((k, kk), _UNSET) != vv

    return {k: ({kk: vv for kk, vv in v.items() if kept(k, kk, vv)} if isinstance(v, dict) else v)
            for k, v in (config or {}).items() if k not in _HASH_IGNORED_TOP}


def _check_charges_have_surgery(exp: Experiment) -> None:
    """The size term's charges read the channel graph, which only a run with surgery traces:
    refuse them there rather than train without them."""
    charges = [f"quant.{k}" for k in ("live_input_grad", "flops_charge") if getattr(exp.scheme, k, 0)]
    if charges and not exp.trainer.does_surgery:
        verb = "acts" if len(charges) == 1 else "act"
        raise ConfigError(f"{' and '.join(charges)} {verb} through channel surgery's graph, which this "
                          f"run does not build (trainer.prune_every={exp.trainer.prune_every}, "
                          f"trainer.surgery={exp.trainer.surgery}). Turn surgery on, or set "
                          f"{' '.join(c + '=0' for c in charges)} (quant=self_compress has neither).")


def config_hash(config: dict | None) -> str:
    """A short fingerprint of a resolved config, for recognising a run already done."""
    text = json.dumps(_hashed(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_changes(old: dict | None, new: dict | None, limit: int = 5) -> list[str]:
    """The keys whose values differ between two configs ("trainer.lr: 0.003 -> 0.01")."""
    a, b = _flat(_hashed(old)), _flat(_hashed(new))
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k, _UNSET) != b.get(k, _UNSET)]
    return [f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in changed[:limit]]


_UNSET = object()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_summary(run_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def finished_summary(run_dir: str | Path, digest: str) -> dict | None:
    """The summary of a finished run of this config in `run_dir`, or None."""
    summary = read_summary(run_dir)
    if summary and summary.get("status") == "finished" and summary.get("config_hash") == digest:
        return summary
    return None


def run(exp: Experiment, run_dir: str | Path, resume: bool = False,
        notify: Callable[[str], None] | None = None,
        record: Callable[[Path], None] | None = None) -> dict:
    """Train and write the run folder; returns the summary. Failures leave a 'failed' summary.

    A folder that already holds a finished run is never overwritten: the same config returns
    its summary (a re-launched sweep skips it), a different config is an error. With `resume`,
    training continues from the folder's training checkpoint when it has one (of the same
    config: else an error); `notify` receives one-line notices (resuming, starting afresh).
    A run paused by trainer.pause_after_steps returns its "paused" summary (step, total_steps).
    The folder is locked while the run owns it (a second run there is refused at once); `record`
    (scn-train's: the .hydra/ files) is called only once the run has been accepted.
    """
    run_dir = Path(run_dir)
    group = distributed.current()
    if group is not None and not group.main:
        return followers.follow(exp)  # rank 0 decides, writes, and says how the run ended
    leader = followers.Leader()
    try:
        try:
            with io.folder_lock(run_dir):
                summary = _run_locked(exp, run_dir, resume, notify or (lambda message: None), record,
                                      leader)
        except io.FolderInUse as exc:
            raise ScnError(f"{run_dir} is in use by another scn-train (process {exc.pid}), and one "
                           "run folder holds one run. Wait for it to finish, or choose another "
                           "folder (hydra.run.dir=...); nothing in the folder was changed.") from None
    except ScnError as exc:
        leader.fail(str(exc))
        raise
    leader.finish(summary)
    return summary


def _run_locked(exp: Experiment, run_dir: Path, resume: bool, notify: Callable[[str], None],
                record: Callable[[Path], None] | None, leader: followers.Leader) -> dict:
    digest = config_hash(exp.config)
    previous = read_summary(run_dir)
    if previous and previous.get("status") == "finished":
        if previous.get("config_hash") == digest:
            return previous
        raise ScnError(f"{run_dir} already holds a finished run of another config; scn never "
                       "overwrites a finished run. Choose another folder (hydra.run.dir=...).")
    if exp.trainer.pause_after_steps and not exp.scheme.packs:
        raise ConfigError(f"trainer.pause_after_steps needs training checkpoints, which "
                          f"quant={exp.scheme.kind} runs do not write; set trainer.pause_after_steps=0.")
    _check_charges_have_surgery(exp)
    state = _starting_state(exp, run_dir, digest, resume, notify)
    if record is not None:
        record(run_dir)
    try:
        return _run(exp, run_dir, digest, state, leader)
    except OSError as exc:  # a full disk, a folder gone: say which file, keep the traceback out
        where = f"writing {exc.filename}" if exc.filename else f"writing into {run_dir}"
        raise ScnError(f"{where} failed: {exc.strerror or exc}. Free space (or fix the folder) "
                       "before running again.") from exc


def _starting_state(exp: Experiment, run_dir: Path, digest: str, resume: bool,
                    notify: Callable[[str], None]) -> train_state.State | None:
    """The training checkpoint to continue from, or None to start at step 0."""
    path = train_state.path_in(run_dir)
    for folder in (run_dir, path.parent):  # what a kill during a write left behind
        io.remove_temporaries(folder)
    if not path.exists():
        if resume:
            notify(f"resume=true but {run_dir} holds no training checkpoint: starting from step 0.")
        return None
    if not resume:
        try:
            step = train_state.load(path).step
            notify(f"{run_dir} holds the training checkpoint of an unfinished run (step {step}); "
                   "starting from step 0 as resume=false, which replaces it. Add resume=true to "
                   "continue it instead.")
        except FormatError:
            notify(f"{run_dir} holds an unreadable training checkpoint; starting from step 0, "
                   "which replaces it.")
        path.unlink()
        return None
    state = train_state.load(path)
    if state.meta.get("config_hash") != digest:
        changes = "; ".join(config_changes(state.meta.get("config"), exp.config)) or "unknown keys"
        raise ScnError(f"the training checkpoint in {run_dir} belongs to a run of another config "
                       f"({changes}), and a resumed run must use the same settings. Resume with "
                       "the original overrides, or start a new run in another folder "
                       "(hydra.run.dir=...).")
    notify(f"resuming {run_dir} from its training checkpoint at step {state.step} of "
           f"{state.meta['total_steps']}.")
    before, now = state.meta.get("world_size", 1), distributed.world_size()
    if now != before:
        notify(f"the checkpoint was written by a run of {before} process(es), this one has "
               f"{now}: the global batch is the same, so training goes "
               "on, but it is not bit-identical to an uninterrupted run (each rank's BatchNorm "
               "statistics come from a slice of another size unless trainer.sync_norms=true, and "
               "sums run in another order).")
    return state


def _run(exp: Experiment, run_dir: Path, digest: str, state: train_state.State | None,
         leader: followers.Leader) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    model = train_state.build_model(state) if state else exp.build_model()
    folder = RunFolder(run_dir, model, _title(exp), exp.dataset_info(), digest, exp.config, state,
                       packs=exp.scheme.packs, logger=exp.logger)
    started = time.time()
    base = {"status": "running", "config_hash": digest, "config": exp.config, "machine": machine(),
            "world_size": distributed.world_size()}
    io.write_json(run_dir / "summary.json", base)
    try:
        leader.start(state)  # the other ranks build the same trainer now (DDP syncs them)
        trainer = Trainer(model, exp.data, exp.trainer, exp.schedule, learns_bits(model), exp.seed)
        if state:
            train_state.restore(trainer, state)
        result = trainer.run(folder)
        leader.trained = True
        if result.paused:  # the checkpoint is written: say where the run stands, and stop
            paused = {**base, "status": "paused", "step": trainer.step,
                      "total_steps": trainer.total_steps, "wall_time_s": result.wall_time_s}
            io.write_json(run_dir / "summary.json", paused)
            return paused
        rep = trainer.size.report()
        extra = {"file_bytes": None, **trainer.size.finish()}  # the model as its files store it
        example = trainer.data.normalize(trainer.data.test_x[:1])
        extra["flops"] = evaluation.flops(model, example)  # per image, final model
        extra["flops_original"] = evaluation.flops(exp.build_model().to(example.device), example)
        checkpoint.save_checkpoint(model, run_dir / "model.safetensors", exp.dataset_info())
        if exp.scheme.packs:
            extra["file_bytes"] = scn_format.save(model, run_dir / "model.scn", exp.dataset_info(),
                                                  entropy_coded=exp.trainer.entropy_code)
    except BaseException as exc:  # a failure must still leave an honest summary behind
        history = folder.history
        failed = {**base, "status": "failed", "error": str(exc) or type(exc).__name__,
                  "wall_time_s": time.time() - started, "history_rows": len(history),
                  "checkpoint_step": folder.checkpoint_step}
        if history:
            failed.update({f"last_{k}": v for k, v in history[-1].items() if not k.startswith("channels/")})
        try:
            io.write_json(run_dir / "summary.json", failed)
        except OSError:
            pass  # the disk that failed the run may refuse this too; the error says why
        raise
    finally:
        folder.close()
    summary = {**_summary(exp, rep, result, base), **extra}
    if folder.resumes:
        summary["resumed_at_steps"] = folder.resumes
    io.write_json(run_dir / "summary.json", summary)
    return summary


def _title(exp: Experiment) -> str:
    name = getattr(exp.model, "keywords", {}).get("name", "model")
    return f"{exp.data.name} / {name} / {exp.scheme.kind}"


def _summary(exp: Experiment, rep: size.SizeReport, result: TrainResult, base: dict) -> dict:
    final = result.final
    best = max(result.history, key=lambda r: r["test_accuracy"])
    return {
        "test_accuracy": final["test_accuracy"],
        "bits_per_weight": rep.bits_per_weight,
        "float_bits_pct": rep.float_bits_pct,
        "weights_left_pct": rep.weights_left_pct,
        "param_count": rep.param_count,
        "wall_time_s": result.wall_time_s,
        "status": "finished",
        "world_size": base.get("world_size", 1),
        "step_time_s": result.step_time_s,
        "images_per_s": result.images_per_s,
        "compile_time_s": result.compile_time_s,
        "steps": final["step"],
        "surgeries": result.surgeries,
        "ideal_bytes": rep.ideal_bytes,
        "payload_ideal_bytes": rep.payload_ideal_bytes,
        "float32_bytes": rep.float32_bytes,
        "channels_left": {k: v[0] for k, v in rep.channels.items()},
        "dead_channels_kept": rep.dead_channels,
        "channels_original": {k: v[1] for k, v in rep.channels.items()},
        "best": {"test_accuracy": best["test_accuracy"], "step": best["step"],
                 "bits_per_weight": best["bits_per_weight"]},
        "dataset_name": exp.data.name,
        "machine": base["machine"],
        "config_hash": base["config_hash"],
        "config": exp.config,
    }
