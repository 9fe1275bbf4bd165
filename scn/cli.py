"""Command-line entry points. Hydra lives here and nowhere else: configs in, library calls out."""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from scn import aggregate, config, distributed, experiment, io, methods, models, schedule
from scn.errors import ConfigError, DataError, NumericalError, ScnError
from scn.train import TrainConfig

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
GROUPS = ("dataset", "model", "quant", "size_loss", "trainer", "logger")
# Every top-level key configs/train.yaml composes; anything else is a typo (e.g. +colour=red).
TOP_LEVEL = {"seed": int, "resume": bool}


class CheckOutputFolder(Callback):
    """Hydra callback (configs/train.yaml): make the run or sweep folder before Hydra does, so a
    folder that cannot be written (a read-only file system, a path through a file) is a clear
    error instead of Hydra's traceback."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _make_folder(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _make_folder(config.hydra.sweep.dir, "hydra.sweep.dir")


def _make_folder(folder: str, key: str) -> None:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        # A probe of its own per process: the ranks of a torchrun job probe the same folder at once.
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".scn-write-test-"):
            pass
    except OSError as exc:
        fail(f"cannot write the run folder {folder}: {exc.strerror or exc}. Choose a folder you can "
             f"write to with {key}=DIR (or make this one writable).")


def register_defaults() -> None:
    """Every config class's defaults as a Hydra config `/defaults/<group>/<option>`.

    The option files in configs/ extend these (`defaults: [/defaults/<group>/<option>@_here_]`)
    and add only their `_target_` and what differs, so a default lives in its dataclass alone.
    """
    for name in methods.PLUGINS.values():  # plugins register their classes when imported
        importlib.import_module(name)
    sources = {("trainer", "default"): TrainConfig, ("size_loss", "constant"): schedule.Constant,
               ("size_loss", "linear_warmup"): schedule.LinearWarmup,
               ("size_loss", "cosine"): schedule.Cosine,
               **{("quant", kind): cls for kind, cls in methods.REGISTRY.items()}}
    store = ConfigStore.instance()
    for (group, option), cls in sources.items():
        store.store(group=f"defaults/{group}", name=option,
                    node={f.name: f.default for f in dataclasses.fields(cls)})


register_defaults()


def fail(message: str, code: int = 2) -> None:
    print(f"\nscn: error: {message}\n", file=sys.stderr)
    sys.exit(code)


def _check_node(cfg: DictConfig, key: str) -> None:
    """Keys and value types of group `key`, checked against what its _target_ accepts."""
    node = cfg[key]
    missing = sorted(OmegaConf.missing_keys(node))
    if missing:
        name = missing[0] if missing[0].startswith(f"{key}.") else f"{key}.{missing[0]}"
        raise ConfigError(f"{name} is required and was not given: add {name}=VALUE to the "
                          "command line.")
    try:
        values = OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"the {key} config cannot be resolved: {exc}".rstrip(".") + ".") from None
    target = config.locate(values.get("_target_"))
    if target is None:
        return  # an unknown _target_: instantiate names it
    supplied = ("in_channels", "num_classes", "image_size")
    if target is models.build_torchvision:  # name: a torchvision builder, checked when built
        config.check_arguments(models.torchvision_model, values, key, supplied=supplied,
                               extra=("name", "init_from"))
        return
    if target is not models.build:
        config.check_arguments(target, values, key)
        return
    # build(name, **kwargs) hands the other keys to the model class `name` names.
    name = values.get("name")
    if name not in models.MODELS:
        raise config.invalid(f"{key}.name", name, "one of " + ", ".join(sorted(models.MODELS)))
    config.check_arguments(models.MODELS[name], values, key, extra=("name", "init_from"),
                           supplied=supplied)


def _instantiate(cfg: DictConfig, key: str, **kwargs):
    """Instantiate group `key` after checking it, turning Hydra's wrapped errors back into a
    one-paragraph reason."""
    _check_node(cfg, key)
    try:
        return instantiate(cfg[key], _convert_="all", **kwargs)  # plain lists, not ListConfig
    except MissingMandatoryValue as exc:
        raise ConfigError(f"{exc.full_key} is required and was not given: add "
                          f"{exc.full_key}=VALUE to the command line.") from None
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, ScnError):
            raise cause from None
        raise ConfigError(f"the {key} config is invalid: {cause}. Check the {key}.* keys "
                          f"(python -m scn.cli --cfg job shows the composed config).") from None


def _check_top_level(cfg: DictConfig) -> None:
    for key in cfg:
        if key not in GROUPS and key not in TOP_LEVEL:
            valid = ", ".join(sorted([*GROUPS, *TOP_LEVEL]))
            raise ConfigError(f"{key}={config.show(cfg[key])} is not a setting: the config has no top-level "
                              f"key {key!r}. Its valid keys are {valid}.")
    for key, kind in TOP_LEVEL.items():
        if key in cfg:
            config.check_value(key, cfg[key], kind)


def build_experiment(cfg: DictConfig) -> experiment.Experiment:
    """Validate the cheap groups first, so a typo fails before any data is read."""
    _check_top_level(cfg)
    trainer = _instantiate(cfg, "trainer")
    distributed.check_batch(trainer.batch_size)  # under torchrun: the global batch must split evenly
    scheme = _instantiate(cfg, "quant")
    schedule = _instantiate(cfg, "size_loss")
    model = _instantiate(cfg, "model")
    with torch.device("meta"):  # the model's own range checks, before any data (allocates nothing)
        model()
    logger = _instantiate(cfg, "logger") if cfg.get("logger") else None  # logger=csv: none
    data = _instantiate(cfg, "dataset")
    exp = experiment.Experiment(
        data=data, model=model, scheme=scheme, schedule=schedule, trainer=trainer,
        seed=cfg.seed, config=OmegaConf.to_container(cfg, resolve=True), logger=logger,
    )
    exp.check_fits()  # on the meta device: inputs that fit the model, memory that fits the device
    exp.build_model()  # milliseconds; a bad model setting fails here, before training starts
    return exp


def _discard_empty_run_dir(run_dir: Path) -> None:
    """Remove a run folder holding only what Hydra wrote before we failed: nothing half-done."""
    if not run_dir.is_dir():
        return
    ours = [p for p in run_dir.iterdir() if p.name != ".hydra" and p.suffix != ".log"]
    if not ours:
        shutil.rmtree(run_dir, ignore_errors=True)


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def train_main(cfg: DictConfig) -> float | None:
    """scn-train: compose dataset, model, quant, size_loss and trainer; train; write the run.
    Under torchrun, every rank runs this; rank 0 writes the run folder (scn.distributed)."""
    try:
        return _train(cfg, distributed.start(_device_type(cfg)))
    except ScnError as exc:  # also under torchrun: a rank that cannot join, or whose peer stopped
        return fail(str(exc))
    finally:
        distributed.stop()  # nothing to leave when start failed


def _device_type(cfg: DictConfig) -> str:
    device = str((cfg.get("trainer") or {}).get("device", "auto"))
    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


def _train(cfg: DictConfig, group: distributed.Group | None) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode.name == "MULTIRUN"
    if group is not None:  # one run folder, rank 0's (a timestamped name may differ by rank)
        shared = Path(distributed.broadcast_object(str(run_dir)))
        if shared != run_dir:
            _discard_empty_run_dir(run_dir)
        run_dir = shared
    try:
        exp = build_experiment(cfg)
    except (ConfigError, DataError) as exc:
        _discard_empty_run_dir(run_dir)
        return fail(str(exc)) if not multirun else print(f"scn: error: {exc}", file=sys.stderr)
    done = experiment.finished_summary(run_dir, experiment.config_hash(exp.config))
    if done is not None and group is not None and not group.main:
        return None  # rank 0 says so
    if done is not None:  # a re-launched sweep: this job's run is already complete
        print(f"\nscn: skipped: {run_dir} already holds a finished run of this config "
              f"(test accuracy {done['test_accuracy']:.2f}% at {done['bits_per_weight']:.3f} "
              "bits/weight); not training it again. Remove the folder to re-run it.")
        return _objective(done)
    try:
        summary = experiment.run(exp, run_dir, resume=cfg.get("resume", False), notify=_notice,
                                 record=lambda folder: _record(folder, cfg))
    except ScnError as exc:
        message = f"{exc}{_what_is_kept(run_dir, exc)}"
        if multirun:  # a sweep goes on with its other runs
            print(f"scn: error: {message}", file=sys.stderr)
            return None
        return fail(message, code=1)
    except KeyboardInterrupt as exc:
        if multirun:
            raise  # Ctrl-C stops the whole sweep
        return fail(f"interrupted{_what_is_kept(run_dir, exc)}", code=130)
    if group is not None and not group.main:
        return None  # rank 0 reports
    if summary["status"] == "paused":
        print(f"\nscn: paused at step {summary['step']} of {summary['total_steps']} "
              f"(trainer.pause_after_steps); the same command with resume=true goes on. "
              f"Run folder: {run_dir}")
        return None
    print(f"\nscn: finished: test accuracy {summary['test_accuracy']:.2f}% at "
          f"{summary['bits_per_weight']:.3f} bits/weight ({summary['float_bits_pct']:.2f}% of "
          f"float32), {summary['weights_left_pct']:.1f}% of weights left. Run folder: {run_dir}")
    return _objective(summary)


def _record(run_dir: Path, cfg: DictConfig) -> None:
    """The run's .hydra/ record (its config, overrides and Hydra's settings), as Hydra writes it,
    but only once the run has been accepted in the folder (hydra.output_subdir is null)."""
    hc = HydraConfig.get()
    folder = run_dir / ".hydra"
    io.write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    io.write_text(folder / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(hc.overrides.task))))
    io.write_text(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})))


def _notice(message: str) -> None:
    print(f"scn: {message}", file=sys.stderr)


def _what_is_kept(run_dir: Path, exc: BaseException) -> str:
    """What a run that failed while training left behind ("" for an error raised before)."""
    summary = experiment.read_summary(run_dir) or {}
    causes = {str(e) or type(e).__name__ for e in (exc, exc.__cause__) if e is not None}
    if summary.get("status") != "failed" or summary.get("error") not in causes:
        return ""  # refused before training: the folder is as it was
    step = summary.get("checkpoint_step")
    if step is None:
        return f" (the run folder {run_dir} keeps what was finished.)"
    if isinstance(exc, NumericalError):  # resuming would diverge again: nothing to suggest
        return (f" (the run folder {run_dir} keeps what was finished, and its last good training "
                f"checkpoint, of step {step}.)")
    return (f" (the run folder {run_dir} keeps what was finished, and its last training checkpoint, "
            f"of step {step}: resume=true continues from it.)")


def _objective(summary: dict) -> float | tuple[float, float]:
    """What a sweeper optimises: test accuracy; (test accuracy, model bytes) when the sweeper
    has two directions (hparams_search: direction [maximize, minimize])."""
    direction = HydraConfig.get().sweeper.get("direction")
    if (OmegaConf.is_list(direction) or isinstance(direction, (list, tuple))) and len(direction) == 2:
        return summary["test_accuracy"], aggregate.size_bytes(summary)[0]
    return summary["test_accuracy"]


if __name__ == "__main__":
    train_main()
