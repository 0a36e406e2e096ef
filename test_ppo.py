"""
Tests of ppo.py: per-token rewards, GAE, the clipped policy and value losses, GRPO's and RLOO's group
advantages and the k3 KL estimator, the reward model's loss and the helpers. Every expected number is worked out by hand in the test's docstring and written as a literal.
Run: python -m pytest -q test_ppo.py
"""
import math

import pytest
import torch

from ppo import (AdaptiveKLController, bradley_terry_loss, entropy_from_logits, explained_variance, gae,
                 group_advantages, k3_kl, masked_mean, masked_whiten, per_token_rewards, policy_loss, value_loss)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def m(*rows):
    return torch.tensor(rows, dtype=torch.bool)


def close(a, b, tol=1e-6):
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=tol, rtol=0)


# ------------------------------------------------------------------------------------------------
# rewards and advantages

def test_per_token_rewards_worked_case():
    """kl_coef 0.1. Row 0 (3 tokens, score 2.0): kl = [-1-(-1.5), -2-(-1), -0.5-(-0.5)] = [0.5, -1, 0],
    rewards = -0.1*kl + score at the last token = [-0.05, 0.1, 0 + 2.0].
    Row 1 (2 tokens + pad, score -1.0): kl = [-0.2-(-1.2), -3-(-2.5)] = [1, -0.5], pad 0;
    rewards = [-0.1, 0.05 - 1.0, 0] = [-0.1, -0.95, 0]: the score lands on column 1, not on the pad."""
    logprobs = t([-1.0, -2.0, -0.5], [-0.2, -3.0, -9.0])
    ref = t([-1.5, -1.0, -0.5], [-1.2, -2.5, -1.0])
    mask = m([1, 1, 1], [1, 1, 0])
    rewards, kl = per_token_rewards(logprobs, ref, mask, t(2.0, -1.0), kl_coef=0.1)
    assert close(kl, [[0.5, -1.0, 0.0], [1.0, -0.5, 0.0]])
    assert close(rewards, [[-0.05, 0.1, 2.0], [-0.1, -0.95, 0.0]])


# GAE example: gamma 0.9, lam 0.5 (gamma*lam 0.45). Row 1 has length 2; its pad column holds garbage.
REWARDS = t([1.0, 0.0, 2.0], [1.0, 3.0, 7.0])
VALUES = t([0.5, 1.0, 1.5], [2.0, 1.0, 5.0])
MASK = m([1, 1, 1], [1, 1, 0])


def test_gae_worked_case():
    """gamma 0.9, lam 0.5, so gamma*lam = 0.45.
    Row 0: delta_2 = 2 + 0.9*0 - 1.5 = 0.5 (terminal: V = 0 after the last token)
           delta_1 = 0 + 0.9*1.5 - 1.0 = 0.35,  delta_0 = 1 + 0.9*1.0 - 0.5 = 1.4
           A_2 = 0.5, A_1 = 0.35 + 0.45*0.5 = 0.575, A_0 = 1.4 + 0.45*0.575 = 1.65875
           returns = A + V = [2.15875, 1.575, 2.0]
    Row 1 (length 2): delta_1 = 3 + 0.9*0 - 1 = 2 (the pad's V = 5 must not enter: that would give 6.5),
           delta_0 = 1 + 0.9*1 - 2 = -0.1; A_1 = 2, A_0 = -0.1 + 0.45*2 = 0.8; returns [2.8, 3.0]; pad 0."""
    adv, ret = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.5)
    assert close(adv, [[1.65875, 0.575, 0.5], [0.8, 2.0, 0.0]])
    assert close(ret, [[2.15875, 1.575, 2.0], [2.8, 3.0, 0.0]])


def test_gae_lambda_one_is_monte_carlo_minus_value():
    """lam = 1: A_t = sum_l 0.9^l r_{t+l} - V_t.
    Row 0: G_2 = 2, G_1 = 0 + 0.9*2 = 1.8, G_0 = 1 + 0.9*1.8 = 2.62; A = [2.62-0.5, 1.8-1, 2-1.5] = [2.12, 0.8, 0.5]
    and the returns are G itself. Row 1: G_1 = 3, G_0 = 1 + 0.9*3 = 3.7; A = [3.7-2, 3-1] = [1.7, 2.0]."""
    adv, ret = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=1.0)
    assert close(adv, [[2.12, 0.8, 0.5], [1.7, 2.0, 0.0]])
    assert close(ret, [[2.62, 1.8, 2.0], [3.7, 3.0, 0.0]])


