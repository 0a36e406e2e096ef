"""
What every test file shares: the float32 tolerance rule.

float32 results depend on summation order, and the order depends on the CPU's kernels (AVX2,
AVX-512, with or without bf16) and on a batch's shape. So a float32 result is never compared with a
tolerance picked until it passed. It is compared with an independent float64 computation, within a
bound derived from the float32 unit roundoff u = 2^-24, or with another float32 computation that
runs the very same kernels on the very same input (then they agree exactly, and the test says so).

The bound for response log-probabilities, the quantity nearly every DPO number is made of:
  - one token: log_softmax(z)_t = z_t - logsumexp(z), so an error in the logits z passes into the
    log-prob at most twice; a float32 forward pass computes z with an absolute error that grows with
    the logits' scale. TOKEN_ULPS * u * (1 + max|z|) per token, TOKEN_ULPS = 64: measured at most
    11 u max|z| (GPTs of 2-4 layers, width 16-128, vocabulary 37-257, logits up to 6; default, AVX2
    and AVX-512 kernels), so the bound holds with a margin of about 6x. test_model.py checks this rule
    itself on every kernel family, so a CPU that broke it would fail there, by name, not at random.
  - a sum of n of them: the n token errors add, and float32 summation adds at most (n - 1) u sum|x|.
A loss that is 1-Lipschitz in its argument (-log sigmoid) passes the bound on h through unchanged.
"""
import copy

import torch

U32 = 2.0 ** -24  # float32 unit roundoff
TOKEN_ULPS = 64   # the per-token bound, in units of u * (1 + max|logit|)


@torch.no_grad()
def float64_logps(model, ids, mask):
    """The literal definition of the response log-probs (full logits, shift, log_softmax, gather),
    on a float64 copy of `model`. -> (per-row sums (B,), per-row bounds (B,), max |logit|, the
    token log-probs (B, T-1), 0 where not scored): each row's bound is what its float32 sum may
    differ from the sum here (the module docstring's rule)."""
    m = copy.deepcopy(model).double().eval()
    logits = m(ids)[:, :-1]                                                     # (B, T-1, V)
    tok = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None])[..., 0]     # (B, T-1)
    scored = mask[:, 1:]
    tok = torch.where(scored, tok, 0.0)
    zmax = logits.abs().max().item()
    n = scored.sum(1).double()
    bound = n * TOKEN_ULPS * U32 * (1 + zmax) + (n - 1).clamp(min=0) * U32 * tok.abs().sum(1)
    return tok.sum(1), bound, zmax, tok


def token_bound(zmax):
    """The rule's bound on one float32 token log-prob, for logits of scale zmax."""
    return TOKEN_ULPS * U32 * (1 + zmax)
