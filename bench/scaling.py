"""How the actor train step (forward + backward + optimizer, our Megatron actor) grows with the model and the
ranks, with a fitted growth law.

1. Sweeps from one base config, one dimension at a time: hidden size, experts, layers, tokens per step, on one
   thread, every point's step run once per round, round-robin (`rounds` rounds after a warm-up round), so a
   burst of load from other jobs falls on all points of a round alike. Entry `scaling_<dim>`: per round the
   step-time growth from the smallest to the largest point (one pair); ours = median growth, theirs = the
   growth of the step's matmul FLOPs (time proportional to FLOPs is the ideal), ratio = FLOP growth / time
   growth, the median of the rounds with its min-max (> 1: time grows slower than the work).
2. A least-squares fit of log t = log c + alpha * log(tokens x active params) on the points' median times:
   entry `scaling_fit` (ours = alpha, theirs = 1, the linear law; ratio = 1 / alpha; R^2 in the config; a
   summary of the sweeps, with the per-round fits' spread in `extra`). The experts sweep holds active params
   fixed, so it tests the MoE promise that total experts cost ~nothing; a second fit
   `t = a * tokens * active + b * total_params + c` (the optimizer scales with total params) is in `extra`.
3. Ranks 1 -> 2 (`torchrun`, gloo) at the same global batch, as data parallel (dp=2) and as expert parallel
   (ep=2, which on two ranks is also dp=2 for the dense part): entries `scaling_ranks_dp2` and
   `scaling_ranks_ep2`, ours = 2-rank step time, theirs = 1-rank step time, one thread per rank (strong
   scaling: each rank brings one core), ratio = speedup. The three jobs (one rank, dp=2, ep=2) start once and
   stay up; this process then steps them in turn through a TCP store (one, dp2, ep2, one, ...), so they are
   interleaved like every other comparison and never run at the same time. One rank on both cores (2
   threads) is a fourth job, kept in `extra`.

    python bench/scaling.py            # base: hidden 256, 2 layers, 8 experts top-2, 4 x 128 tokens
    python bench/scaling.py --tiny     # seconds-long smoke sizes
    python bench/scaling.py --only ranks --profile /tmp/prof   # the ranks comparison, then one profiled step
                                                               # per job and rank (PATH.<job>.rankN.txt)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.actor_step import step_flops  # noqa: E402
from bench.common import MIN_PAIRS, Pairs, init_world_of_one, load_avg, record, stats  # noqa: E402

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
    from upgrpo_megatron.config.schema import ModelConfig

    return ModelConfig(architecture="qwen3_moe", rope_theta=1e6, max_position_embeddings=max(512, c["seq"]),
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


def time_round_robin(fns, rounds):
    """Per closure: the wall seconds of each of `rounds` calls after one warm-up call, the calls interleaved
    round-robin (round r holds every closure's r-th call)."""
    import time

    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
    return times


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
def _control_store(addr: str):
    import datetime

    import torch.distributed as dist

    host, port = addr.rsplit(":", 1)
    return dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(minutes=30))


def worker(a) -> int:
    """Under torchrun: build the actor at the given EP, take one warm-up step, then one step per round each
    time the parent says go (through the TCP store at `--control`); rank 0 reports each step's seconds."""
    import time

    import torch
    import torch.distributed as dist

    from upgrpo_megatron.megatron.parallel import ParallelSizes, init_distributed, init_model_parallel

    rank, world = init_distributed("gloo")
    init_model_parallel(ParallelSizes(ep=a.ep), backend="gloo")
    ctl = _control_store(a.control)
    step = actor_step_fn(json.loads(a.config), ep=a.ep)
    step()
    dist.barrier()
    if rank == 0:
        ctl.set(f"{a.job}/ready", json.dumps({"world": world, "threads": torch.get_num_threads()}))
    for i in range(a.rounds):
        ctl.wait([f"{a.job}/go/{i}"])
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        cpu = torch.tensor([time.process_time() - c0])  # CPU seconds this rank used (waits excluded)
        dist.all_reduce(cpu, op=dist.ReduceOp.MAX)  # also the barrier: the step is done when the slowest rank is
        if rank == 0:
            ctl.set(f"{a.job}/done/{i}", json.dumps([time.perf_counter() - t0, cpu.item()]))
    if a.profile:  # one more step under torch.profiler: the top ops of each rank, by self CPU time
        from torch.profiler import ProfilerActivity, profile

        ctl.wait([f"{a.job}/go/profile"])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        dist.barrier()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        Path(f"{a.profile}.{a.job}.rank{rank}.txt").write_text(table)
        if rank == 0:
            ctl.set(f"{a.job}/done/profile", "[0, 0]")
    return 0


