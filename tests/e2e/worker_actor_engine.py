"""torchrun worker (1 rank): the Megatron actor and the vLLM engine on the same weights.

Writes JSON to --out: log-prob agreement and routing agreement actor-vs-engine, mismatch after perturbing the
actor's router, and agreement after an optimizer step + weight sync; R3's log-prob gap on the perturbed actor.
"""
import argparse
import json
import tempfile

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from upgrpo_megatron.convert import hf_config_to_model_cfg, load_hf_into_model, megatron_to_hf_stream
    from upgrpo_megatron.diagnostics import compute_routing_mismatch
    from upgrpo_megatron.megatron.actor import MegatronActor, OptimSettings, split_micro_batches
    from upgrpo_megatron.megatron.parallel import ParallelSizes, init_model_parallel
    from upgrpo_megatron.megatron.sharding import iter_full_params
    from upgrpo_megatron.rollout import RolloutEngine
    from upgrpo_megatron.rollout.batch import pad_right
    from upgrpo_megatron.router_replay import ReplayRolloutRouting

    torch.manual_seed(0)
    hf_cfg = Qwen3MoeConfig(vocab_size=32, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, intermediate_size=256, moe_intermediate_size=64,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                            mlp_only_layers=[], tie_word_embeddings=False, max_position_embeddings=64)
    d = tempfile.mkdtemp()
    Qwen3MoeForCausalLM(hf_cfg).save_pretrained(d)
    mcfg = hf_config_to_model_cfg(json.load(open(f"{d}/config.json")))
    init_model_parallel(ParallelSizes())
    actor = MegatronActor(mcfg, optim=OptimSettings(lr=1e-2))
    load_hf_into_model(d, actor.module, mcfg)
    engine = RolloutEngine(d, dtype="float32", seed=0, max_model_len=48)
    prompts = [[3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14]]

    def rollout_and_score(seed, temperature=1.0):
        b = engine.generate(prompts, n=4, temperature=temperature, max_tokens=10, seed=seed)
        seqs = [prompts[s.prompt_index] + s.response_ids for s in b.samples]
        R = max(len(s.response_ids) for s in b.samples)
        mask = torch.zeros(len(seqs), R)
        roll_lp = torch.zeros(len(seqs), R)
        roll_r = torch.full((len(seqs), R, 2, 2), -1, dtype=torch.long)
        roll_pr = torch.full((len(seqs), max(map(len, prompts)), 2, 2), -1, dtype=torch.long)
        for i, s in enumerate(b.samples):
            mask[i, : len(s.response_ids)] = 1
            roll_lp[i, : len(s.response_ids)] = torch.tensor(s.log_probs)
            roll_r[i, : len(s.response_ids)] = torch.as_tensor(s.routing, dtype=torch.long)
            roll_pr[i, : len(s.prompt_routing)] = torch.as_tensor(s.prompt_routing, dtype=torch.long)
        batch = {"input_ids": pad_right(seqs, 0),
                 "prompt_lens": torch.tensor([len(prompts[s.prompt_index]) for s in b.samples]),
                 "response_mask": mask, "rollout_routing": roll_r, "rollout_prompt_routing": roll_pr,
                 "rollout_log_prob": roll_lp}
        out = actor.compute_log_prob(batch, 16)
        d_lp = ((out["log_prob"] - roll_lp).abs() * mask)
        mis = compute_routing_mismatch(out["routing"], roll_r, mask, 8).scalars
        return batch, out, {"lp_mean_abs": float(d_lp.sum() / mask.sum()), "lp_max_abs": float(d_lp.max()),
                            "pair_frac": mis["pair_frac"], "version": b.weight_version}

    res = {}
    batch, out, res["same_weights"] = rollout_and_score(1)
    # sampling at T = 0.7: the engine's log-probs are of softmax(logits / 0.7), and so are the actor's
    actor.module.logit_temperature = 0.7
    t_batch, _, res["temperature_0.7"] = rollout_and_score(5, temperature=0.7)
    actor.module.logit_temperature = 1.0
    t1 = actor.compute_log_prob(t_batch, 16)["log_prob"]
    actor.module.logit_temperature = 0.7
    t07 = actor.compute_log_prob(t_batch, 16)["log_prob"]
    actor.module.logit_temperature = 1.0
    res["temperature_0.7"]["t07_vs_t1_mean_abs"] = float(((t07 - t1).abs() * t_batch["response_mask"]).sum()
                                                         / t_batch["response_mask"].sum())
    # one optimizer step on the actor, then sync: the engine must follow the new weights
    def loss_fn(mb, lp, ent):
        return -(lp * mb["response_mask"]).sum() / mb["response_mask"].sum(), {}
    actor.train_step(split_micro_batches(batch, torch.arange(batch["input_ids"].shape[0]), 16), loss_fn)
    _, _, res["before_sync"] = rollout_and_score(2)
    engine.update_weights(megatron_to_hf_stream(mcfg, iter_full_params(actor.module)), version=1)
    _, _, res["after_sync"] = rollout_and_score(3)
    # perturb the actor's router only (engine keeps the synced weights): routing mismatch must rise
    with torch.no_grad():
        for n, p in actor.module.named_parameters():
            if n.endswith("mlp.router.weight"):
                p.add_(0.5 * p.std() * torch.randn_like(p))
    p_batch, _, res["router_perturbed"] = rollout_and_score(4)

    # R3 (the trainer's code path) on the perturbed actor: replaying the engine's routing must close most of the
    # log-prob gap, and replaying the prompt positions too must close more than the response positions alone
    def r3_gap(local):
        old = ReplayRolloutRouting().old_log_prob(actor, dict(local), 16)
        m = local["response_mask"]
        return float(((old["log_prob"] - local["rollout_log_prob"]).abs() * m).sum() / m.sum())

    no_prompt = {k: v for k, v in p_batch.items() if k != "rollout_prompt_routing"}
    res["r3"] = {"full": r3_gap(p_batch), "response_only": r3_gap(no_prompt)}
    engine.shutdown()
    json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
