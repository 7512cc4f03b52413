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


def test_a_tokens_routing_and_its_log_prob_come_from_the_same_position_at_mixed_prompt_lengths():
    from upgrpo_megatron.megatron.actor import score_responses, scoring_routing

    B, S, R, L, K = 3, 9, 4, 2, 2
    prompt_lens = torch.tensor([2, 5, 3])

    class Model(torch.nn.Module):  # "log-prob" and "entropy" of every position = the position itself
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))  # where the model lives: the ids are moved there

        def forward(self, ids, pos, mask, labels):
            return torch.stack([pos.float(), pos.float()], dim=-1)

    model = Model()

    lp, _ = score_responses(model, torch.zeros(B, S, dtype=torch.long), prompt_lens, R)
    assert lp[0].tolist() == [1.0, 2.0, 3.0, 4.0]  # token t of a 2-token prompt: scored at position 1 + t
    routing_full = torch.arange(S).view(1, S, 1, 1).expand(B, S, L, K)  # every position routed to "itself"
    routing = scoring_routing(routing_full, prompt_lens, R)
    assert routing.shape == (B, R, L, K)
    assert torch.equal(routing[..., 0, 0].float(), lp)  # same position, every row, every token
