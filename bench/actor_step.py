"""Actor train step (forward + backward + optimizer) tokens/s: our Megatron actor vs transformers' Qwen3-MoE.

Same config, same batch, same thread count, both models in this process and their steps interleaved (ours,
transformers, ours, ...: `bench.common.interleave`); the ratio is the median of the pairwise ratios. Also
reports the achieved FLOP/s of each against this machine's matmul peak, measured in the same run (a large fp32
GEMM).

    python bench/actor_step.py            # the medium config of issue 6 (hidden 512, 4 layers, 16 experts)
    python bench/actor_step.py --tiny     # a seconds-long smoke run (used by the test suite)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import MIN_PAIRS, init_world_of_one, interleave, record, timeit  # noqa: E402

MEDIUM = dict(hidden_size=512, num_layers=4, num_experts=16, moe_router_topk=2, vocab_size=8192,
              num_attention_heads=8, num_query_groups=4, head_dim=64, moe_ffn_hidden_size=256,
              ffn_hidden_size=1024, batch=8, seq=256)
TINY = dict(hidden_size=64, num_layers=2, num_experts=4, moe_router_topk=2, vocab_size=128,
            num_attention_heads=4, num_query_groups=2, head_dim=16, moe_ffn_hidden_size=32,
            ffn_hidden_size=128, batch=2, seq=32)


def model_cfg(c):
    from upgrpo_megatron.config.schema import ModelConfig

    return ModelConfig(architecture="qwen3_moe", rope_theta=1e6, max_position_embeddings=max(512, c["seq"]),
                       first_k_dense_layers=0, **{k: v for k, v in c.items() if k not in ("batch", "seq")})


def step_flops(c) -> float:
    """Matmul FLOPs of one fwd+bwd (3x forward) for the batch: attention projections, scores, experts, head."""
    tokens = c["batch"] * c["seq"]
    h, hd, nh, ng = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_query_groups"]
    attn_proj = 2 * tokens * h * hd * (nh + 2 * ng) + 2 * tokens * nh * hd * h
    attn_scores = 2 * 2 * c["batch"] * nh * c["seq"] * c["seq"] * hd
    experts = 2 * tokens * c["moe_router_topk"] * 3 * h * c["moe_ffn_hidden_size"]
    router = 2 * tokens * h * c["num_experts"]
    head = 2 * tokens * h * c["vocab_size"]
    fwd = c["num_layers"] * (attn_proj + attn_scores + experts + router) + head
    return 3.0 * fwd


def matmul_peak(n=2048, repeats=5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = timeit(lambda: a @ b, warmup=2, repeats=repeats)
    return 2 * n**3 / t["median"]


def ours_step(c, ids):
    """A closure running one train step of our actor (the model and optimizer built here)."""
    from upgrpo_megatron.megatron.actor import MegatronActor, OptimSettings
    from upgrpo_megatron.megatron.parallel import ParallelSizes, init_model_parallel

    init_world_of_one()
    init_model_parallel(ParallelSizes())
    actor = MegatronActor(model_cfg(c), optim=OptimSettings(lr=1e-4))
    B, S = ids.shape
    batch = dict(input_ids=ids, prompt_lens=torch.ones(B, dtype=torch.long),
                 response_mask=torch.ones(B, S - 1))

    def loss_fn(mb, lp, ent):
        loss = -(lp * mb["response_mask"]).sum() / mb["response_mask"].sum()
        return loss, {}

    return lambda: actor.train_step(iter([batch]), loss_fn)


def transformers_step(c, ids):
    """A closure running one fwd+bwd+AdamW step of transformers' Qwen3-MoE on the same config and batch."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_hidden_layers=c["num_layers"],
        num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_query_groups"],
        head_dim=c["head_dim"], intermediate_size=c["ffn_hidden_size"],
        moe_intermediate_size=c["moe_ffn_hidden_size"], num_experts=c["num_experts"],
        num_experts_per_tok=c["moe_router_topk"], norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], tie_word_embeddings=False, max_position_embeddings=max(512, c["seq"]),
        router_aux_loss_coef=0.0, output_router_logits=False,
    )
    cfg._attn_implementation = "sdpa"
    model = Qwen3MoeForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        (-lp.mean()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--pairs", type=int, default=MIN_PAIRS)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    ap.add_argument("--results", default=None, help="results.json to merge into (default bench/results.json)")
    a = ap.parse_args(argv)
    c = TINY if a.tiny else MEDIUM
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ids = torch.randint(0, c["vocab_size"], (c["batch"], c["seq"]))
    tokens = c["batch"] * c["seq"]
    peak = matmul_peak(512 if a.tiny else 2048)
    pairs = interleave(ours_step(c, ids), transformers_step(c, ids), pairs=a.pairs)
    s = pairs.summary()
    flops = step_flops(c)
    ours_tps, theirs_tps = tokens / s["ours"]["median"], tokens / s["theirs"]["median"]
    entry = record(
        "actor_step" + ("_tiny" if a.tiny else ""), ours_tps, theirs_tps, None, "tokens/s",
        config={**c, "threads": torch.get_num_threads()},
        extra={"ours_s": s["ours"], "theirs_s": s["theirs"], "matmul_peak_flops": peak,
               "ours_flops_frac_of_peak": flops / s["ours"]["median"] / peak,
               "theirs_flops_frac_of_peak": flops / s["theirs"]["median"] / peak, "step_flops": flops},
        path=a.results, pairs=pairs,
    )
    print(f"actor step: ours {ours_tps:.0f} tok/s, transformers {theirs_tps:.0f} tok/s (medians), ratio "
          f"{pairs.describe()}, load {pairs.load_start}; ours at "
          f"{100 * entry['extra']['ours_flops_frac_of_peak']:.1f}% of matmul peak {peak / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
