"""UP-GRPO policy loss, forward + backward: ours (`compute_policy_loss(loss_mode="up_grpo")`) vs the UP-GRPO
post's literal form (three products, a max, a min and two wheres, no clamp of the log-ratio:
`literal_up_grpo_loss` in tests/unit/losses/loss_equations.py).

Both get the same inputs ([batch, response_len] old/new log-probs, per-sequence advantages of both signs, a ragged
response mask in the inputs' dtype) and do the same work a trainer does per micro-batch: the loss, its backward to
log_prob, and the three verl metrics as python floats (ours also returns the two up/ metrics).

Time: one process, warm-up, then ours and theirs alternate for `--pairs` rounds (so machine load hits both
alike, `bench.common.interleave`); ratio = median of the pairwise ratios, with their min-max. Threads:
`--threads` (default 1: this machine is shared).

Peak memory: a fresh subprocess per (implementation, dtype, pair), ours and theirs alternating for `--pairs`
rounds (ratio: median of the pairs, as for time). Each runs one warm-up call, then resets the kernel's
peak-RSS counter (`echo 5 > /proc/self/clear_refs`), runs one forward + backward, and reports VmHWM - VmRSS
before the call: the high-water mark of resident memory the call added, gradient included. glibc is told to
serve every allocation >= 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_=65536), so a freed tensor leaves RSS at once
and the warm-up's freed memory cannot hide the measured call's allocations. (tracemalloc does not see torch's
allocations; torch has no CPU max_memory_allocated.)

    python bench/losses.py            # [512, 8192], fp32 and bf16
    python bench/losses.py --tiny     # [16, 256]: a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import MIN_PAIRS, Pairs, interleave, record  # noqa: E402
from tests.unit.losses.loss_equations import literal_up_grpo_loss  # noqa: E402
from upgrpo_megatron.losses import compute_policy_loss  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLIP = dict(clip_low=0.2, clip_high=0.28, clip_c=3.0)


def make_inputs(batch: int, length: int, dtype: torch.dtype, seed: int = 0):
    """Rollout-like inputs: log-probs in [-3, 0], drift ~0.3 (some ratios clipped), advantages +-1 per sequence,
    response lengths uniform in [1, length]."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=g) * 3
    lp = (old + 0.3 * torch.randn(batch, length, generator=g)).clamp(max=0)
    adv = torch.randn(batch, 1, generator=g).expand(batch, length)
    lengths = torch.randint(1, length + 1, (batch, 1), generator=g)
    mask = torch.arange(length)[None, :] < lengths
    return (old.to(dtype), lp.to(dtype).requires_grad_(), (adv * mask).to(dtype).contiguous(), mask.to(dtype))


def ours(old, lp, adv, mask):
    loss, metrics = compute_policy_loss(old, lp, adv, mask, loss_mode="up_grpo", clip_ratio_low=CLIP["clip_low"],
                                        clip_ratio_high=CLIP["clip_high"], clip_ratio_c=CLIP["clip_c"])
    loss.backward()
    return metrics


def theirs(old, lp, adv, mask):
    loss, *metrics = literal_up_grpo_loss(old, lp, adv, mask, CLIP["clip_low"], CLIP["clip_high"], CLIP["clip_c"])
    loss.backward()
    return [float(m.detach()) for m in metrics]  # the actor logs them as floats (verl: .detach().item())


IMPLS = {"ours": ours, "theirs": theirs}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_peak_mib(impl: str, dtype: str, batch: int, length: int) -> None:
    """(In a fresh subprocess) print the resident-memory high-water mark one forward + backward adds, in MiB."""
    torch.set_num_threads(1)
    old, lp, adv, mask = make_inputs(batch, length, DTYPES[dtype])
    IMPLS[impl](old, lp, adv, mask)  # warm-up: lazy init of kernels, dispatch tables
    lp.grad = None
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    IMPLS[impl](old, lp, adv, mask)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - before) / 1024}))


def peak_mib(impl: str, dtype: str, batch: int, length: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, "--child", impl, dtype, str(batch), str(length)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def time_pairs(dtype: str, batch: int, length: int, warmup: int, pairs: int) -> Pairs:
    old, lp, adv, mask = make_inputs(batch, length, DTYPES[dtype])

    def call(fn):
        def run():
            lp.grad = None
            fn(old, lp, adv, mask)
        return run

    return interleave(call(ours), call(theirs), pairs=pairs, warmup=warmup)


def memory_pairs(dtype: str, batch: int, length: int, pairs: int) -> Pairs:
    """Peak MiB of one call, ours and theirs alternating, each in a fresh process (no warm-up round: each
    process warms itself up before it measures)."""
    p = Pairs()
    for _ in range(pairs):
        a = peak_mib("ours", dtype, batch, length)
        p.add(a, peak_mib("theirs", dtype, batch, length))
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--pairs", type=int, default=None, help=f"interleaved pairs (default {MIN_PAIRS})")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--child", nargs=4, metavar=("IMPL", "DTYPE", "BATCH", "LEN"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child_peak_mib(a.child[0], a.child[1], int(a.child[2]), int(a.child[3]))
        return 0
    torch.set_num_threads(a.threads)
    batch, length = (16, 256) if a.tiny else (512, 8192)
    pairs, warmup = a.pairs or MIN_PAIRS, 5 if a.tiny else 2
    mem_pairs = a.pairs or (2 if a.tiny else MIN_PAIRS)  # a fresh process per call: the smoke run keeps it short
    suffix = "_tiny" if a.tiny else ""
    ok = True
    for dtype in a.dtypes.split(","):
        t = time_pairs(dtype, batch, length, warmup, pairs)
        # RSS moves in 4 KiB pages: a call that added less than a page counts as one page (tiny sizes add none)
        page = 4 / 1024
        m = memory_pairs(dtype, batch, length, mem_pairs)
        m = Pairs([max(x, page) for x in m.ours], [max(x, page) for x in m.theirs], load_start=m.load_start)
        ts, ms = t.summary(), m.summary()
        config = {"batch": batch, "response_len": length, "dtype": dtype, "loss_mode": "up_grpo",
                  "loss_agg_mode": "token-mean", "threads": a.threads, "device": "cpu"}
        record(f"losses_up_grpo_fwd_bwd_{dtype}{suffix}", ts["ours"]["median"], ts["theirs"]["median"], None,
               "s/call", config, {"ours": ts["ours"], "theirs": ts["theirs"],
                                  "theirs_impl": "seed appendix (transcribed)"}, pairs=t)
        record(f"losses_up_grpo_peak_mem_{dtype}{suffix}", ms["ours"]["median"], ms["theirs"]["median"], None,
               "MiB", config,
               {"method": "VmHWM - VmRSS of one fwd+bwd in a fresh process after warm-up (clear_refs reset, "
                          "glibc mmap threshold 64 KiB)", "theirs_impl": "seed appendix (transcribed)"}, pairs=m)
        print(f"[losses] {dtype} [{batch}, {length}]: time ours {ts['ours']['median'] * 1e3:.1f} ms vs theirs "
              f"{ts['theirs']['median'] * 1e3:.1f} ms (medians) -> {t.describe()};  peak mem ours "
              f"{ms['ours']['median']:.1f} MiB vs theirs {ms['theirs']['median']:.1f} MiB -> {m.describe()}",
              flush=True)
        ok &= t.ratio >= 1 and m.ratio >= 1
    if not ok:
        print("[losses] target not met: ours is slower or uses more memory than the reference", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
