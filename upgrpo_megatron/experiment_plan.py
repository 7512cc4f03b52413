"""An experiment: a grid of arms x seeds on one recipe, in blocks, with one post-SFT model per seed shared by
every arm (a paired design: arms differ only in what the experiment varies).

    name: miniature
    recipe: ../recipes/qwen_moe.yaml        # relative to the experiment file
    seeds: [1, 2, 3]
    overrides: [trainer.total_steps=80]     # every run (SFT jobs included)
    sft: [sft_warmup.steps=800]             # the per-seed SFT job (it runs with trainer.total_steps=0)
    blocks:
      A:
        description: pi_old from the trainer, no mismatch
        overrides: [actor.lr=1e-3]          # every arm of the block
        baseline: dapo                      # paired differences are taken against this arm
        arms:
          dapo: [algorithm.loss_mode=vanilla]
          up_grpo: [algorithm.loss_mode=up_grpo]

Run directories: OUT/sft/seed<S>, OUT/<block>/<arm>/seed<S>; an arm run starts from
OUT/sft/seed<S>/checkpoints/step_000000 (`trainer.init_from`). A run is done when OUT/.../DONE exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from upgrpo_megatron.errors import UpgrpoError


class ExperimentError(UpgrpoError, ValueError):
    """An experiment file cannot be used; the message names the key and the file."""


@dataclass
class Block:
    name: str
    description: str
    overrides: List[str]
    baseline: str
    arms: Dict[str, List[str]]


@dataclass
class Experiment:
    name: str
    path: Path
    recipe: Path
    seeds: List[int]
    overrides: List[str] = field(default_factory=list)
    sft: List[str] = field(default_factory=list)
    blocks: List[Block] = field(default_factory=list)


@dataclass
class PlannedRun:
    kind: str            # "sft" | "arm"
    block: Optional[str]
    arm: Optional[str]
    seed: int
    run_dir: Path
    overrides: List[str]

    @property
    def done(self) -> bool:
        return (self.run_dir / "DONE").exists()


def _strings(value, key: str, where: str) -> List[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ExperimentError(f"{key} in {where}: expected a list of dotted.key=value overrides, got {value!r}")
    return list(value)


def load_experiment(path) -> Experiment:
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ExperimentError(f"{path}: not a readable YAML file ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: an experiment must be a mapping")
    unknown = set(data) - {"name", "recipe", "seeds", "overrides", "sft", "blocks"}
    if unknown:
        raise ExperimentError(f"{path}: unknown keys {sorted(unknown)}")
    for key in ("name", "recipe", "seeds", "blocks"):
        if key not in data:
            raise ExperimentError(f"{path}: '{key}' is missing")
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ExperimentError(f"seeds in {path}: expected a non-empty list of integers, got {seeds!r}")
    recipe = (path.parent / str(data["recipe"])).resolve()
    if not recipe.is_file():
        raise ExperimentError(f"recipe in {path}: {recipe} does not exist")
    exp = Experiment(str(data["name"]), path, recipe, seeds, _strings(data.get("overrides"), "overrides", str(path)),
                     _strings(data.get("sft"), "sft", str(path)))
    if not isinstance(data["blocks"], dict) or not data["blocks"]:
        raise ExperimentError(f"blocks in {path}: expected a mapping of blocks")
    for name, b in data["blocks"].items():
        where = f"blocks.{name} in {path}"
        if not isinstance(b, dict) or not isinstance(b.get("arms"), dict) or not b["arms"]:
            raise ExperimentError(f"{where}: expected a mapping with 'arms'")
        arms = {str(a): _strings(o, f"blocks.{name}.arms.{a}", str(path)) for a, o in b["arms"].items()}
        baseline = str(b.get("baseline", next(iter(arms))))
        if baseline not in arms:
            raise ExperimentError(f"{where}: baseline '{baseline}' is not one of its arms {sorted(arms)}")
        exp.blocks.append(Block(str(name), str(b.get("description", "")),
                                _strings(b.get("overrides"), f"blocks.{name}.overrides", str(path)), baseline, arms))
    return exp


def sft_checkpoint(out: Path, seed: int) -> Path:
    return out / "sft" / f"seed{seed}" / "checkpoints" / "step_000000"


def plan(exp: Experiment, out: Path, *, blocks: Sequence[str] = (), seeds: Sequence[int] = ()) -> List[PlannedRun]:
    """Every run of the experiment in the order to run them: each seed's SFT job, then the arms."""
    out = Path(out)
    seeds = list(seeds) or exp.seeds
    by_name = {b.name: b for b in exp.blocks}
    chosen = [by_name[n] for n in blocks if n in by_name] if blocks else exp.blocks  # in the order asked for
    unknown = set(blocks) - set(by_name)
    if unknown:
        raise ExperimentError(f"--blocks {sorted(unknown)}: the experiment has {[b.name for b in exp.blocks]}")
    runs = []
    for s in seeds:
        d = out / "sft" / f"seed{s}"
        runs.append(PlannedRun("sft", None, None, s, d, [*exp.overrides, *exp.sft, f"trainer.seed={s}",
                                                          "trainer.total_steps=0", f"trainer.run_dir={d}"]))
    for b in chosen:
        for arm, arm_overrides in b.arms.items():
            for s in seeds:
                d = out / b.name / arm / f"seed{s}"
                runs.append(PlannedRun("arm", b.name, arm, s, d, [
                    *exp.overrides, *b.overrides, *arm_overrides, f"trainer.seed={s}", f"trainer.run_dir={d}",
                    f"trainer.init_from={sft_checkpoint(out, s)}"]))
    return runs
