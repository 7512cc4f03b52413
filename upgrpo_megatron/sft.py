"""The supervised warm-up before RL: (prompt, answer) pairs of the training set, token-mean NLL.

It gives RL a policy that is right sometimes (accuracy above 0, below the ceiling), so that groups of samples
have mixed rewards and group-relative advantages carry signal.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from upgrpo_megatron.distributed import DataParallel, global_sum


def sft_batch(rows, tokenizer) -> dict:
    """Actor tensors for (prompt, answer + eos) rows: the response is the answer and its end token."""
    from upgrpo_megatron.rollout.batch import pad_right

    eos = tokenizer.eos_token_id
    seqs = [e.prompt_ids + e.answer_ids + [eos] for e in rows]
    resp_len = max(len(e.answer_ids) + 1 for e in rows)
    mask = torch.zeros(len(rows), resp_len)
    for i, e in enumerate(rows):
        mask[i, : len(e.answer_ids) + 1] = 1
    return {"input_ids": pad_right(seqs, tokenizer.pad_token_id),
            "prompt_lens": torch.tensor([len(e.prompt_ids) for e in rows]), "response_mask": mask}


def sft_warmup(cfg, actor, task, dp: DataParallel, *, log: Optional[Callable[[int, dict], None]],
               stop_requested: Callable[[], bool], show_progress: bool) -> bool:
    """Run `sft_warmup.steps` updates; returns True when done (False: stopped by a signal first)."""
    from upgrpo_megatron.megatron.actor import split_micro_batches
    from upgrpo_megatron.progress import progress

    s = cfg.sft_warmup
    actor.set_lr(s.lr)  # its own constant rate; the RL schedule (warm-up, decay) counts RL steps only
    rng = np.random.default_rng(cfg.trainer.seed)
    examples = task.sft_examples()
    for it in progress(range(s.steps), desc="SFT warm-up", enabled=show_progress):
        if stop_requested():
            return False
        rows = rng.choice(len(examples), size=s.batch_size, replace=len(examples) < s.batch_size)
        rows = [examples[i] for i in rows][dp.rank :: dp.size]
        batch = sft_batch(rows, task.tokenizer)
        total = global_sum(batch["response_mask"].sum(), dp.group)

        def loss_fn(mb, lp, ent, total=total):
            loss = -(lp * mb["response_mask"]).sum() / total
            return loss, {"sft/loss": loss.item() * total / mb["response_mask"].sum().clamp(min=1).item()}

        m = actor.train_step(split_micro_batches(batch, torch.arange(len(rows)), cfg.actor.micro_batch_size), loss_fn)
        if log is not None and (it % 10 == 0 or it == s.steps - 1):
            log(it, {"sft/loss": m.get("sft/loss"), "sft/grad_norm": m["actor/grad_norm"]})
    return True
