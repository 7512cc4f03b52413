"""compare_runs on 2 groups x 2 seeds of hand-written run directories: figure and hand-checked table, grouping
by the config keys the runs differ in (seed and run_dir aside), the warning that says so, --out safety."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from upgrpo_megatron.diagnostics.compare import compare
from upgrpo_megatron.diagnostics.run_files import ReportError

ROOT = Path(__file__).resolve().parents[3]
# val/acc per step 0, 2, 4 for each seed; KL and entropy at steps 1..4
RUNS = {
    "up_s1": ("up_grpo", [0.30, 0.50, 0.46], 0.0010, 1.20),   # peak 0.50 at step 2
    "up_s2": ("up_grpo", [0.30, 0.44, 0.54], 0.0014, 1.00),   # peak 0.54 at step 4
    "van_s1": ("vanilla", [0.30, 0.40, 0.40], 0.0020, 0.60),  # peak 0.40 first reached at step 2
    "van_s2": ("vanilla", [0.30, 0.36, 0.38], 0.0030, 0.80),  # peak 0.38 at step 4
}


def _write_run(path: Path, loss_mode: str, acc, kl: float, ent: float, lr: float = 3e-4) -> Path:
    path.mkdir(parents=True)
    seed = path.name[-1]  # *_s1, *_s2: seeds and run dirs differ between repeats, as in real runs
    (path / "config.yaml").write_text(f"algorithm:\n  loss_mode: {loss_mode}\nactor:\n  lr: {lr}\n"
                                      f"trainer:\n  seed: {seed}\n  run_dir: {path}\n")
    with open(path / "metrics.jsonl", "w") as f:
        for step in range(5):
            rec = {"step": step}
            if step % 2 == 0:
                rec["val/acc"] = acc[step // 2]
            if step:  # the final step carries the given KL and entropy; earlier steps something else
                rec["actor/ppo_kl"] = kl if step == 4 else 9.0
                rec["actor/entropy"] = ent if step == 4 else 9.0
                rec["actor/pg_clipfrac"] = 0.01 * step
                rec["mismatch/routing/pair_frac"] = 0.1
            f.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture()
def runs(tmp_path):
    return [_write_run(tmp_path / name, *spec) for name, spec in RUNS.items()]


def _row(md: str, group: str):
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {group} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_compare_groups_by_loss_mode_and_aggregates_seeds(runs, tmp_path):
    summary = compare(runs, tmp_path / "cmp")
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    assert "data:image/png;base64," in (tmp_path / "cmp" / "index.html").read_text()
    md = summary.read_text()
    up, van = _row(md, "loss_mode=up_grpo"), _row(md, "loss_mode=vanilla")
    # columns: group, runs, peak val/acc, step of peak, final ppo_kl, final entropy, final pair_frac
    # up: peaks 0.50, 0.54 -> mean 0.52, sample std sqrt(((-.02)^2 + .02^2) / 1) = 0.028284
    assert up[1] == "2" and up[2] == "0.52 ± 0.028" and up[3] == "2, 4"
    # final KL 0.0010, 0.0014 -> 0.0012 ± 0.00028; entropy 1.2, 1.0 -> 1.1 ± 0.14
    assert up[4] == "0.0012 ± 0.00028" and up[5] == "1.1 ± 0.14"
    # vanilla: peaks 0.40 (first at step 2), 0.38 -> 0.39 ± 0.014; KL 0.0025 ± 0.00071; entropy 0.7 ± 0.14
    assert van[2] == "0.39 ± 0.014" and van[3] == "2, 4"
    assert van[4] == "0.0025 ± 0.00071" and van[5] == "0.7 ± 0.14"


def test_labels_regroup_runs_by_glob(runs, tmp_path):
    md = compare(runs, tmp_path / "cmp", ["seed1=*_s1", "seed2=*/*_s2"]).read_text()
    s1 = _row(md, "seed1")
    # seed-1 runs: up_s1 (peak 0.50) and van_s1 (0.40) -> 0.45 ± 0.071
    assert s1[1] == "2" and s1[2] == "0.45 ± 0.071"
    assert _row(md, "seed2")[1] == "2"
    assert "> note: group seed1 mixes runs whose configs differ in algorithm.loss_mode" in md


def test_configs_differing_in_more_than_the_seed_are_grouped_by_those_keys_with_a_warning(tmp_path):
    runs = [_write_run(tmp_path / name, *RUNS[name], lr=lr) for name, lr in
            (("up_s1", 3e-4), ("up_s2", 3e-4), ("van_s1", 3e-4), ("van_s2", 1e-3))]
    md = compare(runs, tmp_path / "cmp").read_text()
    warning = next(ln for ln in md.splitlines() if ln.startswith("> **warning:**"))
    assert "differ in more than trainer.seed/trainer.run_dir: actor.lr (0.0003, 0.001); " \
           "algorithm.loss_mode (up_grpo, vanilla)." in warning
    groups = {_row(md, g)[0]: _row(md, g)[1] for g in
              ("lr=0.0003, loss_mode=up_grpo", "lr=0.0003, loss_mode=vanilla", "lr=0.001, loss_mode=vanilla")}
    assert groups == {"lr=0.0003, loss_mode=up_grpo": "2", "lr=0.0003, loss_mode=vanilla": "1",
                      "lr=0.001, loss_mode=vanilla": "1"}  # van_s2 is not averaged with van_s1 as a seed
    page = (tmp_path / "cmp" / "index.html").read_text()
    assert "<p class='warn'><b>warning:</b> the runs&#x27; configs differ in more than" in page


def test_runs_differing_only_in_seed_and_run_dir_are_one_group_without_warning(runs, tmp_path):
    md = compare(runs[:2], tmp_path / "cmp").read_text()
    assert _row(md, "loss_mode=up_grpo")[1] == "2"
    assert "warning" not in md and "warning" not in (tmp_path / "cmp" / "index.html").read_text()


def _cli():
    spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "tools" / "compare_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("relation", ["is", "lies inside", "contains"])
def test_compare_refuses_an_out_that_is_holds_or_lies_in_a_run_dir(runs, tmp_path, capsys, relation):
    out = {"is": runs[1], "lies inside": runs[2] / "compare", "contains": tmp_path}[relation]
    run = {"is": runs[1], "lies inside": runs[2], "contains": runs[0]}[relation]
    before = _snapshot(tmp_path)
    assert _cli().main([*map(str, runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {out} {relation} the input RUN_DIR {run}"), err
    assert _snapshot(tmp_path) == before


def test_compare_cli_errors_are_one_line(runs, tmp_path, capsys):
    mod = _cli()
    assert mod.main([str(runs[0]), str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"error: RUN_DIR {tmp_path / 'missing'}: no such run directory"
    assert mod.main([str(runs[0]), "--label", "nolabel", "--out", str(tmp_path / "o")]) == 2
    assert "expected NAME=GLOB" in capsys.readouterr().err
    with pytest.raises(ReportError):
        compare([], tmp_path / "o")