def test_gae_lambda_zero_is_one_step_td_error():
    """lam = 0: A_t = delta_t, the deltas of test_gae_worked_case: row 0 [1.4, 0.35, 0.5], row 1 [-0.1, 2.0];
    returns = delta + V = r_t + 0.9*V_{t+1}: row 0 [1.9, 1.35, 2.0], row 1 [1.9, 3.0]."""
    adv, ret = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.0)
    assert close(adv, [[1.4, 0.35, 0.5], [-0.1, 2.0, 0.0]])
    assert close(ret, [[1.9, 1.35, 2.0], [1.9, 3.0, 0.0]])


def test_undiscounted_return_is_the_kl_regularised_objective():
    """Derivation (1): with gamma = lam = 1 the return at t = 0 is r(x,y) - beta*sum_t k_t, whatever the values.
    Rows of test_per_token_rewards_worked_case: row 0: 2.0 - 0.1*(0.5 - 1 + 0) = 2.05;
    row 1: -1.0 - 0.1*(1 - 0.5) = -1.05."""
    logprobs = t([-1.0, -2.0, -0.5], [-0.2, -3.0, -9.0])
    ref = t([-1.5, -1.0, -0.5], [-1.2, -2.5, -1.0])
    mask = m([1, 1, 1], [1, 1, 0])
    rewards, _ = per_token_rewards(logprobs, ref, mask, t(2.0, -1.0), kl_coef=0.1)
    _, ret = gae(rewards, t([3.0, -4.0, 0.7], [0.1, 9.0, 5.0]), mask, gamma=1.0, lam=1.0)
    assert close(ret[:, 0], [2.05, -1.05])


# ------------------------------------------------------------------------------------------------
# the clipped losses

def _ppo_case():
    """ratios [0.5, 1, 1.5] with A = +2 (row 0) and A = -1 (row 1); a pad column with ratio e^3 and A = +2."""
    log_ratio = t([math.log(0.5), 0.0, math.log(1.5), 3.0], [math.log(0.5), 0.0, math.log(1.5), 3.0])
    logprobs = log_ratio.clone().requires_grad_(True)
    adv = t([2.0, 2.0, 2.0, 2.0], [-1.0, -1.0, -1.0, -1.0])
    return logprobs, torch.zeros_like(log_ratio), adv, m([1, 1, 1, 0], [1, 1, 1, 0])


def test_policy_loss_worked_case():
    """clip 0.2, so clip(rho) is in [0.8, 1.2]; per-token loss max(-A*rho, -A*clip(rho)):
      A = +2: rho 0.5: max(-1, -1.6) = -1;    rho 1: max(-2, -2) = -2;    rho 1.5: max(-3, -2.4) = -2.4 (clipped)
      A = -1: rho 0.5: max(0.5, 0.8) = 0.8 (clipped);  rho 1: 1;           rho 1.5: max(1.5, 1.2) = 1.5
    mean over the 6 real tokens: (-1 - 2 - 2.4 + 0.8 + 1 + 1.5)/6 = -2.1/6 = -0.35.
    clip_fraction: 2 of 6 (rho 1.5 with A > 0, rho 0.5 with A < 0) = 1/3; the pad (rho e^3, A > 0, clipped) is out.
    approx_kl: (rho - 1) - log rho = -0.5 + ln 2 (rho 0.5), 0 (rho 1), 0.5 - ln 1.5 (rho 1.5), each twice:
    2*(ln 2 - ln 1.5)/6 = ln(4/3)/3 = 0.28768207/3 = 0.09589402. (Here the (rho - 1) terms cancel, so a k1
    estimator -log rho would give the same; a lone token with rho = 2 tells them apart: k3 = 1 - ln 2 = 0.30685282,
    k1 = -ln 2 < 0.)"""
    logprobs, old, adv, mask = _ppo_case()
    loss, stats = policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-0.35)
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)
    assert stats["approx_kl"].item() == pytest.approx(0.09589402, abs=1e-8)
    _, stats = policy_loss(t([math.log(2.0)]), t([0.0]), t([1.0]), m([1]), clip_range=0.2)
    assert stats["approx_kl"].item() == pytest.approx(0.30685282, abs=1e-8)


