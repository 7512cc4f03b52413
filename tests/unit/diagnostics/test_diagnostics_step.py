"""Per-step bundling, the trainer-facing StepDiagnostics, and compact per-step storage."""

import math

import numpy as np
import torch

from upgrpo_megatron.diagnostics import DiagnosticsReader, DiagnosticsWriter, StepDiagnostics, step_diagnostics

E = 4
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
TRAIN = torch.tensor([[[[0, 1], [2, 3]], [[1, 0], [2, 0]], [[0, 1], [3, 2]], [[-1, -1], [-1, -1]]]])
ROLL = torch.tensor([[[[0, 1], [3, 2]], [[0, 2], [2, 0]], [[1, 2], [2, 1]], [[-1, -1], [-1, -1]]]])
LP = torch.log(torch.tensor([[0.5, 0.1, 0.2, 1.0]]))
ADV = torch.tensor([[1.0, 1.0, 1.0, 0.0]])


def test_step_diagnostics_names_metrics_in_full_and_skips_routing_when_not_captured():
    m, arrays = step_diagnostics(response_mask=MASK, advantages=ADV, old_log_prob=LP, rollout_log_prob=LP,
                                 train_routing=TRAIN, rollout_routing=ROLL, num_experts=E, clip_low=0.2, clip_high=0.28)
    assert m["mismatch/routing/pair_frac"] == 0.5  # 3 of 6 pairs (see test_diagnostics_stats)
    assert m["mismatch/token_mult_prob_error"] == 1.0  # same log-probs
    assert m["routing/rollout_capture/valid"] == 1.0 and m["routing/rollout_capture/padding_routes"] == 0
    assert m["routing/train_load/max_over_mean"] == 2.0
    assert m["mismatch/ratio/adv_pos/count"] == 3
    assert arrays["mismatch_expert_flip_rate"].shape == (2, E)
    assert arrays["train_rollout_ratio_var"].shape == (2, E, 2, 2)
    assert arrays["hist_train_rollout"].sum() == 3
    m2, arrays2 = step_diagnostics(response_mask=MASK, advantages=ADV, old_log_prob=LP, rollout_log_prob=LP,
                                   train_routing=TRAIN, rollout_routing=None, num_experts=E,
                                   clip_low=0.2, clip_high=0.28)
    assert not any(k.startswith("mismatch/routing/") for k in m2) and "mismatch/js_divergence" in m2
    assert "mismatch_expert_flip_rate" not in arrays2 and "load_train" in arrays2


def test_step_diagnostics_collects_drift_per_epoch_and_writes_the_step(tmp_path):
    sd = StepDiagnostics(tmp_path, num_experts=E, clip_low=0.2, clip_high=0.28)
    batch = {"response_mask": MASK, "advantages": ADV, "old_log_prob": LP, "rollout_log_prob": LP,
             "routing": TRAIN, "rollout_routing": ROLL}
    sd.rollout_vs_train(batch, step=7)
    mb = {"routing": TRAIN, "old_log_prob": LP, "response_mask": MASK, "advantages": ADV}
    sd.drift_collector(0)(mb, TRAIN.clone(), LP)           # epoch 0: routing unchanged
    sd.drift_collector(1)(mb, ROLL.clone(), LP + 0.1)      # epoch 1: 3 of 6 pairs moved
    m = sd.finish_drift(step=7)
    assert m["routing/drift/pair_frac_epoch0"] == 0.0 and m["routing/drift/pair_frac_epoch1"] == 0.5
    assert m["routing/drift/pair_frac"] == 0.25  # 3 of 12 pairs over both epochs
    # update ratio exp(0) for epoch 0 (3 tokens) and exp(0.1) for epoch 1 (3 tokens)
    assert math.isclose(m["routing/update_ratio/all/mean"], (1 + math.exp(0.1)) / 2, rel_tol=1e-6)
    d = DiagnosticsReader(tmp_path).load(7)
    assert d["drift_pair_frac_per_micro_batch"].tolist() == [0.0, 0.5]
    assert {"mismatch_expert_flip_rate", "update_ratio_var", "hist_update", "load_rollout"} <= set(d)


def test_writer_stores_compact_dtypes_without_losing_small_variances(tmp_path):
    w = DiagnosticsWriter(tmp_path)
    w.write(3, {"flags": torch.tensor([True, False]), "count": torch.tensor([3.0, 0.0], dtype=torch.float64),
                "flip_rate": torch.tensor([0.25, 1.0], dtype=torch.float64),
                "ratio_var": torch.tensor([1e-9, 2.5], dtype=torch.float64), "ids": np.arange(4)})
    d = DiagnosticsReader(tmp_path).load(3)
    assert d["flags"].dtype == np.uint8 and d["count"].dtype == np.int32 and d["ids"].dtype == np.int32
    assert d["flip_rate"].dtype == np.float16 and d["flip_rate"].tolist() == [0.25, 1.0]
    assert d["ratio_var"].dtype == np.float32 and d["ratio_var"][0] > 0  # float16 would flush 1e-9 to 0
    assert (tmp_path / "diagnostics" / "step_000003.npz").exists()
    assert not list((tmp_path / "diagnostics").glob(".tmp*"))
