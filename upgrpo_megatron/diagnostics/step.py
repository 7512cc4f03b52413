"""Per-step diagnostics for the trainer: scalars into the step's metrics, layer x expert arrays on disk.

Two pure functions bundle the statistics (no Megatron, no vLLM):
- `step_diagnostics(...)`   trainer routing at pi_old vs rollout routing, pi_old vs pi_rollout, loads, validity;
- `update_diagnostics(...)` routing drift pi_old -> pi_theta and the update ratio pi_theta / pi_old.
Each returns `(metrics, arrays)`: metrics with full names (`mismatch/...`, `routing/...`), arrays keyed by
identifier-safe names for `DiagnosticsWriter`.

`StepDiagnostics` is the trainer-facing object: `rollout_vs_train(batch, step)` after the pi_old pass,
`drift_collector(epoch)` as the update's per-micro-batch callback, `finish_drift(step)` at the end of the update
(which also writes `RUN_DIR/diagnostics/step_XXXXXX.npz`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from upgrpo_megatron.diagnostics.ratio_stats import (
    HIST_EDGES,
    compute_prob_gap,
    compute_ratio_stats,
    log_ratio_histogram,
)
from upgrpo_megatron.diagnostics.routing_stats import (
    check_capture_validity,
    compute_expert_load,
    compute_routing_mismatch,
    pair_frac_by_rows,
)
from upgrpo_megatron.diagnostics.storage import DiagnosticsWriter, append_samples  # noqa: F401 (re-export)

Metrics = Dict[str, float]
Arrays = Dict[str, torch.Tensor]


def step_diagnostics(*, response_mask: torch.Tensor, advantages: torch.Tensor, old_log_prob: torch.Tensor,
                     rollout_log_prob: torch.Tensor, train_routing: Optional[torch.Tensor],
                     rollout_routing: Optional[torch.Tensor], num_experts: int, clip_low: float, clip_high: float,
                     router_scores: Optional[torch.Tensor] = None, taus: Sequence[float] = (2, 5, 10),
                     threshold: float = 0.5) -> Tuple[Metrics, Arrays]:
    """Train vs rollout diagnostics of one RL step.

    response_mask, advantages, old_log_prob (pi_old, trainer), rollout_log_prob (pi_rollout, engine):
    `[batch, response_len]`; train_routing, rollout_routing: `[batch, response_len, moe_layers, topk]` int64
    or None (not recorded / not captured: the routing statistics are skipped, the probability gap is not);
    router_scores: optional trainer router probabilities `[batch, response_len, moe_layers, num_experts]`.
    Every statistic covers the response tokens; a token's routing is that of the position that scored it.

    Metrics: `mismatch/routing/*` (RoutingMismatch scalars), `mismatch/*` (compute_prob_gap),
    `mismatch/ratio/*` (token-level pi_old/pi_rollout ratio stats by split, + expert_var_max),
    `routing/rollout_capture/*` (check_capture_validity), `routing/{train,rollout}_load/*` (imbalance).
    Arrays: `mismatch_layer_*` [L], `mismatch_expert_*` [L, E], `train_rollout_ratio_*` [L, E, 2, 2],
    `load_train`, `load_rollout` [L, E], `hist_train_rollout` [2, 2, bins], `hist_edges` [bins + 1].
    """
    m: Metrics = {f"mismatch/{k}": v for k, v in
                  compute_prob_gap(old_log_prob, rollout_log_prob, response_mask, taus, threshold).items()}
    arrays: Arrays = {"hist_edges": HIST_EDGES}
    log_ratio = old_log_prob - rollout_log_prob
    token_mis = torch.zeros_like(response_mask, dtype=torch.bool)
    tokens = response_mask.bool()
    if rollout_routing is not None:
        valid = check_capture_validity(rollout_routing, tokens, num_experts)
        m.update({f"routing/rollout_capture/{k}": v for k, v in valid.items()})
        load_s, load = compute_expert_load(rollout_routing, tokens, num_experts)
        m.update({f"routing/rollout_load/{k}": v for k, v in load_s.items()})
        arrays["load_rollout"] = load
    if train_routing is not None:
        load_s, load = compute_expert_load(train_routing, tokens, num_experts)
        m.update({f"routing/train_load/{k}": v for k, v in load_s.items()})
        arrays["load_train"] = load
    if train_routing is not None and rollout_routing is not None:
        mm = compute_routing_mismatch(train_routing, rollout_routing, tokens, num_experts, router_scores)
        m.update(mm.metrics("mismatch/routing"))
        arrays.update(mm.arrays("mismatch"))
        ratio = compute_ratio_stats(log_ratio, train_routing, tokens, advantages, mm.mismatched,
                                    num_experts, clip_low, clip_high)
        m.update(ratio.metrics("mismatch/ratio"))
        arrays.update(ratio.arrays("train_rollout_ratio"))
        token_mis = mm.mismatched.any(-1)
    arrays["hist_train_rollout"] = log_ratio_histogram(log_ratio, response_mask, advantages, token_mis)
    return m, arrays


def update_diagnostics(*, response_mask: torch.Tensor, advantages: torch.Tensor, old_log_prob: torch.Tensor,
                       log_prob: torch.Tensor, old_routing: torch.Tensor, new_routing: Optional[torch.Tensor],
                       num_experts: int, clip_low: float, clip_high: float) -> Tuple[Metrics, Arrays]:
    """Routing drift and update-ratio diagnostics of (a concatenation of) update micro-batches.

    Token tensors `[n, response_len]`: log_prob = pi_theta at the time the micro-batch was trained on;
    old_routing (pi_old) / new_routing (pi_theta, or None when not recorded, e.g. under routing replay):
    `[n, response_len, moe_layers, topk]`. Metrics: `routing/drift/*`, `routing/update_ratio/*`.
    Arrays: `drift_layer_*`, `drift_expert_*`, `update_ratio_*`, `hist_update`.
    """
    m: Metrics = {}
    arrays: Arrays = {}
    log_ratio = log_prob - old_log_prob
    L = old_routing.shape[2]
    mismatched = torch.zeros(*response_mask.shape, L, dtype=torch.bool)
    if new_routing is not None:
        mm = compute_routing_mismatch(old_routing, new_routing, response_mask, num_experts)
        m.update(mm.metrics("routing/drift"))
        arrays.update(mm.arrays("drift"))
        mismatched = mm.mismatched
    ratio = compute_ratio_stats(log_ratio, old_routing, response_mask, advantages, mismatched, num_experts,
                                clip_low, clip_high)
    m.update(ratio.metrics("routing/update_ratio"))
    arrays.update(ratio.arrays("update_ratio"))
    arrays["hist_update"] = log_ratio_histogram(log_ratio, response_mask, advantages, mismatched.any(-1))
    return m, arrays


class StepDiagnostics:
    """Trainer-facing: collects one RL step's diagnostics and writes its arrays (rank 0 only)."""

    def __init__(self, run_dir, *, num_experts: int, clip_low: float, clip_high: float,
                 taus=(2.0, 5.0, 10.0), threshold: float = 0.5, save_every: int = 1, enabled_writer: bool = True):
        self.E = num_experts
        self.clip = (clip_low, clip_high)
        self.taus, self.threshold, self.save_every = tuple(taus), threshold, max(1, int(save_every))
        self.writer = DiagnosticsWriter(run_dir) if enabled_writer else None
        self.arrays: Arrays = {}
        self._drift: List[dict] = []

    def rollout_vs_train(self, batch: Dict[str, torch.Tensor], step: int) -> Metrics:
        """After the pi_old pass. batch keys: response_mask, advantages, old_log_prob, rollout_log_prob,
        routing (trainer, optional), rollout_routing (optional), router_scores (optional)."""
        m, self.arrays = step_diagnostics(
            response_mask=batch["response_mask"], advantages=batch["advantages"],
            old_log_prob=batch["old_log_prob"], rollout_log_prob=batch["rollout_log_prob"],
            train_routing=batch.get("routing"), rollout_routing=batch.get("rollout_routing"),
            num_experts=self.E, clip_low=self.clip[0], clip_high=self.clip[1],
            router_scores=batch.get("router_scores"), taus=self.taus, threshold=self.threshold)
        self.step = step
        return m

    def drift_collector(self, epoch: int):
        """Callback `(micro_batch, routing_at_pi_theta or None, log_prob_at_pi_theta)` for the update loop."""
        def collect(mb, routing: Optional[torch.Tensor], log_prob: torch.Tensor) -> None:
            host = lambda t: None if t is None else t.detach().cpu()  # noqa: E731 (kept for the whole update)
            self._drift.append({"epoch": epoch, "routing": host(routing), "old_routing": host(mb.get("routing")),
                                "log_prob": host(log_prob), "old_log_prob": host(mb["old_log_prob"]),
                                "mask": host(mb["response_mask"]), "adv": host(mb["advantages"])})
        return collect

    def finish_drift(self, step: int) -> Metrics:
        """Reduce the collected micro-batches (all, and per PPO epoch / mini-batch) and write the step's arrays."""
        m: Metrics = {}
        items, self._drift = self._drift, []
        items = [i for i in items if i["old_routing"] is not None]
        if items:
            cat = lambda key, sel=items: torch.cat([i[key] for i in sel])  # noqa: E731
            has_new = all(i["routing"] is not None for i in items)
            dm, darr = update_diagnostics(
                response_mask=cat("mask"), advantages=cat("adv"), old_log_prob=cat("old_log_prob"),
                log_prob=cat("log_prob"), old_routing=cat("old_routing"),
                new_routing=cat("routing") if has_new else None,
                num_experts=self.E, clip_low=self.clip[0], clip_high=self.clip[1])
            m.update(dm)
            self.arrays.update(darr)
            if has_new:
                # row groups of the concatenation: each micro-batch (in update order: does drift grow within the
                # step?) and each PPO epoch; one pass over the routing for all of them
                starts = [0]
                for i in items:
                    starts.append(starts[-1] + i["mask"].shape[0])
                per_mb = [range(a, b) for a, b in zip(starts[:-1], starts[1:])]
                epochs = sorted({i["epoch"] for i in items})
                per_epoch = [[r for i, rows in zip(items, per_mb) if i["epoch"] == e for r in rows] for e in epochs]
                fracs = pair_frac_by_rows(cat("old_routing"), cat("routing"), cat("mask"), self.E, per_mb + per_epoch)
                for e, f in zip(epochs, fracs[len(per_mb):]):
                    m[f"routing/drift/pair_frac_epoch{e}"] = f
                self.arrays["drift_pair_frac_per_micro_batch"] = torch.tensor(fracs[: len(per_mb)],
                                                                              dtype=torch.float64)
        if self.writer is not None and self.arrays and step % self.save_every == 0:
            self.writer.write(step, self.arrays)
        self.arrays = {}
        return m
