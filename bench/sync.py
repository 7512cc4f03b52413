"""Weight sync at world 1, 2 and 4, and rollout tokens/s with 1 vs 2 engines: the trainer's own RolloutClient.

Each run is `torchrun --nproc_per_node=W` of this script's worker: a Megatron actor at the given layout, the
colocated engines the trainer starts (one per data-parallel rank on CPU, `rollout/placement.py`), then
- sync: `RolloutClient.sync` (shard-local gathers + streaming into each engine) `--repeats` times; per rank the
  bytes received from other ranks, sent to them, handed to its engine, and the seconds (median);
- rollout: `RolloutClient.generate` of one step (prompts x n samples, exactly max_tokens each, routing capture
  on), tokens/s over the whole batch, every engine generating its shard.

    python bench/sync.py            # medium model (hidden 256, 4 layers, 16 experts), worlds 1, 2, 4 (~10 min here)
    python bench/sync.py --tiny     # the recipe's tiny model, worlds 1 and 2 (a smoke run)

Layouts: pure data parallelism (each rank holds the whole model: nothing to gather) and expert parallelism
over the whole world (each full-copy engine needs the experts of every rank: the worst case for gathers, which
grows as (ep - 1) / ep of the expert bytes, bounded by them). Records `weight_sync_bytes_per_rank_dp` / `_ep`
and `weight_sync_seconds` (world 4 vs world 1, ratio > 1: less at world 4) and `rollout_engines_2_vs_1`
(tokens/s, 2 engines vs 1). On this 2-core machine all ranks and engines share the two cores, so seconds grow
with the world size and the rollout ratio measures overheads more than parallel speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEDIUM = dict(model=["model.vocab_size=256", "model.hidden_size=256", "model.num_layers=4", "model.num_experts=16",
                     "model.moe_ffn_hidden_size=128", "model.max_position_embeddings=128", "rollout.kv_cache_gib=0.25"],
              prompts=32, prompt_len=16, n=4, max_tokens=32, repeats=5, worlds=(1, 2, 4))
TINY = dict(model=[], prompts=8, prompt_len=8, n=2, max_tokens=8, repeats=2, worlds=(1, 2))


class _Tok:
    """The client needs only the end-of-sequence id. vLLM refuses ids outside the vocabulary, so random weights
    sometimes sample it; tokens/s counts the tokens generated, the same ones at every world size (same seeds)."""
    eos_token_id = 0


def worker(a) -> None:
    import torch

    from upgrpo_megatron.config import load_recipe, validate_layout
    from upgrpo_megatron.distributed import rank
    from upgrpo_megatron.engine_link import RolloutClient, actor_hf_weights, all_gather_objects
    from upgrpo_megatron.megatron.actor import MegatronActor
    from upgrpo_megatron.megatron.parallel import ParallelSizes, destroy, init_distributed, init_model_parallel

    c = json.loads(a.config)
    world = init_distributed()[1]
    cfg = load_recipe(ROOT / "recipes" / "qwen_moe.yaml", c["model"] + [
        f"parallel.ep={a.ep}", f"trainer.run_dir={a.out}/run", f"data.max_prompt_length={c['prompt_len']}",
        f"data.max_response_length={c['max_tokens']}"])
    lay = validate_layout(cfg, world)
    init_model_parallel(ParallelSizes(tp=lay.tp, ep=lay.ep, etp=lay.etp), seed=1)
    actor = MegatronActor(cfg.model, tp=lay.tp, ep=lay.ep, etp=lay.etp)
    weights = actor_hf_weights(cfg.model, actor.module)
    client = RolloutClient(cfg, _Tok(), Path(a.out))
    t0 = time.perf_counter()
    client.start(weights, 0)
    start_s = time.perf_counter() - t0
    try:
        syncs = []
        for _ in range(c["repeats"]):
            torch.distributed.barrier()
            client.sync(weights)
            syncs.append(client.last_sync.as_dict())
        g = torch.Generator().manual_seed(1)
        prompts = torch.randint(3, cfg.model.vocab_size, (c["prompts"], c["prompt_len"]), generator=g).tolist()
        gen = []
        for i in range(2):  # the first call warms the engines up
            torch.distributed.barrier()
            t0 = time.perf_counter()
            batch = client.generate(prompts, n=c["n"], temperature=1.0, seed=i)
            gen.append((batch.num_tokens(), time.perf_counter() - t0))
    finally:
        client.shutdown()
    mine = {"rank": rank(), "driver": client.placement.is_driver(rank()),
            "start_s": start_s, "sync": syncs, "generate": gen}
    every = all_gather_objects(mine)
    if rank() == 0:
        Path(a.out, "result.json").write_text(json.dumps({"world": world, "ep": a.ep, "ranks": every,
                                                          "engines": client.placement.num_engines}))
    destroy()


def run(world: int, ep: int, c: dict) -> dict:
    out = tempfile.mkdtemp(prefix=f"bench_sync_w{world}_ep{ep}_")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", UPGRPO_NO_PROGRESS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__,
           "--worker", "--ep", str(ep), "--out", out, "--config", json.dumps(c)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"world {world} ep {ep} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(Path(out, "result.json").read_text())


def summarise(res: dict) -> dict:
    """Per-rank medians over the sync repeats; the busiest rank's numbers; tokens/s of the second generate."""
    per_rank = []
    for r in res["ranks"]:
        med = {k: statistics.median(s[k] for s in r["sync"]) for k in ("recv_bytes", "sent_bytes", "engine_bytes",
                                                                         "seconds", "collectives")}
        per_rank.append(med)
    tokens, seconds = res["ranks"][0]["generate"][-1]
    return {"world": res["world"], "ep": res["ep"], "engines": res["engines"], "per_rank": per_rank,
            "max_moved_MB": max((r["recv_bytes"] + r["engine_bytes"]) / 1e6 for r in per_rank),
            "max_recv_MB": max(r["recv_bytes"] / 1e6 for r in per_rank),
            "engine_MB": max(r["engine_bytes"] / 1e6 for r in per_rank),
            "sync_s": max(r["seconds"] for r in per_rank), "tokens_per_s": tokens / seconds,
            "start_s": max(r["start_s"] for r in res["ranks"])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--results", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    c = TINY if a.tiny else MEDIUM
    runs = {}
    for world in c["worlds"]:
        for ep in sorted({1, world}):
            s = summarise(run(world, ep, c))
            runs[f"w{world}_ep{ep}"] = s
            print(f"world {world} ep {ep}: {s['engines']} engine(s); per rank at most {s['max_recv_MB']:.2f} MB "
                  f"received + {s['engine_MB']:.2f} MB into its engine, sync {s['sync_s']:.3f} s; rollout "
                  f"{s['tokens_per_s']:.0f} tokens/s; engines up in {s['start_s']:.0f} s", flush=True)
    record_all(runs, c, "_tiny" if a.tiny else "", a.results)


def record_all(runs: dict, c: dict, suffix: str, path) -> None:
    """Three measures from the runs: bytes per rank (data-parallel and expert-parallel layouts), seconds per
    sync, and rollout tokens/s with 2 engines vs 1. Ratios > 1: better at the larger world."""
    from bench.common import record

    top = max(c["worlds"])
    cfg = {"model": " ".join(c["model"]) or "recipes/qwen_moe.yaml", "prompts": c["prompts"], "n": c["n"],
           "max_tokens": c["max_tokens"], "layouts": sorted(runs), "threads_per_rank": 1}
    one = runs["w1_ep1"]
    brief = {k: {x: v[x] for x in ("engines", "max_recv_MB", "engine_MB", "sync_s", "tokens_per_s", "start_s")}
             for k, v in runs.items()}  # per-rank details are kept once, with weight_sync_seconds
    for family, ep in (("dp", 1), ("ep", top)):
        big = runs[f"w{top}_ep{ep}"]
        record(f"weight_sync_bytes_per_rank_{family}{suffix}", big["max_moved_MB"], one["max_moved_MB"],
               one["max_moved_MB"] / big["max_moved_MB"],
               f"MB received + into its engine, per rank per sync (world {top}, ep {ep} vs world 1)", cfg,
               extra=brief, path=path)
    worst = max((runs[f"w{top}_ep{ep}"] for ep in {1, top}), key=lambda r: r["sync_s"])
    record("weight_sync_seconds" + suffix, worst["sync_s"], one["sync_s"], one["sync_s"] / worst["sync_s"],
           f"s per sync, slowest rank (world {top} vs 1)", cfg, extra=runs, path=path)
    two = runs["w2_ep1"]["tokens_per_s"]
    record("rollout_engines_2_vs_1" + suffix, two, one["tokens_per_s"], two / one["tokens_per_s"],
           "tokens/s (2 engines vs 1)", cfg, extra=brief, path=path)

if __name__ == "__main__":
    main()