class RankJobs:
    """Several torchrun jobs of `worker`, started together, then stepped one at a time through a TCP store."""

    def __init__(self, cfg: dict, jobs: dict, rounds: int, profile=None):
        import datetime

        import torch.distributed as dist

        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(minutes=30))
        self.jobs, self.procs = jobs, {}
        for name, (nproc, ep, threads) in jobs.items():
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(k, None)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   __file__, "--worker", "--job", name, "--ep", str(ep), "--rounds", str(rounds),
                   "--config", json.dumps(cfg), "--control", f"127.0.0.1:{self.store.port}",
                   *(["--profile", str(profile)] if profile else [])]
            self.procs[name] = subprocess.Popen(cmd, env=env, cwd=ROOT)
        self.info = {name: json.loads(self._wait(f"{name}/ready", name)) for name in jobs}

    def _wait(self, key: str, job: str) -> str:
        import datetime

        while True:  # poll, so that a job that died is reported instead of waited for
            try:
                self.store.wait([key], datetime.timedelta(seconds=2))
                return self.store.get(key).decode()
            except RuntimeError:
                if self.procs[job].poll() is not None:
                    raise RuntimeError(f"scaling job {job} exited with {self.procs[job].returncode}") from None

    def step(self, job: str, i):
        """Run one step of `job`: (wall seconds, CPU seconds of its busiest rank)."""
        self.store.set(f"{job}/go/{i}", "1")
        return json.loads(self._wait(f"{job}/done/{i}", job))

    def close(self, ok: bool = True) -> None:
        """Wait for the jobs to finish (after an error: stop them, they would wait for a go that never comes)."""
        for p in self.procs.values():
            if not ok and p.poll() is None:
                p.terminate()
        for name, p in self.procs.items():
            if p.wait(timeout=600) and ok:
                raise RuntimeError(f"scaling job {name} exited with {p.returncode}")