def test_policy_loss_gradient_vanishes_exactly_on_clipped_tokens():
    """d(-A*rho)/d logprob = -A*rho (d rho/d logprob = rho), divided by 6 for the mean. Unclipped tokens:
    A = +2: rho 0.5 -> -1/6, rho 1 -> -2/6; A = -1: rho 1 -> 1/6, rho 1.5 -> 1.5/6.
    The clipped term is a constant, so rho 1.5 with A = +2 and rho 0.5 with A = -1 get 0, and so does the pad."""
    logprobs, old, adv, mask = _ppo_case()
    loss, _ = policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    loss.backward()
    assert close(logprobs.grad, [[-1 / 6, -2 / 6, 0.0, 0.0], [0.0, 1 / 6, 1.5 / 6, 0.0]], tol=1e-12)


# ------------------------------------------------------------------------------------------------
# critic-free: GRPO and RLOO (ppo.py's (5))

def test_group_advantages_by_hand():
    """One group of G = 4 scores 1, 2, 3, 6: mean 3, deviations -2, -1, 0, 3.
    RLOO: each minus the mean of the other three: 1 - 11/3 = -8/3, 2 - 10/3 = -4/3, 3 - 9/3 = 0,
    6 - 6/3 = 4 (= 4/3 x the deviations; they sum to 0). A baseline that included the response
    itself (the plain mean) would give -2, -1, 0, 3.
    GRPO: deviations over the sample std sqrt((4 + 1 + 0 + 9)/3) = sqrt(14/3) = 2.1602469:
    -0.9258201, -0.4629100, 0, 1.3887301. The population std (/4) would give -1.0690450 first.
    A second group, all 5s, has no signal: 0 for both methods (no 0/0)."""
    scores = t([1, 2, 3, 6], [5, 5, 5, 5])
    assert close(group_advantages(scores, "rloo"), [[-8 / 3, -4 / 3, 0, 4], [0, 0, 0, 0]], 1e-12)
    assert close(group_advantages(scores, "grpo"), [[-0.9258201, -0.4629100, 0, 1.3887301], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(t([1.0]), "grpo")


def test_grpo_advantages_of_a_tied_float32_group_are_exactly_zero():
    """Four float32 scores of 1.3: their float32 mean is 1.3 up to rounding, so score - mean and the
    std would both be rounding noise, and their ratio anything of order 1. The tie is tested on the
    scores themselves: exactly 0. A group whose last score is one ulp higher is not tied: as any
    three equal scores and a fourth above them, its z-scores are -0.5, -0.5, -0.5, 1.5 (deviations
    -d/4 x 3 and 3d/4, sample std sqrt((3/16 + 9/16) d^2 / 3) = d/2), which float32 arithmetic would
    miss (its mean rounds to 1.3: 0, 0, 0, 1.73); the float64 computation gets them."""
    tied = torch.full((1, 4), 1.3)
    assert group_advantages(tied, "grpo").tolist() == [[0.0] * 4]
    one_apart = torch.tensor([[1.3, 1.3, 1.3, torch.nextafter(torch.tensor(1.3), torch.tensor(2.0)).item()]])
    a = group_advantages(one_apart, "grpo")
    assert a.dtype == torch.float32 and close(a.double(), [[-0.5, -0.5, -0.5, 1.5]])


def test_k3_estimator_by_enumeration():
    """On p = (0.5, 0.3, 0.2) (the policy, tokens drawn from it) and q = (0.2, 0.5, 0.3) (the
    reference), k3(y) = q/p - log(q/p) - 1 has mean sum_y p (q/p - 1) + sum_y p log(p/q)
    = (1 - 1) + KL(p||q) = 0.5 ln 2.5 + 0.3 ln 0.6 + 0.2 ln(2/3) = 0.4581454 - 0.1532477 - 0.0810930
    = 0.2238047 (forward KL), and every
    term is >= 0 (x - 1 - log x >= 0), even at a ratio of 1e-4 or 1e4.
    Its gradient is not the forward KL's. With p = softmax(theta), differentiating k3 through log p
    with the samples held fixed gives (1 - q/p) grad log p, whose mean under p is
    -sum_y q grad log p = grad KL(q||p). By hand, d/dtheta of KL(q||softmax(theta)) is p - q =
    (0.3, -0.2, -0.1), and of the forward KL(p||q) it is p_i (log(p_i/q_i) - KL(p||q)) =
    (0.3462432, -0.2203891, -0.1258541): the pathwise k3 gradient is the first."""
    p, q = t(0.5, 0.3, 0.2), t(0.2, 0.5, 0.3)
    per_y = k3_kl(p.log(), q.log())
    assert abs((p * per_y).sum().item() - 0.2238047) < 1e-7 and (per_y >= 0).all()
    assert (k3_kl(t(0.0, 0.0), t(math.log(1e-4), math.log(1e4))) >= 0).all()
    theta = p.log().clone().requires_grad_(True)
    logp = torch.log_softmax(theta, 0)
    (p * k3_kl(logp, q.log())).sum().backward()  # p: the sampling weights, held fixed
    pathwise = theta.grad.clone()
    reverse = torch.autograd.grad((q * (q.log() - torch.log_softmax(theta, 0))).sum(), theta)[0]
    forward = torch.autograd.grad((torch.softmax(theta, 0) * (torch.log_softmax(theta, 0) - q.log())).sum(), theta)[0]
    assert close(pathwise, [0.3, -0.2, -0.1], 1e-12) and close(reverse, [0.3, -0.2, -0.1], 1e-12)
    assert close(forward, [0.3462432, -0.2203891, -0.1258541])


def test_critic_free_step_raises_the_better_response():
    """A group of two responses of a tiny model, scores 1 and 0: GRPO gives advantages +0.7071 and
    -0.7071 (deviations +-0.5 over the sample std 0.7071), RLOO +1 and -1. One small SGD step (lr 0.01) on PPO's
    clipped loss (ratio 1 at the first step, so no clipping) with either must raise log pi of the
    first response and lower the second's; a sign flipped in the advantages or in the loss fails."""
    from conftest import tiny_model
    from ppo import token_logps
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8, 9]])
    mask = torch.tensor([[False, False, True, True, True, True]] * 2)
    rmask = torch.ones(2, 4, dtype=torch.bool)
    for method, expected in (("grpo", [0.7071068, -0.7071068]), ("rloo", [1.0, -1.0])):
        adv = group_advantages(torch.tensor([[1.0, 0.0]]), method).view(-1)
        assert close(adv, expected)
        model = tiny_model(seed=4)
        before, _ = token_logps(model, ids, mask, rmask)
        loss, _ = policy_loss(before, before.detach(), adv[:, None] * rmask, rmask, 0.2)
        loss.backward()
        with torch.no_grad():
            for w in model.parameters():
                w -= 0.01 * w.grad
        after, _ = token_logps(model, ids, mask, rmask)
        change = (after - before).sum(1)
        assert change[0] > 0 > change[1], (method, change)


