"""The routing report renders from a run directory written with our own writer API (synthetic run)."""

import hashlib
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from upgrpo_megatron.diagnostics.report import ReportError, render_report
from upgrpo_megatron.diagnostics.synthetic import make_synthetic_run

ROOT = Path(__file__).resolve().parents[2]
EVIL = [{"prompt": "<script>alert('pwned')</script> 2+2=", "response": "4 </pre><b>bold?</b>", "reward": 1.0}]


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    run = make_synthetic_run(tmp_path_factory.mktemp("run") / "r", steps=3, batch=6, response_len=4, samples=EVIL)
    return run, render_report(run)


def test_report_writes_self_contained_html_pngs_and_markdown(rendered):
    run, index = rendered
    out = run / "report"
    assert index == out / "index.html"
    for png in ("curves.png", "heatmaps.png", "log_ratio_hist.png"):
        assert (out / png).stat().st_size > 10_000, png
    page = index.read_text()
    assert "<title>Routing-mismatch report</title>" in page
    # three figures embedded, and no resource that needs the network or another file
    assert page.count("src='data:image/png;base64,") == 3
    assert not re.search(r"(src|href)=['\"](?!data:)", page)
    for section in ("Top offending experts", "Capture validity", "Sample rollouts", "Last step (3)"):
        assert section in page
    md = (out / "summary.md").read_text()
    assert "| layer | expert | flip rate |" in md and "![heatmaps](heatmaps.png)" in md


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
    assert "step_000002.npz" in page and "Layer x expert heatmaps" in page


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
    for extra in (["--dump-dom"], [f"--screenshot={shot}", "--window-size=1280,2400"]):
        p = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *extra, index.as_uri()],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        console = [ln for ln in p.stderr.splitlines() if "CONSOLE" in ln or "Failed to load resource" in ln]
        assert not console, console
        if extra == ["--dump-dom"]:
            assert "<title>Routing-mismatch report</title>" in p.stdout
            assert "&lt;script&gt;alert" in p.stdout  # still text after the browser parsed it
    assert shot.stat().st_size > 10_000
