"""The routing report renders from run directories written with our own writer API: a synthetic run with
routing mismatch, and one shaped like the fp32 CPU engine's (identical routing, w = 1 up to float noise)."""

import base64
import hashlib
import html
import importlib.util
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from upgrpo_megatron.diagnostics import report_figures
from upgrpo_megatron.diagnostics.report import ReportError, render_report
from upgrpo_megatron.diagnostics.step import step_diagnostics, update_diagnostics
from upgrpo_megatron.diagnostics.storage import DiagnosticsWriter, append_samples
from upgrpo_megatron.diagnostics.synthetic import make_synthetic_run, random_routing

ROOT = Path(__file__).resolve().parents[3]
EVIL = [{"prompt": "<script>alert('pwned')</script> 2+2=", "response": "4 </pre><b>bold?</b>", "reward": 1.0}]
# the trainer logs several responses of one prompt per step
REPEATED = [{"prompt": p, "response": r, "reward": w} for p, r, w in
            (("7+1=", "8", 1.0), ("7+1=", "9", 0.0), ("7+1=", "8", 1.0), ("2+5=", "7", 1.0), ("2+5=", "6", 0.0))]
FIGURES = ("curves.png", "heatmaps.png", "ratio_heatmaps.png", "log_ratio_hist.png")


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_fp32_engine_run(run: Path, steps: int = 3, batch: int = 8, response_len: int = 4, layers: int = 2,
                         experts: int = 8, topk: int = 2) -> Path:
    """A run as the fp32 CPU engine leaves it: the engine routes exactly like the trainer, its log-probs differ
    by rounding (1e-8), while the update moves the policy for real (r varies). Two prompts per step."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        f"model:\n  num_layers: {layers}\n  num_experts: {experts}\n  moe_router_topk: {topk}\n"
        "algorithm:\n  loss_mode: up_grpo\nrollout:\n  n: 4\n  dtype: fp32\n"
        "trainer:\n  seed: 1\n  prompts_per_step: 2\n")
    g = torch.Generator().manual_seed(0)
    writer, mask = DiagnosticsWriter(run), torch.ones(batch, response_len)
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            train, probs = random_routing(batch, response_len, layers, topk, experts, g)
            adv = torch.randn(batch, 1, generator=g).expand(batch, response_len).contiguous()
            old = -torch.rand(batch, response_len, generator=g)
            rollout = old + 1e-8 * torch.randn(batch, response_len, generator=g)
            m, arrays = step_diagnostics(response_mask=mask, advantages=adv, old_log_prob=old,
                                         rollout_log_prob=rollout, train_routing=train, rollout_routing=train.clone(),
                                         num_experts=experts, clip_low=0.2, clip_high=0.28, router_scores=probs)
            new = old + 0.05 * torch.randn(batch, response_len, generator=g)
            dm, darr = update_diagnostics(response_mask=mask, advantages=adv, old_log_prob=old, log_prob=new,
                                          old_routing=train, new_routing=train.clone(), num_experts=experts,
                                          clip_low=0.2, clip_high=0.28)
            m.update(dm)
            arrays.update(darr)
            finite = {k: v for k, v in m.items() if isinstance(v, float) and math.isfinite(v)}
            f.write(json.dumps({"step": step, "val/acc": 0.5, **finite}) + "\n")
            writer.write(step, arrays)
            append_samples(run, step, [{"prompt": f"{step}+{i}=", "response": str(step + i), "reward": 1.0}
                                       for i in (1, 1, 2, 2)])
    return run


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    run = make_synthetic_run(tmp_path_factory.mktemp("run") / "r", steps=3, batch=6, response_len=4, samples=EVIL)
    return run, render_report(run)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    run = make_fp32_engine_run(tmp_path_factory.mktemp("fp32") / "r")
    return run, render_report(run)


def _sections(page: str):
    """(h2 title, the definition paragraph right after the heading or its figure) of every section."""
    return re.findall(r"<h2>([^<]*)</h2>\n(?:<img [^>]*>\n)?<p class='def'>([^<]+)</p>", page)


def test_report_writes_self_contained_html_pngs_and_markdown(rendered):
    run, index = rendered
    out = run / "report"
    assert index == out / "index.html"
    for png in FIGURES:
        assert (out / png).stat().st_size > 10_000, png
    page = index.read_text()
    assert "<title>Routing-mismatch report</title>" in page
    # four figures embedded, and no resource that needs the network or another file
    assert page.count("src='data:image/png;base64,") == 4
    assert not re.search(r"(src|href)=['\"](?!data:)", page)
    for section in ("Top offending layers", "Top offending experts: routing mismatch",
                    "Top offending experts: ratio variance", "Capture validity", "Sample rollouts", "Last step (3)"):
        assert f"<h2>{section}</h2>" in page
    md = (out / "summary.md").read_text()
    assert "| MoE layer | expert | flip rate |" in md and "](heatmaps.png)" in md and "](ratio_heatmaps.png)" in md


def test_reading_guide_and_a_definition_under_every_figure_and_table(rendered):
    run, index = rendered
    page, md = index.read_text(), (run / "report" / "summary.md").read_text()
    guide = re.search(r"<p class='guide' id='guide'><b>How to read this report.</b> ([^<]+)</p>", page).group(1)
    for words in ("up_grpo loss for 3 RL steps", "w = π_trainer/π_rollout is the train-inference mismatch",
                  "r = π_θ/π_old is the drift during the update", "Routing mismatch: at every MoE layer",
                  "that (token, layer) pair mismatches"):
        assert words in guide, words
    assert f"**How to read this report.** {html.unescape(guide)}" in md
    sections = _sections(page)
    titles = re.findall(r"<h2>([^<]*)</h2>", page)
    assert [t for t, _ in sections] == titles  # every section has its definition, right under it
    assert all(10 < len(d.split()) < 80 for _, d in sections), sections  # one or two sentences
    for title, definition in sections:  # the markdown says the same, in the same order
        assert f"## {html.unescape(title)}" in md and html.unescape(definition) in md, title
    assert [ln[3:] for ln in md.splitlines() if ln.startswith("## ")] == [html.unescape(t) for t in titles]


def test_pngs_beside_the_page_are_the_embedded_figures(rendered):
    run, index = rendered
    page = index.read_text()
    for png in FIGURES:
        assert base64.b64encode((run / "report" / png).read_bytes()).decode() in page, png


def _captured_titles(monkeypatch):
    """Panel titles and texts of each figure as drawn (the PNG itself), by wrapping save_figure."""
    drawn = {}
    real = report_figures.save_figure

    def save(fig, path):
        drawn[Path(path).name] = [(ax.get_title(), " ".join(t.get_text().replace("\n", " ") for t in ax.texts))
                                  for ax in fig.axes if ax.get_title()]
        return real(fig, path)

    monkeypatch.setattr(report_figures, "save_figure", save)
    return drawn


def test_ratio_variance_heatmaps_are_split_by_advantage_sign(tmp_path, monkeypatch):
    drawn = _captured_titles(monkeypatch)
    run = make_synthetic_run(tmp_path / "r", steps=2, batch=6, response_len=4)
    render_report(run)
    titles = [t for t, _ in drawn["ratio_heatmaps.png"]]
    assert titles == ["variance of w = π_trainer/π_rollout, A > 0", "variance of w = π_trainer/π_rollout, A ≤ 0",
                      "variance of r = π_θ/π_old, A > 0", "variance of r = π_θ/π_old, A ≤ 0"]


def test_identically_zero_routing_mismatch_is_said_in_words_not_drawn_flat(fp32, tmp_path, monkeypatch):
    run, index = fp32
    page, md = index.read_text(), (run / "report" / "summary.md").read_text()
    said = "all zero: the engine and trainer route identically"
    assert "In this run: the engine and trainer route identically (routing mismatch 0 at every diagnostic step)" in page
    assert "No expert mismatched: the engine and trainer route identically" in page
    # the PNGs: the w row and the flat curves are sentences, not a flat line or a uniform heatmap with a ±0.1
    # colour bar; the routing heatmaps, every panel of which would be a sentence, are not drawn at all
    drawn = _captured_titles(monkeypatch)
    render_report(run, tmp_path / "again")
    assert "heatmaps.png" not in drawn and not (run / "report" / "heatmaps.png").exists()
    assert "](heatmaps.png)" not in md and "<h2>Routing mismatch per layer and expert</h2>" in page
    heat = {"flip rate, trainer vs engine (mean of 3 steps)": f"{said}",
            "flip rate, π_old → π_θ (mean of 3 steps)": "all zero: no token changed experts during the update",
            "routing mismatch per layer over steps": said}
    for title, text in heat.items():
        assert f"- {title}: {text}" in md and f"<li>{html.escape(f'{title}: {text}')}" in page, title
    ratio = dict(drawn["ratio_heatmaps.png"])
    # the flat w row is said under the figure, not drawn; the r row (real variance) is drawn
    assert not any(t.startswith("variance of w") for t in ratio)
    assert "- variance of w = π_trainer/π_rollout: float noise only (std of the ratio below 1e-6" in md
    assert "variance of r = π_θ/π_old, A > 0" in ratio and "variance of r = π_θ/π_old, A ≤ 0" in ratio  # r is real
    curves = dict(drawn["curves.png"])
    assert curves["routing mismatch, trainer vs engine"].startswith("all zero: the engine and trainer route")
    assert curves["KL / JS trainer vs engine"].startswith("float noise only (every value within 1e-6 of 0")
    assert curves["validation accuracy"] == ""  # a real (constant, non-zero) curve is still drawn
    # the page and the markdown say what the PNGs say
    for title, text in [*ratio.items(), *curves.items()]:
        if text:
            assert f"{title}: {text}" in md and html.escape(f"{title}: {text}") in page, title
    # tables do not list variances of 1e-17 as if they meant something
    layers = page.split("<h2>Top offending layers</h2>")[1].split("<h2>")[0]
    assert "≈0 (noise)" in layers and "e-1" not in layers


def test_samples_show_distinct_prompts(tmp_path, fp32):
    run = make_synthetic_run(tmp_path / "r", steps=2, batch=4, response_len=4, samples=REPEATED)
    page = render_report(run).read_text()
    rows = re.findall(r"<tr><td><pre>(\d+)</pre></td><td><pre>([^<]*)</pre></td>", page)
    assert rows == [("2", "7+1="), ("2", "2+5=")]  # each prompt once, from its latest step
    assert "[reward 1] 8\n[reward 0] 9\n[reward 1] 8" in page  # with its responses and their rewards
    fp32_page = fp32[1].read_text()
    prompts = re.findall(r"<tr><td><pre>\d+</pre></td><td><pre>([^<]*)</pre></td>", fp32_page)
    assert prompts == ["3+1=", "3+2=", "2+1=", "2+2=", "1+1=", "1+2="]  # two prompts a step, newest first


def test_text_from_the_run_is_escaped(rendered):
    page = rendered[1].read_text()
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in page
    assert "<script" not in page  # the report has no script of its own either
    assert "&lt;/pre&gt;&lt;b&gt;bold?&lt;/b&gt;" in page


def test_report_without_diagnostics_or_samples_says_so(tmp_path):
    run = make_synthetic_run(tmp_path / "r", steps=2, batch=4, response_len=4, with_diagnostics=False)
    (run / "samples.jsonl").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "val/a')  # a line cut by a crash
    page = render_report(run, tmp_path / "out").read_text()
    assert "No per-step diagnostics were saved" in page
    assert "No samples.jsonl" in page
    assert "1 line(s) of metrics.jsonl could not be read" in page
    assert not (tmp_path / "out" / "heatmaps.png").exists() and (tmp_path / "out" / "curves.png").exists()


def test_corrupt_diagnostics_file_is_skipped_and_named(tmp_path):
    run = make_synthetic_run(tmp_path / "r", steps=2, batch=4, response_len=4)
    (run / "diagnostics" / "step_000002.npz").write_bytes(b"not a zip")
    page = render_report(run).read_text()
    assert "step_000002.npz" in page and "<h2>Routing mismatch per layer and expert</h2>" in page


def test_missing_run_dir_or_metrics_is_one_error_line_exit_2(tmp_path, capsys):
    main = _tool("routing_report").main
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: RUN_DIR {tmp_path / 'nope'}: no such run directory"
    assert main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(ReportError):
        render_report(tmp_path)


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("relation", ["is", "lies inside", "contains"])
def test_report_refuses_an_out_that_is_holds_or_lies_in_the_run_dir(tmp_path, capsys, relation):
    run = make_synthetic_run(tmp_path / "runs" / "r", steps=2, batch=4, response_len=4)
    out = {"is": run, "lies inside": run / "diagnostics", "contains": run.parent}[relation]
    before = _snapshot(tmp_path)
    assert _tool("routing_report").main([str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {out} {relation} the input RUN_DIR {run}"), err
    assert _snapshot(tmp_path) == before  # nothing written among (or above) the run's files


def test_report_into_the_runs_own_report_folder_is_the_default_and_allowed(tmp_path):
    run = make_synthetic_run(tmp_path / "r", steps=2, batch=4, response_len=4)
    before = {k: v for k, v in _snapshot(run).items() if not k.startswith("report")}
    assert _tool("routing_report").main([str(run), "--out", str(run / "report")]) == 0
    assert _tool("routing_report").main([str(run)]) == 0
    assert (run / "report" / "index.html").exists()
    assert {k: v for k, v in _snapshot(run).items() if not k.startswith("report")} == before


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0"]


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install -y chromium)")
def test_headless_chromium_opens_the_report_without_console_errors(rendered, tmp_path):
    _, index = rendered
    shot = tmp_path / "shot.png"
    guide = "How to read this report.</b> This run post-trained a mixture-of-experts model"
    for extra in (["--dump-dom"], [f"--screenshot={shot}", "--window-size=1280,2400"]):
        p = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *extra, index.as_uri()],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        console = [ln for ln in p.stderr.splitlines() if "CONSOLE" in ln or "Failed to load resource" in ln]
        assert not console, console
        if extra == ["--dump-dom"]:
            assert "<title>Routing-mismatch report</title>" in p.stdout
            assert "&lt;script&gt;alert" in p.stdout  # still text after the browser parsed it
            assert guide in p.stdout  # the reading guide, first thing after the title line
            assert p.stdout.index(guide) < p.stdout.index("<h2>")
            # the sign-split heatmaps: their figure and definition
            assert 'alt="Ratio variance per expert, by sign of the advantage"' in p.stdout
            assert "A &gt; 0 (left;" in p.stdout and "A ≤ 0 (right;" in p.stdout
    assert shot.stat().st_size > 10_000