def test_value_loss_clipping_active_and_inactive():
    """Old value 1 for all three real tokens, clip c = 0.2 (v_clipped = old + clip(v - old, -0.2, 0.2)):
      a: v 1.1, R 2.0: |1.1-1| <= 0.2, v_clipped = 1.1, both errors 0.81 -> 0.81        (not clipped)
      b: v 1.5, R 2.0: v_clipped 1.2, errors 0.25 and 0.64 -> 0.64                       (clipped larger)
      c: v 1.5, R 1.0: v_clipped 1.2, errors 0.25 and 0.04 -> 0.25 (moving away is penalised in full)
    loss = 0.5*(0.81 + 0.64 + 0.25)/3 = 0.5*1.7/3 = 0.28333333; value_clip_fraction = 1/3.
    Gradient d/dv of 0.5*(v - R)^2/3 = (v - R)/3 for the unclipped terms: a (1.1-2)/3 = -0.3, b 0 (clipped),
    c (1.5-1)/3 = 1/6; the pad 0.
    With c = 10 nothing is clipped: 0.5*(0.81 + 0.25 + 0.25)/3 = 0.21833333, value_clip_fraction 0."""
    values = t([1.1, 1.5, 1.5, 40.0]).requires_grad_(True)
    old, returns, mask = t([1.0, 1.0, 1.0, 0.0]), t([2.0, 2.0, 1.0, -3.0]), m([1, 1, 1, 0])
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.28333333, abs=1e-8)
    assert stats["value_clip_fraction"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert close(values.grad, [[-0.3, 0.0, 1 / 6, 0.0]], tol=1e-12)
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=10.0)
    assert loss.item() == pytest.approx(0.21833333, abs=1e-8)
    assert stats["value_clip_fraction"].item() == 0.0


