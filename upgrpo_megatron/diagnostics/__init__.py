"""Routing-mismatch and importance-ratio diagnostics (statistics are pure torch: no Megatron, no vLLM).

    from upgrpo_megatron.diagnostics import (compute_routing_mismatch, compute_ratio_stats, compute_prob_gap,
        compute_expert_load, check_capture_validity, step_diagnostics, DiagnosticsWriter, DiagnosticsReader)

Modules: `routing_stats` (mismatch, load, capture validity), `ratio_stats` (ratio per expert, probability gap,
log-ratio histograms), `step` (bundles for one RL step + the trainer-facing StepDiagnostics), `storage`
(per-step .npz arrays, samples.jsonl), `report` (tools/routing_report.py), `compare` (tools/compare_runs.py).
"""

from upgrpo_megatron.diagnostics.ratio_stats import (  # noqa: F401
    RatioStats,
    compute_prob_gap,
    compute_ratio_stats,
    log_ratio_histogram,
)
from upgrpo_megatron.diagnostics.routing_stats import (  # noqa: F401
    CaptureValidityError,
    RoutingMismatch,
    check_capture_validity,
    compute_expert_load,
    compute_routing_mismatch,
    require_valid_capture,
    router_margin,
)
from upgrpo_megatron.diagnostics.step import StepDiagnostics, step_diagnostics, update_diagnostics  # noqa: F401
from upgrpo_megatron.diagnostics.storage import (  # noqa: F401
    DiagnosticsReader,
    DiagnosticsWriter,
    append_samples,
    read_diagnostics,
)
