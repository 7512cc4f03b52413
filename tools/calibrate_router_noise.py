"""How much routing mismatch does `rollout.router_noise` cause? Measured with the real engine and trainer.

    python tools/calibrate_router_noise.py recipes/qwen_moe.yaml --sigmas 0 0.01 0.03 0.1 0.3 [key=value ...]

Builds the recipe's trainer in a scratch run directory (SFT warm-up, or `trainer.init_from=CKPT` to start
from trained weights), starts one engine, and for each sigma measures one step's batch: pair mismatch, tokens
with a mismatched layer, |log-prob gap| and the variance of w = pi_trainer / pi_rollout by sign(A). Writes
`calibration.md`, `calibration.json` and the tensors behind each row into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.1, 0.3])
    ap.add_argument("--out", default="runs/router_noise_calibration")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    a = ap.parse_intermixed_args(argv)

    from upgrpo_megatron.errors import exit_with_message, user_error_types

    try:
        from upgrpo_megatron.calibrate import calibrate, format_table
        from upgrpo_megatron.config import ConfigError, load_recipe
        from upgrpo_megatron.paths import require_output_dir

        if any(s < 0 for s in a.sigmas):
            raise ConfigError(f"--sigmas {a.sigmas}: noise levels must be >= 0")
        out = require_output_dir(a.out)
        scratch = tempfile.mkdtemp(prefix="calibrate_")
        cfg = load_recipe(a.recipe, [*a.overrides, f"trainer.run_dir={scratch}", "trainer.report=false",
                                     "trainer.export_hf=false", "trainer.tensorboard=false"])
        from upgrpo_megatron.trainer import Trainer

        tr = Trainer(cfg)
        try:
            if not tr.sft_done:
                from upgrpo_megatron.sft import sft_warmup

                sft_warmup(cfg, tr.actor, tr.task, tr.dp, log=None, stop_requested=lambda: False,
                           show_progress=True)
            tr.start_rollout()
            rows = calibrate(tr, a.sigmas, out)
        finally:
            tr.rollout.shutdown()
        table = format_table(rows)
        (out / "calibration.md").write_text(f"recipe: {a.recipe} {' '.join(a.overrides)}\n\n{table}\n")
        (out / "calibration.json").write_text(json.dumps(rows, indent=1))
        print(table)
        print(f"written to {out}")
        return 0
    except user_error_types() as e:
        return exit_with_message(e, debug=a.debug)


if __name__ == "__main__":
    sys.exit(main())