def test_value_clip_fraction_counts_only_clipped_tokens():
    """float32, old 0.017444674, v 0.1074607, R 0.125, c 0.2: |v - old| = 0.09 <= c, so nothing is clipped,
    but v - old rounds (the two differ by more than a factor 2) and old + (v - old) = 0.10746069 lands one
    ulp below v, further from R, and (close to R) the squared errors keep the difference: err_clipped > err
    by rounding alone. The token is not clipped: the count is 0, and it gets the full gradient
    d/dv 0.5 (v - R)^2 = v - R = -0.0175393 (a count of 1 would say it got none)."""
    v = torch.tensor([0.10746069997549057]).requires_grad_(True)
    old, ret, mask = torch.tensor([0.0174446739256382]), torch.tensor([0.125]), torch.ones(1, dtype=torch.bool)
    v_clipped = old + torch.clamp(v.detach() - old, -0.2, 0.2)
    assert ((v_clipped - ret) ** 2 > (v.detach() - ret) ** 2).item()  # the premise: rounding alone "clips"
    loss, stats = value_loss(v, old, ret, mask, clip_range_value=0.2)
    assert stats["value_clip_fraction"].item() == 0.0
    loss.backward()
    assert v.grad.item() == pytest.approx(0.10746069997549057 - 0.125, abs=1e-7)

# ------------------------------------------------------------------------------------------------
# reward model

def test_bradley_terry_loss_and_accuracy():
    """Margins r_w - r_l = [0 - 0, 3 - 1, 0.5 - 1.5, 2.5 - 2] = [0, 2, -1, 0.5]; loss -log sigmoid(d) = ln(1 + e^-d):
      0 -> ln 2 = 0.69314718;  2 -> ln(1 + e^-2) = ln 1.13533528 = 0.12692801;
     -1 -> ln(1 + e) = ln 3.71828183 = 1.31326169;  0.5 -> ln(1 + e^-0.5) = ln 1.60653066 = 0.47407698.
    Accuracy: right on margins 2 and 0.5, wrong on -1 and on the tie: 2/4 = 0.5 (a tie counted right would be 0.75)."""
    losses, acc = bradley_terry_loss(t(0.0, 3.0, 0.5, 2.5), t(0.0, 1.0, 1.5, 2.0))
    assert close(losses, [0.69314718, 0.12692801, 1.31326169, 0.47407698], tol=1e-8)
    assert acc == 0.5


# ------------------------------------------------------------------------------------------------
# helpers

def test_masked_mean_and_whiten():
    """Masked entries 1, 2, 3 (the rest is garbage): mean 2; along dim 1: row 0 (1+2)/2 = 1.5, row 1 3.
    Whiten: population var ((1-2)^2 + 0 + (3-2)^2)/3 = 2/3, so (x - 2)/sqrt(2/3) = (x - 2)*1.22474487:
    [-1.22474487, 0, 1.22474487], masked entries 0; then mean 0 and variance 1 (up to eps = 1e-8).
    shift_mean=False adds 2 back: [0.77525513, 2, 3.22474487], whose masked mean stays 2."""
    x, mask = t([1.0, 2.0, 50.0], [3.0, -7.0, 8.0]), m([1, 1, 0], [1, 0, 0])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert close(masked_mean(x, mask, dim=1), [1.5, 3.0])
    w = masked_whiten(x, mask)
    assert close(w, [[-1.22474487, 0.0, 0.0], [1.22474487, 0.0, 0.0]], tol=1e-7)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_mean(w ** 2, mask).item() == pytest.approx(1.0, abs=1e-7)
    s = masked_whiten(x, mask, shift_mean=False)
    assert close(s, [[0.77525513, 2.0, 0.0], [3.22474487, 0.0, 0.0]], tol=1e-7)
    assert masked_mean(s, mask).item() == pytest.approx(2.0)