def run_ranks(cfg: dict, rounds: int, with_all_cores: bool, profile=None) -> dict:
    """Seconds per step of each job, interleaved round by round (one, dp2, ep2[, one on all cores])."""
    cores = os.cpu_count() or 2
    jobs = {"one": (1, 1, 1), "dp2": (2, 1, max(1, cores // 2)), "ep2": (2, 2, max(1, cores // 2))}
    if with_all_cores:
        jobs["one_all_cores"] = (1, 1, cores)
    load = load_avg()
    rj = RankJobs(cfg, jobs, rounds, profile)
    times = {name: [] for name in jobs}
    cpu = {name: [] for name in jobs}
    ok = False
    try:
        for i in range(rounds):
            for name in jobs:
                wall, busy = rj.step(name, i)
                times[name].append(wall)
                cpu[name].append(busy)
        if profile:
            for name in jobs:
                rj.step(name, "profile")
        ok = True
    finally:
        rj.close(ok)
    return {"times": times, "cpu": cpu, "info": rj.info, "load_start": load}


# ----------------------------------------------------------------------------------------------- main
def sweep_entries(points, sweeps, base, rounds, sfx, threads, results):
    """One entry per sweep: the pairs (smallest, largest point) of each round."""
    for dim, (key, values) in sweeps.items():
        ps_ = [p for p in points if p["dim"] == dim]
        lo, hi = ps_[0], ps_[-1]
        fg = hi["flops"] / lo["flops"]
        pairs = Pairs(list(hi["times"]), [t * fg for t in lo["times"]], load_start=points[0]["load_start"])
        growth = [h / lo_t for h, lo_t in zip(hi["times"], lo["times"])]
        tg = statistics.median(growth)
        record(f"scaling_{dim}{sfx}", tg, fg, None, f"x growth {key} {values[0]}->{values[-1]}",
               {key: values, **{k: v for k, v in base.items() if k != key}, "threads": threads},
               {"points": ps_, "time_growth": stats(growth)}, path=results, pairs=pairs)
        print(f"[scaling] {dim} {key} {values[0]}->{values[-1]}: time x{tg:.2f} [{min(growth):.2f}-"
              f"{max(growth):.2f}] for FLOPs x{fg:.2f}: ratio {pairs.describe()}", flush=True)


def fit_entry(points, rounds, sfx, results, tiny):
    """The growth law fitted on the points' median times: a summary of the sweeps, not a comparison of its
    own (the per-round fits are kept in `extra` for their spread)."""
    xs = [p["tokens"] * p["active_params"] for p in points]
    alphas = [fit_power(xs, [p["times"][r] for p in points])[0] for r in range(rounds)]
    medians = [p["s"]["median"] for p in points]
    alpha, c0, r2 = fit_power(xs, medians)
    two_term = fit_two_term(xs, [p["total_params"] for p in points], medians)
    # ratio = 1 / alpha (> 1: time grows slower than the work); 0 when noise leaves no growth to fit (alpha <= 0)
    record("scaling_fit" + sfx, alpha, 1.0, 1.0 / alpha if alpha > 0 else 0.0,
           "exponent: t ~ (tokens x active params)^alpha",
           {"r2": round(r2, 3), "c": c0, "points": len(points),
            "base": "tiny" if tiny else "hidden 256, L2, E8 k2, 4x128 tok"},
           {"derived": "fit on the sweep points' median times", "alpha_per_round": stats(alphas),
            "two_term_fit_on_medians": dict(zip(["s_per_token_active_param", "s_per_total_param", "s_const", "r2"],
                                                two_term)), "points": points}, path=results)
    print(f"[scaling] fit: t = {c0:.3g} * (tokens x active params)^{alpha:.3f}, R^2 = {r2:.3f} (medians); alpha per "
          f"round {min(alphas):.3f}-{max(alphas):.3f}; two-term t = {two_term[0]:.3g}*tok*active + "
          f"{two_term[1]:.3g}*total + {two_term[2]:.3g} (R^2 {two_term[3]:.3f})")


def ranks_entries(ranks_cfg, ranks, sfx, results):
    t = ranks["times"]
    one = t["one"]
    for name, ep in (("dp2", 1), ("ep2", 2)):
        pairs = Pairs(t[name], one, load_start=ranks["load_start"])
        extra = {"one_rank_s": stats(one), "two_rank_s": stats(t[name]),
                 # CPU seconds of the busiest rank: the work per rank, without waits for the other rank or for
                 # a core (on a loaded machine the wall-time speedup is capped by the latter)
                 "one_rank_cpu_s": stats(ranks["cpu"]["one"]), "two_rank_busiest_cpu_s": stats(ranks["cpu"][name]),
                 "cpu_speedup": Pairs(ranks["cpu"][name], ranks["cpu"]["one"]).summary()}
        if "one_all_cores" in t:
            extra["one_rank_all_cores_s"] = stats(t["one_all_cores"])
            extra["speedup_vs_one_rank_all_cores"] = Pairs(t[name], t["one_all_cores"]).summary()
        record(f"scaling_ranks_{name}{sfx}", statistics.median(t[name]), statistics.median(one), None,
               "s/step (2 ranks vs 1)",
               {"world": 2, "ep": ep, "dp": 2, "global_batch": ranks_cfg["batch"], "seq": ranks_cfg["seq"],
                "threads_per_rank": ranks["info"][name]["threads"],
                "one_rank_threads": ranks["info"]["one"]["threads"]},
               extra, path=results, pairs=pairs)
        print(f"[scaling] ranks 1 -> 2 ({name}): {statistics.median(one):.3f}s -> {statistics.median(t[name]):.3f}s "
              f"(medians), speedup {pairs.describe()}; CPU of the busiest rank "
              f"{statistics.median(ranks['cpu']['one']):.3f}s -> {statistics.median(ranks['cpu'][name]):.3f}s "
              f"({Pairs(ranks['cpu'][name], ranks['cpu']['one']).describe()})", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--rounds", type=int, default=None, help=f"measured rounds (pairs) after a warm-up (default "
                                                             f"{MIN_PAIRS + 2}, tiny 2)")
    ap.add_argument("--only", choices=["sweeps", "ranks"], default=None, help="run one part")
    ap.add_argument("--results", default=None, help="results.json to merge into (default bench/results.json)")
    ap.add_argument("--profile", default=None, help="after the ranks rounds, write a torch.profiler table of one "
                                                    "step per job and rank to PATH.<job>.rankN.txt")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--control", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    rounds = a.rounds or (2 if a.tiny else MIN_PAIRS + 2)
    a.rounds = rounds
    if a.worker:
        return worker(a)
    import torch

    from upgrpo_megatron.megatron.parallel import ParallelSizes, init_model_parallel

    base, sweeps = (TINY_BASE, TINY_SWEEPS) if a.tiny else (BASE, SWEEPS)
    sfx = "_tiny" if a.tiny else ""

    # 3 first, in fresh processes (this one then initialises its own world of one for the sweeps)
    if a.only in (None, "ranks"):
        ranks_cfg = dict(base, batch=RANKS_BATCH if not a.tiny else 4)
        ranks = run_ranks(ranks_cfg, rounds, with_all_cores=not a.tiny, profile=a.profile)
        ranks_entries(ranks_cfg, ranks, sfx, a.results)
    if a.only == "ranks":
        return 0

    # the sweeps on one thread: on a 2-core machine shared with other jobs, a 2-thread step stalls whenever
    # one of its threads is descheduled (each op waits at the OpenMP barrier), which buries the growth law
    torch.set_num_threads(1)
    init_world_of_one()
    init_model_parallel(ParallelSizes())
    cfgs = [(dim, key, v, point(base, key, v)) for dim, (key, values) in sweeps.items() for v in values]
    load = load_avg()
    timings = time_round_robin([actor_step_fn(c) for *_, c in cfgs], rounds)
    points = []
    for (dim, key, v, c), t in zip(cfgs, timings):
        active, total = params(c)
        tokens = c["batch"] * c["seq"]
        points.append({"dim": dim, key: v, "s": stats(t), "times": t, "tokens": tokens, "active_params": active,
                       "total_params": total, "flops": step_flops(c), "load_start": load})
        print(f"[scaling] {dim} {key}={v}: {statistics.median(t):.3f}s (min {min(t):.3f}, max {max(t):.3f}) "
              f"tokens={tokens} active={active / 1e6:.2f}M total={total / 1e6:.2f}M", flush=True)
    sweep_entries(points, sweeps, base, rounds, sfx, torch.get_num_threads(), a.results)
    fit_entry(points, rounds, sfx, a.results, a.tiny)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
