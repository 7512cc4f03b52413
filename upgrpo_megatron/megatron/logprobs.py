"""Per-token log-probabilities and entropies from vocab-parallel (TP-sharded) logits.

Each TP rank holds logits for a contiguous slice of the vocabulary, `[..., vocab / tp]`. The full
vocabulary is never gathered on one rank: the softmax normaliser is assembled from two all-reduces
(max, then sum of exponentials) and the target logit from a third, as in megatron's vocab-parallel cross
entropy. The backward pass needs no communication: with p = softmax(logits),

    d log p[target] / d logits_j = 1[j = target] - p_j                    (log-softmax gradient)
    d H / d logits_j            = -p_j * (log p_j + H)                    (H = -sum_j p_j log p_j)

and both are computed from the local slice alone. At TP=1 the same code runs with no collectives.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist


def _tp_group():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None, 1, 0
    return (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_rank())


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    # Memory/time: two vocab-sized fp32 tensors are kept for backward (probabilities and shifted logits);
    # everything else is reduced to per-token scalars. Gradients that nobody asked for are not computed
    # (`set_materialize_grads(False)`): a loss that uses only the log-prob pays nothing for the entropy.
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group, world: int, rank: int):
        ctx.set_materialize_grads(False)
        vocab_local = logits.shape[-1]
        start = rank * vocab_local
        # softmax normaliser across the TP group: max, then sum of exp
        local_max = logits.detach().amax(dim=-1).float()
        if world > 1:
            dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits.float() - local_max.unsqueeze(-1)
        probs = shifted.exp()
        sum_exp = probs.sum(dim=-1)
        # sum_j exp_j * shifted_j, for the entropy H = log Z - E_p[shifted]
        # (a batched matmul: vecdot would materialise the vocab-sized product)
        exp_dot = torch.matmul(probs.unsqueeze(-2), shifted.unsqueeze(-1)).squeeze(-1).squeeze(-1)
        # target logit: only the rank that owns the token id contributes
        local_target = target - start
        owned = (local_target >= 0) & (local_target < vocab_local)
        idx = local_target.clamp(0, vocab_local - 1).unsqueeze(-1)
        target_shifted = shifted.gather(-1, idx).squeeze(-1) * owned
        if world > 1:
            packed = torch.stack([sum_exp, exp_dot, target_shifted])
            dist.all_reduce(packed, group=group)
            sum_exp, exp_dot, target_shifted = packed[0], packed[1], packed[2]
        log_z = sum_exp.log()  # log-normaliser of the shifted logits
        probs.div_(sum_exp.unsqueeze(-1))
        log_prob = target_shifted - log_z
        entropy = log_z - exp_dot / sum_exp
        ctx.save_for_backward(probs, shifted, log_z, entropy, idx, owned)
        ctx.input_dtype = logits.dtype
        return log_prob, entropy

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy):
        probs, shifted, log_z, entropy, idx, owned = ctx.saved_tensors
        # An output that the loss does not use arrives as None, or as zeros when it went through a stack/cat
        # (the model returns log-prob and entropy stacked): skip its vocab-sized term either way.
        if grad_log_prob is not None and not grad_log_prob.any():
            grad_log_prob = None
        if grad_entropy is not None and not grad_entropy.any():
            grad_entropy = None
        grad = None
        if grad_log_prob is not None:
            # d log p[target] / d logits_j = 1[j=target] - p_j
            grad = probs * (-grad_log_prob.unsqueeze(-1))
            grad.scatter_add_(-1, idx, (grad_log_prob * owned).unsqueeze(-1))
        if grad_entropy is not None:
            # d H / d logits_j = -p_j (log p_j + H), with log p_j = shifted_j - log Z
            coef = (entropy - log_z).unsqueeze(-1)
            g_ent = probs * (shifted + coef) * (-grad_entropy.unsqueeze(-1))
            grad = g_ent if grad is None else grad.add_(g_ent)
        if grad is not None and grad.dtype != ctx.input_dtype:
            grad = grad.to(ctx.input_dtype)
        return grad, None, None, None, None


def vocab_parallel_log_prob_entropy(
    logits: torch.Tensor, target: torch.Tensor, group=None, world: Optional[int] = None, rank: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `target` and entropy of the full-vocabulary distribution.

    Args:
        logits: `[..., vocab / tp]` this rank's vocabulary slice (any float dtype; computed in fp32).
        target: `[...]` int64 token ids in the full vocabulary.
        group/world/rank: the TP group (default: megatron's tensor-model-parallel group, or none).
    Returns:
        (log_prob `[...]` fp32, entropy `[...]` fp32), both differentiable w.r.t. `logits`.
    """
    if world is None:
        group, world, rank = _tp_group()
    return _VocabParallelLogProbEntropy.apply(logits, target, group, world, rank)


def sequence_log_probs(
    logits: torch.Tensor, input_ids: torch.Tensor, **tp: object
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next token of a batch of sequences.

    Args:
        logits: `[batch, seq, vocab / tp]` from the model over `input_ids`.
        input_ids: `[batch, seq]`.
    Returns:
        (log_prob, entropy), each `[batch, seq - 1]`: position i scores token i+1 given tokens 0..i.
    """
    return vocab_parallel_log_prob_entropy(logits[:, :-1], input_ids[:, 1:], **tp)
