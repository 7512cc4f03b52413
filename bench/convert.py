"""Conversion throughput and peak memory: our HF -> Megatron and Megatron -> HF vs plainly reading and
writing the same safetensors bytes (`safetensors.torch.load_file` + `save_file`, the floor any converter
pays), at two model sizes so that peak memory can be read against model size.

    python bench/convert.py [--layers 4 12] [--pairs 5]
    python bench/convert.py --tiny      # one 1-layer model, two rounds: a smoke run (entries named *_tiny)

Each measure runs in a fresh process (`--child`), timed after imports (a conversion in one process needs no
process group; the fallback through megatron's loader starts one itself); memory is
the process's peak RSS minus its RSS just before the conversion (what the conversion itself added). After a
warm-up round, each round runs the plain copy, HF -> Megatron and Megatron -> HF (of that round's checkpoint)
one after another, so every round gives one (ours, plain copy) pair per direction; the ratio is the median of
the pairwise ratios (`bench.common`), at the largest size. Writes `convert_hf_to_megatron` and
`convert_megatron_to_hf` into bench/results.json (MB/s; ratio > 1 means ours moves bytes faster than the plain
copy).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def model_cfg(layers: int):
    from upgrpo_megatron.config.schema import ModelConfig

    return ModelConfig(architecture="qwen3_moe", vocab_size=4096, hidden_size=256, num_layers=layers,
                       num_attention_heads=4, num_query_groups=2, head_dim=64, ffn_hidden_size=512,
                       moe_ffn_hidden_size=128, num_experts=32, moe_router_topk=4, norm_topk_prob=True,
                       first_k_dense_layers=0, shared_expert_ffn_hidden_size=0, rope_theta=1e6, norm_epsilon=1e-6,
                       max_position_embeddings=256, tie_word_embeddings=False, dtype="fp32")


def make_hf(cfg, out: Path) -> int:
    """A random HF directory written directly from the mapping's shapes (no transformers model in memory)."""
    import torch
    from safetensors.torch import save_file

    from upgrpo_megatron.convert import hf_shapes, model_cfg_to_hf_config

    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors = {k: 0.02 * torch.randn(s, generator=g) for k, s in hf_shapes(cfg).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model_cfg_to_hf_config(cfg)))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _rss_bytes(field: str = "VmRSS") -> int:
    """VmRSS (all resident pages) or RssAnon (anonymous memory only: what the process holds, as opposed to
    file pages it has mapped, e.g. safetensors/DCP reads through mmap, which the kernel can drop)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class _AnonPeak:
    """Samples RssAnon every 5 ms in a thread (the kernel keeps a peak only for the total RSS)."""

    def __init__(self):
        import threading

        self.peak = _rss_bytes("RssAnon")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return max(self.peak, _rss_bytes("RssAnon"))


def child(mode: str, src: str, dst: str) -> dict:
    """One measure in this (fresh) process."""
    os.environ["UPGRPO_NO_PROGRESS"] = "1"
    import torch  # noqa: F401
    from safetensors.torch import load_file, save_file

    from upgrpo_megatron.convert.megatron_io import convert_hf_to_megatron, convert_megatron_to_hf
    from upgrpo_megatron.megatron import checkpoint, model, parallel  # noqa: F401  (imports are not timed)

    base, base_anon = _rss_bytes(), _rss_bytes("RssAnon")
    sampler = _AnonPeak()
    t0 = time.perf_counter()
    if mode == "plain_copy":
        Path(dst).mkdir()
        save_file(load_file(str(Path(src) / "model.safetensors")), str(Path(dst) / "model.safetensors"))
    elif mode == "hf_to_megatron":
        convert_hf_to_megatron(src, dst, show_progress=False)
    elif mode == "megatron_to_hf":
        convert_megatron_to_hf(src, dst, show_progress=False, batch_bytes=8 * 1024**2)
    else:
        raise ValueError(mode)
    seconds = time.perf_counter() - t0
    peak_anon = sampler.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_added_bytes": max(0, peak - base),
            "peak_anon_added_bytes": max(0, peak_anon - base_anon)}


def run_child(mode: str, src: Path, dst: Path) -> dict:
    if dst.exists():
        shutil.rmtree(dst)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(src), str(dst)], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


MODES = (("plain_copy", "hf", "copy"), ("hf_to_megatron", "hf", "ckpt"), ("megatron_to_hf", "ckpt", "export"))


def run_rounds(hf: Path, tmp: Path, pairs: int) -> dict:
    """A warm-up round, then `pairs` rounds of the three modes; per mode the list of child results."""
    dirs = {"hf": hf, "copy": tmp / "copy", "ckpt": tmp / "ckpt", "export": tmp / "export"}
    runs = {mode: [] for mode, *_ in MODES}
    for i in range(pairs + 1):
        for mode, src, dst in MODES:
            r = run_child(mode, dirs[src], dirs[dst])
            if i:
                runs[mode].append(r)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    ap.add_argument("--pairs", type=int, default=None, help="measured rounds after the warm-up (default 5)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--results", default=None, help="results.json to merge into (default bench/results.json)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "DST"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(*a.child)))
        return
    from bench.common import MIN_PAIRS, Pairs, record, stats

    if a.tiny:
        a.layers = [1]
    pairs = a.pairs or (2 if a.tiny else MIN_PAIRS)

    rows, big_pairs = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        tmp = Path(tmp)
        for layers in a.layers:
            hf = tmp / f"hf_{layers}"
            nbytes = make_hf(model_cfg(layers), hf)
            load = Pairs().load_start
            runs = run_rounds(hf, tmp, pairs)
            row = {"layers": layers, "model_mb": nbytes / 1e6}
            for mode, rs in runs.items():
                secs = [r["seconds"] for r in rs]
                row[f"{mode}_s"] = stats(secs)
                row[f"{mode}_mb_s"] = nbytes / 1e6 / statistics.median(secs)
                row[f"{mode}_peak_added_mb"] = statistics.median(r["peak_added_bytes"] for r in rs) / 1e6
                row[f"{mode}_peak_anon_added_mb"] = statistics.median(r["peak_anon_added_bytes"] for r in rs) / 1e6
            for mode in ("hf_to_megatron", "megatron_to_hf"):
                big_pairs[mode] = Pairs([r["seconds"] for r in runs[mode]],
                                        [r["seconds"] for r in runs["plain_copy"]], load_start=load)
                print(f"[convert] {layers} layers {mode}: {big_pairs[mode].describe()}", flush=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
    big = rows[-1]
    config = {"arch": "qwen3_moe", "hidden": 256, "experts": 32, "moe_ffn": 128, "vocab": 4096, "dtype": "fp32",
              "layers": [r["layers"] for r in rows], "processes": 1, "export_batch_mb": 8}
    extra = {"rows": rows, "note": "peak_added = process peak RSS minus RSS before converting (includes mmap'd "
                                   "file pages); peak_anon_added = the same for anonymous memory (sampled every 5 ms)."
                                   " HF->Megatron streams one tensor group at a time; Megatron->HF holds one read "
                                   "batch (8 MB here); medians over the rounds"}
    for mode, name in (("hf_to_megatron", "convert_hf_to_megatron"), ("megatron_to_hf", "convert_megatron_to_hf")):
        ours, theirs = big[f"{mode}_mb_s"], big["plain_copy_mb_s"]
        record(name + ("_tiny" if a.tiny else ""), ours, theirs, None, "MB/s", config,
               dict(extra, peak_added_mb={r["layers"]: r[f"{mode}_peak_added_mb"] for r in rows},
                    peak_anon_added_mb={r["layers"]: r[f"{mode}_peak_anon_added_mb"] for r in rows},
                    plain_copy_peak_added_mb={r["layers"]: r["plain_copy_peak_added_mb"] for r in rows}),
               path=a.results, pairs=big_pairs[mode])


if __name__ == "__main__":
    main()
