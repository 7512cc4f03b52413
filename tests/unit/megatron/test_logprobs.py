"""log-prob / entropy from (vocab-parallel) logits vs a plain log_softmax reference, values and gradients."""
import torch

from upgrpo_megatron.megatron.logprobs import sequence_log_probs, vocab_parallel_log_prob_entropy


def _reference(logits, target):
    logp = torch.log_softmax(logits.double(), dim=-1)
    lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def test_log_prob_and_entropy_match_log_softmax_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 7, 50, generator=g)).requires_grad_()
    target = torch.randint(0, 50, (3, 7), generator=g)
    w1, w2 = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)

    lp, ent = vocab_parallel_log_prob_entropy(logits, target, group=None, world=1, rank=0)
    (lp * w1 + ent * w2).sum().backward()
    grad = logits.grad.clone()

    ref_logits = logits.detach().double().requires_grad_()
    rlp, rent = _reference(ref_logits, target)
    (rlp * w1.double() + rent * w2.double()).sum().backward()

    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_logits.grad, rtol=1e-4, atol=1e-6)


def test_sequence_log_probs_scores_the_next_token():
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    lp, ent = sequence_log_probs(logits, ids, group=None, world=1, rank=0)
    assert lp.shape == ent.shape == (2, 4)
    expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(lp, expected, rtol=1e-5, atol=1e-6)
