"""Running configured experiments from Python, resumably: finished runs are not run again.

`run_overrides(["+experiment=...", "quant=fixed"], run_dir)` composes the same config
`scn-train` would and runs it in `run_dir`, unless that folder already holds a finished run
of the same config (same `config_hash` in summary.json), in which case the summary is
returned as it is. Benchmarks and paper figures use this, so a killed script resumes.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from scn import experiment

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def compose_config(overrides: list[str]) -> DictConfig:
    """The config `scn-train OVERRIDES` would run (without Hydra's own settings)."""
    from scn.cli import register_defaults  # the config classes' defaults, which configs/ extends

    register_defaults()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def run_overrides(overrides: list[str], run_dir: str | Path, progress: bool = False) -> dict:
    """Run (or reuse) the experiment `overrides` describe in `run_dir`; returns its summary."""
    from scn.cli import build_experiment  # the CLI owns Hydra-config -> objects

    # resume=true: a benchmark killed mid-run continues from the run's training checkpoint.
    overrides = [*overrides, f"trainer.progress={str(progress).lower()}", "resume=true"]
    cfg = compose_config(overrides)
    run_dir = Path(run_dir)
    done = experiment.finished_summary(run_dir, experiment.config_hash(_container(cfg)))
    if done is not None:
        print(f"reusing finished run {run_dir}")
        return {**done, "run_dir": str(run_dir)}
    print(f"running {' '.join(overrides)} -> {run_dir}")
    summary = experiment.run(build_experiment(cfg), run_dir, resume=True)
    return {**summary, "run_dir": str(run_dir)}


def _container(cfg: DictConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)
