"""The reference policy: a frozen copy of the actor's weights at the start of RL (after the SFT warm-up, or the
weights RL starts from), in the actor's parallel layout. It scores the step's responses once per step; the KL
between the actor and it is logged every step (the curve UP-GRPO's post plots) and, with
`algorithm.kl_loss_coef > 0`, added to the loss.

It is a second megatron GPTModel without DDP, optimizer or router-replay hooks (so the actor's RECORD/REPLAY
instances are untouched); memory: one more copy of the local parameters. It is saved once, as
`RUN_DIR/reference/` (dist_checkpointing, loadable at another layout), and loaded on resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from megatron.core import dist_checkpointing

from upgrpo_megatron.distributed import barrier, rank
from upgrpo_megatron.megatron.actor import pad_sequence_dim, score_responses
from upgrpo_megatron.megatron.micro_batches import micro_batches
from upgrpo_megatron.megatron.model import build_gpt_model, build_transformer_config


class ReferencePolicy:
    def __init__(self, model_cfg, *, tp=1, ep=1, etp=1, sequence_parallel=False, dtype="fp32", temperature=1.0):
        config = build_transformer_config(model_cfg, tp=tp, ep=ep, etp=etp, sequence_parallel=sequence_parallel,
                                          dtype=dtype, router_replay=False)
        config.perform_initialization = False  # every weight is copied from the actor or loaded
        self.module = build_gpt_model(model_cfg, config=config)
        self.module.requires_grad_(False)
        self.module.eval()
        self.module.logit_temperature = float(temperature)
        self.split = tp if sequence_parallel else 1

    @torch.no_grad()
    def copy_from(self, actor_module) -> None:
        """Take the actor's current local shards (same layout, so parameter names and shapes match)."""
        ref = dict(self.module.named_parameters())
        for name, p in actor_module.named_parameters():
            ref[name].copy_(p.detach())

    @torch.no_grad()
    def log_prob(self, batch: Dict[str, torch.Tensor], micro_batch_size: int, max_tokens: int = 0) -> torch.Tensor:
        """`[batch, response_len]` log-prob of every response token under the reference policy (micro-batched as
        the actor's pi_old pass: `micro_batches.plan`). Collective when the job has several ranks."""
        out = torch.zeros(batch["response_mask"].shape, device=batch["response_mask"].device)
        for rows, mb in micro_batches(batch, micro_batch_size, max_tokens):
            ids = pad_sequence_dim(mb["input_ids"], self.split)
            lp = score_responses(self.module, ids, mb["prompt_lens"], out.shape[1])[0]
            real = rows >= 0
            out[rows[real]] = lp[real].to(out.device, out.dtype)
        return out

    def save(self, path: Path) -> None:
        """Collective. Written into a temporary directory and renamed, so a crash leaves no half copy."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        if rank() == 0:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        from upgrpo_megatron.megatron.checkpoint import results_queue_dies_with_us

        results_queue_dies_with_us()
        dist_checkpointing.save(self.module.sharded_state_dict(), str(tmp))
        barrier()
        if rank() == 0:
            (tmp / "COMPLETE").write_text("reference policy\n")
            tmp.rename(path)
        barrier()

    def load(self, path: Path) -> None:
        state = dist_checkpointing.load(self.module.sharded_state_dict(), str(path))
        self.module.load_state_dict(state)


def reference_is_saved(path: Path) -> bool:
    return (Path(path) / "COMPLETE").exists()
