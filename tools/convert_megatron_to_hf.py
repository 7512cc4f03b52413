"""Export a Megatron checkpoint (from training at any TP/EP layout, or from convert_hf_to_megatron) as a
Hugging Face directory loadable by transformers and vLLM.

    python tools/convert_megatron_to_hf.py --checkpoint CKPT_DIR --out HF_DIR [--force]

CKPT_DIR is one checkpoint (`.../checkpoints/step_000060`) or a run's `checkpoints/` directory (its newest
complete checkpoint is used). A training checkpoint's optimizer state is ignored. Writes config.json,
generation_config.json, safetensors (sharded with model.safetensors.index.json above --max-shard-gb) and the
tokenizer files the checkpoint carries, with the tokenizer's bos/eos/pad ids in both configs (as in the
trainer's own export). Runs as one process; memory holds one batch of tensors, not the model. Never writes into
a non-empty --out without --force, nor into or around the checkpoint; a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def check_arguments(a) -> None:
    """Everything about the arguments that can be checked before megatron loads: sizes, the checkpoint's
    files (kind, readable, UTF-8 text), and an --out that neither is, contains nor lies inside the input."""
    from upgrpo_megatron.paths import check_input_files, refuse_overlap, require_output_dir, require_positive

    require_positive(a.max_shard_gb, "--max-shard-gb")
    require_positive(a.batch_mb, "--batch-mb")
    check_input_files(a.checkpoint, "--checkpoint", recursive=True)
    refuse_overlap(a.out, [("--checkpoint", a.checkpoint)])
    require_output_dir(a.out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory (or a run's checkpoints/)")
    ap.add_argument("--out", required=True, help="Hugging Face directory to create")
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    ap.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size (GiB)")
    ap.add_argument("--batch-mb", type=float, default=512.0, help="tensors read from the checkpoint at once (MiB)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    a = ap.parse_args(argv)

    from upgrpo_megatron.errors import exit_with_message, user_error_types

    try:
        check_arguments(a)
        from upgrpo_megatron.convert.megatron_io import convert_megatron_to_hf

        out = convert_megatron_to_hf(a.checkpoint, a.out, force=a.force, max_shard_bytes=int(a.max_shard_gb * 1024**3),
                                     batch_bytes=int(a.batch_mb * 1024**2), show_progress=not a.no_progress)
        print(f"wrote {out}")
        return 0
    except user_error_types() as e:
        return exit_with_message(e, debug=a.debug)
    finally:
        if "upgrpo_megatron.megatron.parallel" in sys.modules:  # else no process group was made (and no import)
            sys.modules["upgrpo_megatron.megatron.parallel"].destroy()


if __name__ == "__main__":
    sys.exit(main())