def test_whiten_of_equal_entries_is_zero():
    """All 13 masked entries 123.4 (float32): x - mean is rounding noise (the float32 mean of 13 copies need
    not be 123.4 exactly), which 1/sqrt(var + 1e-8) = 1e4 would turn into values up to 0.15 here. Equal
    entries carry no signal: every whitened entry is exactly 0 (a group of responses that all earned the
    same reward gets no advantage). shift_mean=False gives back the mean."""
    x, mask = torch.full((3, 5), 123.4), torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    assert torch.equal(masked_whiten(x, mask), torch.zeros(3, 5))
    assert close(masked_whiten(x, mask, shift_mean=False)[mask], torch.full((13,), 123.4), tol=1e-4)


def test_entropy_from_logits():
    """Uniform over V = 5 (any constant logit, here 7): ln 5 = 1.60943791.
    Logits [ln 8, 0, 0]: p = [8, 1, 1]/10; H = -0.8 ln 0.8 - 2*0.1 ln 0.1 = 0.17851484 + 0.46051702 = 0.63903186.
    Logits [1000, 0, 0] (float32): p = [1, 0, 0] after underflow; H = lse - sum p*logits = 1000 - 1000 = 0,
    finite where -sum p log p would give 0 * -inf = nan. Shapes: (2, 3, V) -> (2, 3)."""
    assert entropy_from_logits(torch.full((2, 3, 5), 7.0)).shape == (2, 3)
    assert close(entropy_from_logits(torch.full((2, 3, 5), 7.0)), torch.full((2, 3), 1.60943791), tol=1e-6)
    assert entropy_from_logits(t([math.log(8.0), 0.0, 0.0])).item() == pytest.approx(0.63903186, abs=1e-8)
    assert entropy_from_logits(torch.tensor([1000.0, 0.0, 0.0])).item() == 0.0


def test_entropy_of_offset_logits_against_float64():
    """float32 logits randn*2 + 100 over V = 257: H does not depend on the offset, but lse ~ 105 and
    sum p*z ~ 100 each carry a rounding error of u*100 ~ 6e-6 and their difference keeps it (2.2e-5
    measured before the row max was subtracted). With z - max(z) (exact to u|z|, |z| <= 15) both terms
    are O(log V + max|z|), so |H32 - H64| <= 8 u (log V + max|z - max z|) ~ 1e-5; measured 4.5e-7."""
    torch.manual_seed(0)
    z = torch.randn(64, 257) * 2 + 100
    spread = (z - z.amax(-1, keepdim=True)).abs().max().item()
    bound = 8 * 2.0 ** -24 * (math.log(257) + spread)
    assert (entropy_from_logits(z).double() - entropy_from_logits(z.double())).abs().max().item() <= bound


def test_explained_variance():
    """Returns [1, 2, 3] over the mask (pads hold garbage); Var = 2/3.
    values = returns: residual 0, EV = 1. values = 2 (the mean): residual [-1, 0, 1], Var 2/3, EV = 1 - 1 = 0.
    values [1, 2, 4]: residual [0, 0, -1], mean -1/3, Var = (1/9 + 1/9 + 4/9)/3 = 2/9, EV = 1 - (2/9)/(2/3) = 2/3.
    Constant returns: Var 0 -> nan."""
    ret, mask = t([1.0, 2.0, 3.0, 100.0]), m([1, 1, 1, 0])
    assert explained_variance(t([1.0, 2.0, 3.0, -5.0]), ret, mask) == pytest.approx(1.0)
    assert explained_variance(t([2.0, 2.0, 2.0, 0.0]), ret, mask) == pytest.approx(0.0, abs=1e-12)
    assert explained_variance(t([1.0, 2.0, 4.0, 0.0]), ret, mask) == pytest.approx(2 / 3)
    assert math.isnan(explained_variance(t([1.0, 2.0, 4.0, 0.0]), t([5.0, 5.0, 5.0, 1.0]), mask))
    # float32 returns all 1.3: their computed variance is 1.4e-14, not 0 (the float32 mean of eight
    # 1.3s is not 1.3), which as a divisor gave -7.8e13; equal returns are recognised by their values
    ret32 = torch.full((2, 4), 1.3)
    assert math.isnan(explained_variance(torch.zeros(2, 4), ret32, torch.ones(2, 4, dtype=torch.bool)))


