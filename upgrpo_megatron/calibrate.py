"""Map `rollout.router_noise` (sigma) to the routing mismatch it causes, measured with the real engine.

    python tools/calibrate_router_noise.py recipes/qwen_moe.yaml --sigmas 0 0.01 0.03 0.1 0.3 --out DIR

One trainer is built from the recipe (SFT warm-up, or `trainer.init_from`), one engine started; for each sigma
the engine receives the actor's weights with that noise on its router weights and generates one step's
batch; the trainer scores the same responses (pi_old pass, routing recorded) and the step diagnostics compare
the two. Per sigma: the pair mismatch (share of (token, layer) pairs whose top-k sets differ), the share of
tokens with any mismatched layer, |log pi_trainer - log pi_rollout|, and the variance of the ratio
w = pi_trainer / pi_rollout over A > 0 and A <= 0 tokens. The tensors behind each row are saved
(`sigma_<s>.pt`: response mask, advantages, trainer and rollout log-probs) for tests and plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import torch


def _masked_var(x: torch.Tensor, sel: torch.Tensor) -> float:
    v = x[sel].double()
    return float(v.var(unbiased=False)) if v.numel() > 1 else float("nan")


def calibrate(trainer, sigmas: Sequence[float], out_dir: Path) -> List[Dict[str, float]]:
    """Rows of measurements, one per sigma (the trainer's engine must be started; world of one)."""
    from upgrpo_megatron.diagnostics import step_diagnostics
    from upgrpo_megatron.rollout.batch import training_batch

    cfg, tr = trainer.cfg, trainer
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = tr.task.next_train_prompts(cfg.trainer.prompts_per_step)
    rows = []
    for sigma in sigmas:
        cfg.rollout.router_noise = float(sigma)
        tr.rollout.sync(tr.weights)  # the same actor weights, the engine's routers perturbed by sigma
        rollout = tr.rollout.generate([p.prompt_ids for p in prompts], n=cfg.rollout.n,
                                      temperature=cfg.rollout.temperature, seed=cfg.trainer.seed)
        texts = [tr.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in rollout.samples]
        rewards = torch.tensor([tr.task.reward(t, prompts[s.prompt_index].answer)
                                for t, s in zip(texts, rollout.samples)])
        from upgrpo_megatron.losses import compute_grpo_advantages

        adv = compute_grpo_advantages(rewards, torch.tensor([s.prompt_index for s in rollout.samples]))
        batch = training_batch(rollout, [p.prompt_ids for p in prompts], list(range(len(rollout.samples))), adv,
                               max_prompt_length=cfg.data.max_prompt_length,
                               max_response_length=cfg.data.max_response_length,
                               pad_token_id=tr.tokenizer.pad_token_id, num_moe_layers=tr.actor.num_moe_layers,
                               topk=cfg.model.moe_router_topk)
        old = tr.actor.compute_log_prob(batch, cfg.actor.micro_batch_size, record_routing=True)
        m, _ = step_diagnostics(response_mask=batch["response_mask"], advantages=batch["advantages"],
                                old_log_prob=old["log_prob"], rollout_log_prob=batch["rollout_log_prob"],
                                train_routing=old["routing"], rollout_routing=batch["rollout_routing"],
                                num_experts=cfg.model.num_experts, clip_low=cfg.algorithm.clip_ratio_low,
                                clip_high=cfg.algorithm.clip_ratio_high)
        mask = batch["response_mask"] > 0
        log_w = old["log_prob"] - batch["rollout_log_prob"]
        pos, neg = mask & (batch["advantages"] > 0), mask & (batch["advantages"] <= 0)
        rows.append({"sigma": float(sigma), "pair_mismatch": m["mismatch/routing/pair_frac"],
                     "token_mismatch": m.get("mismatch/routing/token_any_frac", float("nan")),
                     "abs_log_prob_diff": m["mismatch/abs_log_prob_diff_mean"],
                     "w_var_pos": _masked_var(log_w.exp(), pos), "w_var_neg": _masked_var(log_w.exp(), neg),
                     "tokens": int(mask.sum())})
        torch.save({"response_mask": batch["response_mask"], "advantages": batch["advantages"],
                    "trainer_log_prob": old["log_prob"], "rollout_log_prob": batch["rollout_log_prob"]},
                   out_dir / f"sigma_{sigma:g}.pt")
    return rows


def format_table(rows: List[Dict[str, float]]) -> str:
    lines = ["| router_noise sigma | pair mismatch | tokens with a mismatched layer | mean abs log-prob diff | "
             "var w (A>0) | var w (A<=0) | tokens |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sigma']:g} | {r['pair_mismatch']:.4f} | {r['token_mismatch']:.4f} | "
                     f"{r['abs_log_prob_diff']:.2e} | {r['w_var_pos']:.2e} | {r['w_var_neg']:.2e} | {r['tokens']} |")
    return "\n".join(lines)
