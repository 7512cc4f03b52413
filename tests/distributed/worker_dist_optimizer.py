"""torchrun worker (2 ranks): megatron's distributed optimizer on CPU/gloo, and the planner's counts.

For each layout (DP=2, EP=2, TP=2):
- counts: the parameters each rank holds and the optimizer state it keeps (plain and distributed optimizer)
  against `sizing.local_params` / `sizing.optimizer_state_numel` (exact);
- (DP=2, EP=2) training: the same weights and batches, 3 optimizer steps with the plain and with the
  distributed optimizer -> max |weight difference|;
- (DP=2, EP=2) resume: the distributed optimizer checkpointed after step 2 (megatron/checkpoint.py), a fresh
  actor loads it and takes step 3 -> max |difference| to the uninterrupted step 3.

Run: torchrun --nproc_per_node=2 worker_dist_optimizer.py OUT_DIR   (rank 0 writes OUT_DIR/result.json)
"""
import json
import sys
from pathlib import Path

import torch

# the model section as recipe keys: given as overrides to the recipe (counts) and as ModelConfig(**MODEL_KEYS)
MODEL_KEYS = dict(
    architecture="qwen3_moe", vocab_size=64, hidden_size=64, num_layers=2, num_attention_heads=4,
    num_query_groups=2, head_dim=16, ffn_hidden_size=128, moe_ffn_hidden_size=32, num_experts=4,
    moe_router_topk=2, rope_theta=10000.0, max_position_embeddings=64, first_k_dense_layers=0,
)
LAYOUTS = {"dp2": dict(tp=1, ep=1), "ep2": dict(tp=1, ep=2), "tp2": dict(tp=2, ep=1)}
STEPS, ROWS, PROMPT, RESPONSE = 3, 8, 4, 8


def batches():
    g = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        ids = torch.randint(0, MODEL_KEYS["vocab_size"], (ROWS, PROMPT + RESPONSE), generator=g)
        yield {"input_ids": ids, "prompt_lens": torch.full((ROWS,), PROMPT),
               "response_mask": torch.ones(ROWS, RESPONSE)}


def actor(layout, distributed):
    from upgrpo_megatron.config.schema import ModelConfig
    from upgrpo_megatron.megatron.actor import MegatronActor, OptimSettings

    return MegatronActor(ModelConfig(**MODEL_KEYS), tp=layout["tp"], ep=layout["ep"],
                         sequence_parallel=layout["tp"] > 1, optim=OptimSettings(lr=1e-2, grad_clip=1.0),
                         distributed_optimizer=distributed)


def train_step(a, batch):
    from upgrpo_megatron.distributed import dp_rows, take_rows
    from upgrpo_megatron.megatron.actor import split_micro_batches
    from upgrpo_megatron.megatron.parallel import data_parallel

    dp = data_parallel()
    local = take_rows(batch, dp_rows(ROWS, dp.rank, dp.size))
    total = float(batch["response_mask"].sum())

    def loss_fn(mb, lp, ent):
        return -(lp * mb["response_mask"]).sum() / total, {}

    out = a.train_step(split_micro_batches(local, torch.arange(local["input_ids"].shape[0]), 2), loss_fn)
    assert out["actor/skipped_step"] == 0.0, out


def max_diff(a, b) -> float:
    from upgrpo_megatron.megatron.sharding import full_state_dict

    fa, fb = full_state_dict(a.module), full_state_dict(b.module)
    return max(float((fa[k] - fb[k]).abs().max()) for k in fa)


def counts(name, layout, plain, dist_opt):
    from megatron.core import parallel_state as ps

    from upgrpo_megatron.config import load_recipe, validate_layout
    from upgrpo_megatron.megatron.optimizer import state_numel
    from upgrpo_megatron.sizing import local_params, optimizer_state_numel

    cfg = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "qwen_moe.yaml",
                      [f"model.{k}={v}" for k, v in MODEL_KEYS.items()]
                      + [f"parallel.tp={layout['tp']}", f"parallel.ep={layout['ep']}"])
    lay = validate_layout(cfg, torch.distributed.get_world_size())
    ep_rank, dp_rank = ps.get_expert_model_parallel_rank(), ps.get_data_parallel_rank()
    edp_rank = ps.get_expert_data_parallel_rank()
    real = [(n, p.numel(), ".mlp.experts." in n) for n, p in plain.module.named_parameters()]
    return {
        "params_match": real == local_params(cfg.model, lay, ep_rank),
        "params": [sum(n for _, n, _ in real), sum(n for _, n, _ in local_params(cfg.model, lay, ep_rank))],
        "plain_state": [state_numel(plain.optimizer),
                        optimizer_state_numel(cfg.model, lay, False, ep_rank=ep_rank)],
        "dist_state": [state_numel(dist_opt.optimizer),
                       optimizer_state_numel(cfg.model, lay, True, dp_rank=dp_rank, expert_dp_rank=edp_rank,
                                             ep_rank=ep_rank)],
    }


def run_layout(name, layout, out_dir):
    from upgrpo_megatron.megatron.checkpoint import load_checkpoint, save_checkpoint
    from upgrpo_megatron.megatron.optimizer import is_distributed
    from upgrpo_megatron.megatron.parallel import ParallelSizes, init_model_parallel
    from upgrpo_megatron.megatron.sharding import full_state_dict, load_full_state_dict

    init_model_parallel(ParallelSizes(tp=layout["tp"], ep=layout["ep"], sequence_parallel=layout["tp"] > 1), seed=3)
    plain, dist_opt = actor(layout, False), actor(layout, True)
    assert is_distributed(dist_opt.optimizer) and not is_distributed(plain.optimizer)
    result = {"counts": counts(name, layout, plain, dist_opt)}
    if name == "tp2":
        return result
    start = full_state_dict(plain.module)
    load_full_state_dict(dist_opt.module, start)  # same weights (fp32: the optimizer's shards are views)
    ckpt = Path(out_dir) / f"ckpt_{name}"
    for step, batch in enumerate(batches(), start=1):
        train_step(plain, batch)
        train_step(dist_opt, batch)
        if step == STEPS - 1:
            save_checkpoint(ckpt, dist_opt.module, optimizer=dist_opt.optimizer, extra_state={"step": step})
    result["plain_vs_distributed"] = max_diff(plain, dist_opt)
    resumed = actor(layout, True)  # another init: everything must come from the checkpoint
    load_checkpoint(ckpt, resumed.module, optimizer=resumed.optimizer)
    train_step(resumed, list(batches())[-1])
    result["resumed_vs_uninterrupted"] = max_diff(resumed, dist_opt)
    result["saved_files"] = sorted(str(p.relative_to(ckpt)) for p in (ckpt / "optim").rglob("*") if p.is_file())[:5]
    return result


def main(out_dir: str) -> None:
    from upgrpo_megatron.megatron.parallel import destroy

    results = {name: run_layout(name, layout, out_dir) for name, layout in LAYOUTS.items()}
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, results)
    if torch.distributed.get_rank() == 0:
        Path(out_dir, "result.json").write_text(json.dumps(gathered, indent=1))
    destroy()


if __name__ == "__main__":  # dist_checkpointing's save spawns a helper that re-imports __main__
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(sys.argv[1])