def test_adaptive_kl_controller():
    """init 0.2, target 6, horizon 10000.
    KL 9 after 256 steps: 9/6 - 1 = 0.5, clipped to 0.2: 0.2*(1 + 0.2*256/10000) = 0.2*1.00512 = 0.201024.
    KL 5.4 after 512 steps: 5.4/6 - 1 = -0.1 (inside the clip): 0.201024*(1 - 0.1*0.0512) = 0.201024*0.99488
    = 0.201024 - 0.00102924288 = 0.19999475712.
    KL 0 after 10000 steps: error -1 clipped to -0.2: 0.19999475712*0.8 = 0.159995805696.
    A controller loaded from state_dict() after the first update follows the same path exactly."""
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=256)
    assert ctl.value == pytest.approx(0.201024, abs=1e-12)
    resumed = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    for c in (ctl, resumed):
        c.update(5.4, n_steps=512)
        assert c.value == pytest.approx(0.19999475712, abs=1e-12)
        c.update(0.0, n_steps=10000)
        assert c.value == pytest.approx(0.159995805696, abs=1e-12)
    assert resumed.value == ctl.value


# ------------------------------------------------------------------------------------------------
# the per-token quantities, read off the models

def _rollout_batch():
    """Two right-padded rows as data.collate_sft builds them: prompt (3 tokens) + response (4, ending
    in eot 36), and prompt (1) + response (2), padded with eot."""
    import data
    return data.collate_sft([([5, 6, 7], [8, 9, 10, 36]), ([11], [12, 36])], 36)


def test_token_logps_align_with_the_response_tokens():
    """token_logps puts log pi(y_t | x, y_<t) of the t-th response token in column t: checked against
    log_softmax of the full logits read at position (prompt length + t - 1), by hand for each of the
    4 + 2 tokens; padding columns are 0; the entropy at each column is that position's entropy; and
    each row's sum is dpo.py's summed response log-prob."""
    from dpo import sequence_logps
    from ppo import token_logps
    from test_model import tiny_model
    model = tiny_model(seed=4)
    ids, mask = _rollout_batch()
    rmask = m([1, 1, 1, 1], [1, 1, 0, 0])
    lp, ent = token_logps(model, ids, mask, rmask, entropy=True)
    full = torch.log_softmax(model(ids), -1)  # (2, 7, 37)
    want = [[full[0, 2 + t, ids[0, 3 + t]].item() for t in range(4)],
            [full[1, 0, 12].item(), full[1, 1, 36].item(), 0.0, 0.0]]
    assert close(lp, want, 1e-5)
    assert close(ent[1, :2], [-(full[1, i].exp() * full[1, i]).sum().item() for i in range(2)], 1e-5)
    assert close(lp.sum(1), sequence_logps(model(ids), ids, mask)[0], 1e-5)


def test_last_token_scores_read_the_end_of_each_response():
    """A scalar model's score of a row is its output at the row's last response token: position
    3 + 4 - 1 = 6 for the first row, 1 + 2 - 1 = 2 for the padded second row (not the padding)."""
    from model import ScalarGPT, GPTConfig
    from ppo import last_token_scores
    torch.manual_seed(0)
    rm = ScalarGPT(GPTConfig(vocab_size=37, block_size=16, n_layer=1, n_head=1, n_embd=8))
    torch.nn.init.normal_(rm.score_head.weight)
    ids, mask = _rollout_batch()
    full = rm(ids)  # (2, 7)
    assert close(last_token_scores(rm, ids, mask), [full[0, 6].item(), full[1, 2].item()], 1e-6)
