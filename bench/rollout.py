"""Rollout tokens/s: our vLLM engine (samples + log-probs + rollout routing) vs transformers' `generate`.

Same random Qwen3-MoE weights, same prompts, n samples per prompt, exactly `max_tokens` new tokens each (no
stop token), sampling at temperature 1, log-probs of the sampled tokens returned by both. Ours also returns
rollout routing (captured during generation). What capture costs is measured in `extra` by interleaving the
engine with capture on and off (decode capture, and the replay prefill it replaced). Our engine's core runs in
this process, as the trainer builds it at world size 1 (`rollout.engine_core=auto`); `extra` also has it against
an engine in a process of its own (`subprocess`, what every rank of a multi-rank run gets), interleaved. Also
reported: engine start time and in-memory weight sync time. One run, same machine, same threads; the engine is
started first and the two generators then alternate (`bench.common.interleave`: ratio = median of the pairwise ratios).

    python bench/rollout.py            # medium model (hidden 512, 4 layers, 16 experts),
                                       # 8 prompts x 4 samples x 32 tokens
    python bench/rollout.py --heavy    # the same model, generation-heavy: 16 prompts x 4 samples x 128 tokens
                                       # (entry rollout_heavy; decode capture on/off only)
    python bench/rollout.py --tiny     # the tests' tiny model, seconds of generation (used as a smoke run)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import MIN_PAIRS, interleave, record, timeit  # noqa: E402

MEDIUM = dict(model=dict(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=64, intermediate_size=1024, moe_intermediate_size=256,
                         num_experts=16, num_experts_per_tok=2),
              prompts=8, prompt_len=32, n=4, max_tokens=32)
HEAVY = dict(MEDIUM, prompts=16, max_tokens=128)  # 64 sequences x 128 tokens: where batching and the KV cache count
TINY = dict(model=dict(vocab_size=32, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, intermediate_size=256, moe_intermediate_size=64,
                       num_experts=8, num_experts_per_tok=2),
            prompts=4, prompt_len=8, n=2, max_tokens=8)


def build_model(c):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(**c["model"], norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                         tie_word_embeddings=False, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    return Qwen3MoeForCausalLM(cfg).eval()


def transformers_generate(model, prompts, c):
    """A closure sampling with transformers' `generate` (returns the sampled tokens' log-probs)."""
    ids = torch.tensor(prompts).repeat_interleave(c["n"], dim=0)  # [prompts * n, prompt_len], equal lengths

    def run():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=c["max_tokens"], min_new_tokens=c["max_tokens"],
                                 eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, ids.shape[1]:]
        logits = torch.stack(out.logits, 1).float()  # raw logits, like the engine's raw log-probs
        return torch.log_softmax(logits, -1).gather(-1, new[..., None]).squeeze(-1)

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true")
    size.add_argument("--heavy", action="store_true", help="64 sequences x 128 tokens (entry rollout_heavy)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats of the engine-only timings")
    ap.add_argument("--pairs", type=int, default=MIN_PAIRS)
    ap.add_argument("--results", default=None, help="results.json to merge into (default bench/results.json)")
    a = ap.parse_args(argv)
    c = TINY if a.tiny else HEAVY if a.heavy else MEDIUM
    name = "rollout" + ("_tiny" if a.tiny else "_heavy" if a.heavy else "")
    repeats = a.repeats or (2 if a.tiny else 3)
    model = build_model(c)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, c["model"]["vocab_size"], (c["prompts"], c["prompt_len"]), generator=g).tolist()
    tokens = c["prompts"] * c["n"] * c["max_tokens"]

    from upgrpo_megatron.rollout import RolloutEngine

    hf_dir = tempfile.mkdtemp(prefix="bench_rollout_")
    model.save_pretrained(hf_dir)
    t0 = time.perf_counter()
    engine = RolloutEngine(hf_dir, dtype="float32", seed=1, max_model_len=c["prompt_len"] + c["max_tokens"],
                           core_in_process=True)
    start_s = time.perf_counter() - t0
    own_process = {}
    try:
        kw = dict(n=c["n"], temperature=1.0, max_tokens=c["max_tokens"], stop_token_ids=[], seed=3)
        pairs = interleave(lambda: engine.generate(prompts, **kw), transformers_generate(model, prompts, c),
                           pairs=a.pairs)
        s = pairs.summary()
        ours, theirs = s["ours"], s["theirs"]
        capture = {}
        for mode in ("decode",) if a.heavy else ("decode", "replay"):  # seconds with capture on vs off, interleaved
            capture[mode] = interleave(lambda m=mode: generate(engine, prompts, kw, m),
                                       lambda: generate(engine, prompts, kw, None), pairs=a.pairs)
        if not (a.heavy or a.tiny):  # the engine core here vs in a process of its own, same weights and seeds
            t0 = time.perf_counter()
            other = RolloutEngine(hf_dir, dtype="float32", seed=1, max_model_len=c["prompt_len"] + c["max_tokens"])
            own_process["engine_start_s"] = time.perf_counter() - t0
            try:
                if not other.alive_processes():
                    raise RuntimeError("the subprocess engine started in this process: the comparison would be void")
                p = interleave(lambda: engine.generate(prompts, **kw), lambda: other.generate(prompts, **kw),
                               pairs=a.pairs)
            finally:
                other.shutdown()
            own_process.update(p.summary(), ratio=[t / o for o, t in zip(p.ours, p.theirs)])
        state = list(model.state_dict().items())
        sync = timeit(lambda: engine.update_weights(state, version=1), warmup=1, repeats=repeats)
        sync_bytes = sum(t.numel() * t.element_size() for _, t in state)
    finally:
        engine.shutdown()
    ours_tps, theirs_tps = tokens / ours["median"], tokens / theirs["median"]
    entry = record(
        name, ours_tps, theirs_tps, None, "tokens/s",
        config={**{k: v for k, v in c.items() if k != "model"}, **c["model"], "dtype": "float32",
                "threads": torch.get_num_threads(), "engine_core": "in_process"},
        extra={"ours_s": ours, "theirs_s": theirs,
               "ours_without_routing_tokens_per_s": tokens / capture["decode"].summary()["theirs"]["median"],
               **{f"capture_{m}": {"on_over_off": on_over_off(p), **p.summary()} for m, p in capture.items()},
               "engine_start_s": start_s, "core_in_process_vs_subprocess": own_process,
               "weight_sync_s": sync, "weight_sync_bytes": sync_bytes,
               "weight_sync_GB_per_s": sync_bytes / sync["median"] / 1e9},
        path=a.results, pairs=pairs,
    )
    no_routing = entry["extra"]["ours_without_routing_tokens_per_s"]
    print(f"rollout: ours {ours_tps:.0f} tokens/s (without routing {no_routing:.0f}), transformers generate "
          f"{theirs_tps:.0f} tokens/s (medians), ratio {pairs.describe()}; engine start {start_s:.0f}s; "
          f"weight sync {sync['median']:.2f}s for {sync_bytes / 1e6:.1f} MB")
    if own_process:
        r = own_process["ratio"]
        print(f"engine core in this process vs in its own: {statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}] "
              f"faster, {len(r)} pairs; start {start_s:.0f}s vs {own_process['engine_start_s']:.0f}s")
    for m, p in capture.items():
        r = on_over_off(p)
        print(f"routing capture ({m}): rollout time with capture / without {r['median']:.3f} "
              f"[{r['min']:.3f}-{r['max']:.3f}], {len(p.ours)} pairs")


def on_over_off(p) -> dict:
    """Median and range of the pairwise (seconds with capture) / (seconds without)."""
    r = [o / t for o, t in zip(p.ours, p.theirs)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def generate(engine, prompts, kw, mode):
    """One rollout with routing capture in `mode` ("decode" | "replay"), or without capture (None)."""
    engine.capture_routing = mode is not None
    engine.capture_mode = mode or "decode"
    try:
        return engine.generate(prompts, **kw)
    finally:
        engine.capture_routing, engine.capture_mode = True, "decode"


if __name__ == "__main__":
    main()
