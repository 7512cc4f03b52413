"""Convert a Hugging Face Qwen3-MoE / Qwen2-MoE directory into a Megatron `dist_checkpointing` checkpoint.

    python tools/convert_hf_to_megatron.py --hf HF_DIR --out CKPT_DIR [--tp N] [--ep M] [--force]
    torchrun --nproc_per_node=N*M tools/convert_hf_to_megatron.py --hf HF_DIR --out CKPT_DIR --tp N --ep M

The checkpoint loads at any TP/EP layout (the format is layout-free); --tp/--ep are checked against the model
(heads, query groups, vocabulary, experts must divide) and, under torchrun, are the layout the ranks build
and write in parallel. The input is checked completely before anything is written: config.json fields, and
every tensor's name and shape from the safetensors headers. Bad input ends with one line naming the problem
and exit status 2, and nothing is written; an --out that is, contains or lies inside --hf is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def check_arguments(a) -> None:
    """Everything about the arguments that can be checked before megatron loads: sizes, the HF directory's
    files (kind, readable, UTF-8 text), and an --out that neither is, contains nor lies inside the input."""
    from upgrpo_megatron.paths import check_input_files, refuse_overlap, require_output_dir, require_positive

    require_positive(a.tp, "--tp")
    require_positive(a.ep, "--ep")
    check_input_files(a.hf, "--hf", required=["config.json"])
    refuse_overlap(a.out, [("--hf", a.hf)])
    require_output_dir(a.out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="checkpoint directory to create")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint is meant for")
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel size the checkpoint is meant for")
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    a = ap.parse_args(argv)

    from upgrpo_megatron.errors import exit_with_message, user_error_types

    try:
        check_arguments(a)
        from upgrpo_megatron.convert.megatron_io import convert_hf_to_megatron

        out = convert_hf_to_megatron(a.hf, a.out, tp=a.tp, ep=a.ep, force=a.force, show_progress=not a.no_progress)
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"wrote {out}")
        return 0
    except user_error_types() as e:
        return exit_with_message(e, debug=a.debug)
    finally:
        if "upgrpo_megatron.megatron.parallel" in sys.modules:  # else no process group was made (and no import)
            sys.modules["upgrpo_megatron.megatron.parallel"].destroy()


if __name__ == "__main__":  # dist_checkpointing.save starts a spawned helper process: keep the guard
    sys.exit(main())
