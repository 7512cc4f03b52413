"""How the actor train step (forward + backward + optimizer, our Megatron actor) grows with the model and the
ranks, with a fitted growth law.

1. Sweeps from one base config, one dimension at a time: hidden size, experts, layers, tokens per step.
   Each point: median of `repeats` steps after a warm-up step. Entry `scaling_<dim>`: ours = step-time growth
   from the smallest to the largest point, theirs = the growth of the step's matmul FLOPs (time proportional
   to FLOPs is the ideal), ratio = FLOP growth / time growth (> 1: time grows slower than the work).
   The sweeps run on one thread with their steps interleaved round-robin (robust to other jobs' load).
2. A least-squares fit over all points of log t = log c + alpha * log(tokens x active params): entry
   `scaling_fit` (ours = alpha, theirs = 1, the linear law; ratio = 1 / alpha; R^2 in the config). The
   experts sweep holds active params fixed, so it tests the MoE promise that total experts cost ~nothing;
   a second fit `t = a * tokens * active + b * total_params + c` (the optimizer and the expert loop scale with
   total params) is kept in `extra`.
3. Ranks 1 -> 2 (`torchrun --nproc_per_node=2`, gloo) at the same global batch, as data parallel (dp=2) and
   as expert parallel (ep=2, which on two ranks is also dp=2 for the dense part): entries `scaling_ranks_dp2`
   and `scaling_ranks_ep2`, ours = 2-rank step time, theirs = 1-rank step time, one thread per rank (strong
   scaling: each rank brings one core), ratio = speedup. One rank on both cores (2 threads) is in `extra`.

Step times are the minimum of the interleaved repeats (the cost of the step itself on a machine shared with
other jobs; medians and maxima are kept in `extra`, and the fit on medians too).

    python bench/scaling.py            # base: hidden 256, 2 layers, 8 experts top-2, 4 x 128 tokens
    python bench/scaling.py --tiny     # seconds-long smoke sizes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.actor_step import step_flops  # noqa: E402
from bench.common import record, timeit  # noqa: E402

BASE = dict(hidden_size=256, num_layers=2, num_experts=8, moe_router_topk=2, vocab_size=1024,
            num_attention_heads=4, num_query_groups=2, head_dim=64, moe_ffn_hidden_size=128,
            ffn_hidden_size=512, batch=4, seq=128)
SWEEPS = {
    "hidden": ("hidden_size", [128, 256, 512]),
    "experts": ("num_experts", [4, 8, 16, 32]),
    "layers": ("num_layers", [1, 2, 4]),
    "tokens": ("seq", [64, 128, 256]),
}
RANKS_BATCH = 8  # global batch (rows of `seq` tokens) for the 1 -> 2 rank comparison
TINY_BASE = dict(hidden_size=64, num_layers=1, num_experts=4, moe_router_topk=2, vocab_size=128,
                 num_attention_heads=4, num_query_groups=2, head_dim=16, moe_ffn_hidden_size=32,
                 ffn_hidden_size=128, batch=2, seq=16)
TINY_SWEEPS = {"hidden": ("hidden_size", [32, 64]), "experts": ("num_experts", [2, 4]),
               "layers": ("num_layers", [1, 2]), "tokens": ("seq", [16, 32])}


def point(base, key, value):
    c = dict(base, **{key: value})
    if key == "hidden_size":  # keep the FFN widths proportional to the hidden size
        c["moe_ffn_hidden_size"] = value // 2
        c["ffn_hidden_size"] = 2 * value
    return c


def model_cfg(c):
    return dict(architecture="qwen3_moe", rope_theta=1e6, max_position_embeddings=max(512, c["seq"]),
                first_k_dense_layers=0, **{k: v for k, v in c.items() if k not in ("batch", "seq")})


def params(c):
    """(active, total) matmul parameters: what one token touches vs what the model (and optimizer) holds."""
    h, hd, nh, ng = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_query_groups"]
    attn = h * hd * (nh + 2 * ng) + nh * hd * h
    expert = 3 * h * c["moe_ffn_hidden_size"]
    router = h * c["num_experts"]
    head = h * c["vocab_size"]
    active = c["num_layers"] * (attn + router + c["moe_router_topk"] * expert) + head
    total = c["num_layers"] * (attn + router + c["num_experts"] * expert) + head + h * c["vocab_size"]
    return active, total


def actor_step_fn(c, ep=1):
    """A closure running one train step of our actor on c's batch (this rank's rows when data parallel)."""
    import torch
    from megatron.core import parallel_state as ps

    from upgrpo_megatron.megatron.actor import MegatronActor, OptimSettings

    actor = MegatronActor(model_cfg(c), ep=ep, optim=OptimSettings(lr=1e-4))
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, c["vocab_size"], (c["batch"], c["seq"]), generator=g)[rank::dp]
    B, S = ids.shape
    batch = dict(input_ids=ids, prompt_lens=torch.ones(B, dtype=torch.long), response_mask=torch.ones(B, S - 1))

    def loss_fn(mb, lp, ent):
        return -(lp * mb["response_mask"]).sum() / (mb["response_mask"].sum() * dp), {}

    return lambda: actor.train_step(iter([batch]), loss_fn)


def time_round_robin(fns, repeats):
    """Per closure: median/min/max seconds of `repeats` calls after one warm-up call, the calls interleaved
    round-robin so that a burst of load from other processes spreads over all points instead of one."""
    import statistics
    import time

    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
    return [{"median": statistics.median(t), "min": min(t), "max": max(t), "repeats": repeats} for t in times]


def fit_power(xs, ts):
    """log t = log c + alpha log x by least squares: (alpha, c, R^2)."""
    import numpy as np

    lx, lt = np.log(xs), np.log(ts)
    A = np.stack([lx, np.ones_like(lx)], 1)
    (alpha, logc), *_ = np.linalg.lstsq(A, lt, rcond=None)
    pred = A @ np.array([alpha, logc])
    r2 = 1 - ((lt - pred) ** 2).sum() / ((lt - lt.mean()) ** 2).sum()
    return float(alpha), float(math.exp(logc)), float(r2)


def fit_two_term(work, total, ts):
    """t = a * tokens * active + b * total_params + c by least squares: (a, b, c, R^2)."""
    import numpy as np

    A = np.stack([np.asarray(work, float), np.asarray(total, float), np.ones(len(ts))], 1)
    t = np.asarray(ts, float)
    coef, *_ = np.linalg.lstsq(A, t, rcond=None)
    pred = A @ coef
    r2 = 1 - ((t - pred) ** 2).sum() / ((t - t.mean()) ** 2).sum()
    return [float(x) for x in coef] + [float(r2)]


# ----------------------------------------------------------------------------------------------- ranks
def worker(a) -> int:
    """Under torchrun (or alone): time the base config at the given EP, rank 0 writes the result."""
    import torch

    from upgrpo_megatron.megatron.parallel import ParallelSizes, init_distributed, init_model_parallel

    rank, world = init_distributed("gloo")
    init_model_parallel(ParallelSizes(ep=a.ep), backend="gloo")
    c = json.loads(a.config)
    step = actor_step_fn(c, ep=a.ep)
    t = timeit(step, warmup=1, repeats=a.repeats)
    if a.profile:  # one more step under torch.profiler: the top ops of each rank, by self CPU time
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        Path(f"{a.profile}.rank{rank}.txt").write_text(table)
    if rank == 0:
        Path(a.out).write_text(json.dumps({"s": t, "world": world, "ep": a.ep, "threads": torch.get_num_threads()}))
    return 0


def run_ranks(c, nproc, ep, repeats, tmp: Path, threads: int) -> dict:
    out = tmp / f"ranks_{nproc}_{ep}_{threads}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           "--worker", "--ep", str(ep), "--repeats", str(repeats), "--config", json.dumps(c), "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--results", default=None, help="results.json to merge into (default bench/results.json)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--profile", default=None, help="with --worker: write a torch.profiler table per rank to PATH.rankN.txt")
    a = ap.parse_args(argv)
    repeats = a.repeats or (2 if a.tiny else 7)
    if a.worker:
        a.repeats = repeats
        return worker(a)
    import torch

    from upgrpo_megatron.megatron.parallel import ParallelSizes, init_distributed, init_model_parallel

    base, sweeps = (TINY_BASE, TINY_SWEEPS) if a.tiny else (BASE, SWEEPS)
    sfx = "_tiny" if a.tiny else ""
    tmp = Path(tempfile.mkdtemp(prefix="bench_scaling_"))

    # 3 first, in fresh processes (this one then initialises its own world of one for the sweeps)
    ranks_cfg = dict(base, batch=RANKS_BATCH if not a.tiny else 4)
    cores = os.cpu_count() or 2
    one_1t = run_ranks(ranks_cfg, 1, 1, repeats, tmp, threads=1)       # one core: what each rank of two gets
    one = one_1t if a.tiny else run_ranks(ranks_cfg, 1, 1, repeats, tmp, threads=cores)  # whole machine, one process
    two = {ep: run_ranks(ranks_cfg, 2, ep, repeats, tmp, threads=max(1, cores // 2)) for ep in (1, 2)}

    # the sweeps on one thread: on a 2-core machine shared with other jobs, a 2-thread step stalls whenever
    # one of its threads is descheduled (each op waits at the OpenMP barrier), which buries the growth law
    torch.set_num_threads(1)
    init_distributed("gloo")
    init_model_parallel(ParallelSizes())
    cfgs = [(dim, key, v, point(base, key, v)) for dim, (key, values) in sweeps.items() for v in values]
    timings = time_round_robin([actor_step_fn(c) for *_, c in cfgs], repeats)
    points = []
    for (dim, key, v, c), t in zip(cfgs, timings):
        active, total = params(c)
        tokens = c["batch"] * c["seq"]
        points.append({"dim": dim, key: v, "s": t, "tokens": tokens, "active_params": active,
                       "total_params": total, "flops": step_flops(c)})
        print(f"[scaling] {dim} {key}={v}: {t['median']:.3f}s (min {t['min']:.3f}, max {t['max']:.3f}) "
              f"tokens={tokens} active={active / 1e6:.2f}M total={total / 1e6:.2f}M", flush=True)

    threads = torch.get_num_threads()
    for dim, (key, values) in sweeps.items():
        ps_ = [p for p in points if p["dim"] == dim]
        lo, hi = ps_[0], ps_[-1]
        tg, fg = hi["s"]["min"] / lo["s"]["min"], hi["flops"] / lo["flops"]
        record(f"scaling_{dim}{sfx}", tg, fg, fg / tg, f"x growth {key} {values[0]}->{values[-1]}",
               {key: values, **{k: v for k, v in base.items() if k != key}, "threads": threads},
               {"points": ps_}, path=a.results)

    xs = [p["tokens"] * p["active_params"] for p in points]
    ts = [p["s"]["min"] for p in points]
    alpha, c0, r2 = fit_power(xs, ts)
    alpha_med, _, r2_med = fit_power(xs, [p["s"]["median"] for p in points])
    two_term = fit_two_term(xs, [p["total_params"] for p in points], ts)
    record("scaling_fit" + sfx, alpha, 1.0, 1.0 / alpha, "exponent: t ~ (tokens x active params)^alpha",
           {"r2": round(r2, 3), "c": c0, "points": len(points), "base": "hidden 256, L2, E8 k2, 4x128 tok" if not a.tiny else "tiny"},
           {"fit_on_medians": {"alpha": alpha_med, "r2": r2_med}, "two_term_fit": dict(zip(["s_per_token_active_param", "s_per_total_param", "s_const", "r2"], two_term)),
            "points": points}, path=a.results)
    print(f"[scaling] fit: t = {c0:.3g} * (tokens x active params)^{alpha:.3f}, R^2 = {r2:.3f}; two-term "
          f"t = {two_term[0]:.3g}*tok*active + {two_term[1]:.3g}*total + {two_term[2]:.3g} (R^2 {two_term[3]:.3f})")

    t1 = one_1t["s"]["min"]
    for ep, name in ((1, "dp2"), (2, "ep2")):
        t2 = two[ep]["s"]["min"]
        record(f"scaling_ranks_{name}{sfx}", t2, t1, t1 / t2, "s/step (2 ranks vs 1)",
               {"world": 2, "ep": ep, "dp": 2, "global_batch": ranks_cfg["batch"], "seq": ranks_cfg["seq"],
                "threads_per_rank": two[ep]["threads"], "one_rank_threads": one_1t["threads"]},
               {"one_rank_s": one_1t["s"], "two_rank_s": two[ep]["s"], "one_rank_all_cores_s": one["s"],
                "speedup_vs_one_rank_all_cores": one["s"]["min"] / t2}, path=a.results)
        print(f"[scaling] ranks 1 -> 2 ({name}): {t1:.3f}s -> {t2:.3f}s, speedup {t1 / t2:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
