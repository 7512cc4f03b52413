"""Per-step diagnostics for the trainer: scalars into the step's metrics, layer x expert arrays on disk.

`rollout_vs_train(batch)` compares the trainer's routing at pi_old with the rollout engine's, and
pi_old with pi_rollout; `drift_collector(...)` gathers the routing and log-ratio of every update micro-batch
(pi_theta vs pi_old); `finish_drift()` reduces them. Arrays go to `RUN_DIR/diagnostics/step_000012.npz`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from upgrpo_megatron.diagnostics.stats import (
    capture_validity,
    expert_load,
    prob_gap,
    ratio_stats_per_expert,
    routing_mismatch,
)


class DiagnosticsWriter:
    def __init__(self, run_dir):
        self.dir = Path(run_dir) / "diagnostics"
        self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, arrays: Dict[str, torch.Tensor]) -> Path:
        path = self.dir / f"step_{step:06d}.npz"
        tmp = self.dir / f".step_{step:06d}.tmp.npz"
        np.savez_compressed(tmp, **{k: v.detach().cpu().numpy().astype(np.float32) for k, v in arrays.items()})
        tmp.replace(path)
        return path


def read_diagnostics(run_dir) -> Dict[int, Dict[str, np.ndarray]]:
    out = {}
    for p in sorted((Path(run_dir) / "diagnostics").glob("step_*.npz")):
        with np.load(p) as z:
            out[int(p.stem.split("_")[1])] = {k: z[k] for k in z.files}
    return out


class StepDiagnostics:
    def __init__(self, run_dir, *, num_experts: int, clip_low: float, clip_high: float,
                 taus=(2.0, 5.0, 10.0), threshold: float = 0.5, save_every: int = 1, enabled_writer: bool = True):
        self.E = num_experts
        self.clip = (clip_low, clip_high)
        self.taus, self.threshold, self.save_every = tuple(taus), threshold, save_every
        self.writer = DiagnosticsWriter(run_dir) if enabled_writer else None
        self.arrays: Dict[str, torch.Tensor] = {}
        self._drift: List[dict] = []

    def rollout_vs_train(self, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
        """Trainer routing at pi_old vs rollout routing; pi_old vs pi_rollout; loads; capture validity."""
        mask, train_r, roll_r = batch["response_mask"], batch["routing"], batch["rollout_routing"]
        m: Dict[str, float] = {}
        validity = capture_validity(roll_r, mask, self.E)
        m.update({f"routing/rollout_capture_{k}": v for k, v in validity.items()})
        scal, arr = routing_mismatch(train_r, roll_r, mask, self.E, prefix="mismatch/routing")
        m.update(scal)
        m.update(prob_gap(batch["old_log_prob"], batch["rollout_log_prob"], mask, self.taus, self.threshold))
        ratio = ratio_stats_per_expert(batch["old_log_prob"] - batch["rollout_log_prob"], train_r, mask,
                                       batch["advantages"], arr["mismatched"], self.E, *self.clip)
        lt, load_t = expert_load(train_r, mask, self.E)
        lr, load_r = expert_load(roll_r, mask, self.E)
        m.update({"routing/train_load_max_over_mean": lt["max_over_mean"], "routing/train_load_cv": lt["cv"],
                  "routing/rollout_load_max_over_mean": lr["max_over_mean"], "routing/rollout_load_cv": lr["cv"]})
        self.arrays = {"mismatch_layer_pair_frac": arr["layer_pair_frac"], "mismatch_expert_flip_rate": arr["expert_flip_rate"],
                       "load_train": load_t, "load_rollout": load_r,
                       **{f"train_rollout_{k}": v for k, v in ratio.items()}}
        # log-ratio samples for histograms: pi_old / pi_rollout of every real token, with adv sign and match flag
        real = mask > 0
        self.arrays["hist_log_ratio_train_rollout"] = (batch["old_log_prob"] - batch["rollout_log_prob"])[real]
        self.arrays["hist_adv_positive"] = (batch["advantages"] > 0)[real].float()
        self.arrays["hist_token_mismatched"] = arr["mismatched"].any(-1)[real].float()
        self.step = step
        return m

    def drift_collector(self, epoch: int):
        def collect(mb, routing: Optional[torch.Tensor], log_prob: torch.Tensor) -> None:
            self._drift.append({"epoch": epoch, "routing": routing, "old_routing": mb["routing"],
                                "log_ratio": log_prob - mb["old_log_prob"], "mask": mb["response_mask"],
                                "adv": mb["advantages"]})
        return collect

    def finish_drift(self, step: int) -> Dict[str, float]:
        m: Dict[str, float] = {}
        items, self._drift = self._drift, []
        if items and all(i["routing"] is not None for i in items):
            R = max(i["mask"].shape[1] for i in items)
            cat = lambda k: torch.cat([i[k] for i in items])  # noqa: E731
            old_r, new_r, mask = cat("old_routing"), cat("routing"), cat("mask")
            scal, arr = routing_mismatch(old_r, new_r, mask, self.E, prefix="routing/drift")
            m.update(scal)
            ratio = ratio_stats_per_expert(cat("log_ratio"), old_r, mask, cat("adv"), arr["mismatched"], self.E, *self.clip)
            self.arrays.update({"drift_layer_pair_frac": arr["layer_pair_frac"],
                                "drift_expert_flip_rate": arr["expert_flip_rate"],
                                **{f"update_{k}": v for k, v in ratio.items()}})
            for e in sorted({i["epoch"] for i in items}):
                sel = [i for i in items if i["epoch"] == e]
                s, _ = routing_mismatch(torch.cat([i["old_routing"] for i in sel]), torch.cat([i["routing"] for i in sel]),
                                        torch.cat([i["mask"] for i in sel]), self.E, prefix="routing/drift")
                m[f"routing/drift/pair_frac_epoch{e}"] = s["routing/drift/pair_frac"]
        if self.writer is not None and self.arrays and step % self.save_every == 0:
            self.writer.write(step, self.arrays)
        return m


def append_samples(run_dir, step: int, rows: List[dict]) -> None:
    """Sample rollouts for the report: one JSON line each (prompt, response, reward)."""
    with open(Path(run_dir) / "samples.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({"step": step, **r}) + "\n")
