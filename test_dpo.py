"""
Tests of dpo.py, in the order of its code: the loss family (argument checks, worked cases,
gradients), the closed-form optimum the loss is derived from (found by minimising the exact
expected loss), the log-probabilities the loss is made of, and the Unlikelihood baseline. Every expected number is worked
out by hand in the test's docstring. Run: python -m pytest -q test_dpo.py
"""
import math
import re

import pytest
import torch

from dpo import (LOSS_TYPES, check_loss_args, concatenated_logps, dpo_loss, rejected_after_divergence, response_logps,
                 sequence_logps, unlikelihood_loss)
from conftest import U32, float64_logps
from test_model import tiny_model


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# the loss family

BAD_LOSS_ARGS = [  # (beta, loss_type, label_smoothing, the argument named, the exact message)
    (0.0, "sigmoid", 0.0, "beta", "beta must be a number > 0, got 0.0"),
    (-1.0, "sigmoid", 0.0, "beta", "beta must be a number > 0, got -1.0"),
    ("0.1", "sigmoid", 0.0, "beta", "beta must be a number > 0, got '0.1'"),
    (0.1, "kto", 0.0, "loss_type", "unknown loss_type 'kto'; expected one of ('sigmoid', 'ipo', 'hinge')"),
    (0.1, "sigmoid", 0.5, "label_smoothing", "label_smoothing must be in [0, 0.5), got 0.5"),
    (0.1, "sigmoid", -0.1, "label_smoothing", "label_smoothing must be in [0, 0.5), got -0.1"),
    (0.1, "hinge", 0.1, "label_smoothing", "label_smoothing applies to loss_type='sigmoid' only, not 'hinge'"),
    (0.1, "ipo", 0.2, "label_smoothing", "label_smoothing applies to loss_type='sigmoid' only, not 'ipo'"),
]


@pytest.mark.parametrize("beta, loss_type, label_smoothing, arg, message", BAD_LOSS_ARGS,
                         ids=[m for *_, m in BAD_LOSS_ARGS])
def test_check_loss_args_names_the_argument(beta, loss_type, label_smoothing, arg, message):
    """Each bad setting raises ValueError with exactly the message listed in BAD_LOSS_ARGS, which
    names the argument as spelled in the signature (train.py prefixes it with --); dpo_loss runs
    the same check and raises the same message. beta must be > 0 (0 would switch the loss off,
    < 0 would reverse the preferences), label_smoothing eps is a share of flipped labels, so
    eps >= 0.5 would trust the labels no more than a coin, and only the sigmoid loss has an eps."""
    assert re.search(rf"\b{arg}\b", message)
    with pytest.raises(ValueError) as err:
        check_loss_args(beta, loss_type, label_smoothing)
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        dpo_loss(t(-1.0), t(-2.0), t(-1.0), t(-2.0), beta=beta, loss_type=loss_type,
                 label_smoothing=label_smoothing, chosen_lengths=t(1.0), rejected_lengths=t(1.0))
    assert str(err.value) == message


def test_check_loss_args_accepts_every_usable_setting():
    """Every loss type with beta > 0 (int or float) and label_smoothing 0 is fine; the sigmoid loss
    also takes any eps in [0, 0.5), e.g. 0.49. The check returns None (it only raises)."""
    assert LOSS_TYPES == ("sigmoid", "ipo", "hinge")
    for loss_type in LOSS_TYPES:
        for beta in (1, 0.1, 1e-4):
            assert check_loss_args(beta, loss_type, 0.0) is None
    assert check_loss_args(0.1, "sigmoid", 0.49) is None


def test_policy_equal_to_reference_gives_log2():
    """If pi == pi_ref both log-ratios are 0, so h = 0 and the loss is -log sigmoid(0) = log 2
    = 0.693147..., for any beta; both implicit rewards beta*(log pi - log pi_ref) are 0."""
    lp_c, lp_r = t(-12.0, -3.5), t(-7.0, -40.0)
    for beta in (0.1, 1.0):
        losses, rc, rr = dpo_loss(lp_c, lp_r, lp_c.clone(), lp_r.clone(), beta=beta)
        assert torch.allclose(losses, torch.full((2,), math.log(2), dtype=torch.float64))
        assert rc.abs().max() == 0 and rr.abs().max() == 0


def test_sigmoid_worked_case():
    """beta 0.1; chosen log-ratio -10 - (-11) = 1, rejected log-ratio -20 - (-20) = 0, so h = 1.
    sigmoid(0.1) = 1/(1+e^-0.1) = 0.5249792 and the loss is -log 0.5249792 = 0.6443967.
    Rewards: 0.1*1 = 0.1 and 0.1*0 = 0."""
    losses, rc, rr = dpo_loss(t(-10.0), t(-20.0), t(-11.0), t(-20.0), beta=0.1)
    assert losses.item() == pytest.approx(0.6443967, abs=1e-6)
    assert rc.item() == pytest.approx(0.1) and rr.item() == 0.0


def test_sigmoid_and_hinge_use_summed_log_ratios():
    """Responses of different lengths, with the lengths passed as train.py always passes them.
    Chosen: policy -12, reference -16 over 4 tokens: summed log-ratio 4 (per-token mean 1).
    Rejected: policy -3, reference -2 over 1 token: summed -1 (mean -1). Sums: h = 4 - (-1) = 5.
    sigmoid, beta 0.5: -log sigmoid(2.5) = log(1 + e^-2.5) = 0.0788897 (per-token means would give
    h = 2 and log(1 + e^-1) = 0.3132617). hinge, beta 0.1: relu(1 - 0.5) = 0.5 (means: 0.8).
    The rewards are summed too: 0.5*4 = 2 and 0.5*(-1) = -0.5."""
    args = (t(-12.0), t(-3.0), t(-16.0), t(-2.0))
    lens = dict(chosen_lengths=t(4.0), rejected_lengths=t(1.0))
    losses, rc, rr = dpo_loss(*args, beta=0.5, **lens)
    assert losses.item() == pytest.approx(0.0788897, abs=1e-6)
    assert (rc.item(), rr.item()) == (2.0, -0.5)
    losses, _, _ = dpo_loss(*args, beta=0.1, loss_type="hinge", **lens)
    assert losses.item() == pytest.approx(0.5)


def test_conservative_dpo_worked_case():
    """cDPO with eps = 0.1, beta 0.1, h = 1 (z = beta*h = 0.1):
    -(1-eps) log sigmoid(z) - eps log sigmoid(-z). Since log sigmoid(-z) = log sigmoid(z) - z,
    this is -log sigmoid(z) + eps*z = 0.6443967 + 0.01 = 0.6543967."""
    losses, _, _ = dpo_loss(t(-10.0), t(-20.0), t(-11.0), t(-20.0), beta=0.1, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.6543967, abs=1e-6)


def test_ipo_worked_case():
    """IPO uses per-token mean log-ratios. Chosen: policy -8, reference -12 over 4 tokens: mean
    log-ratio 4/4 = 1. Rejected: policy -9, reference -7 over 2 tokens: mean -2/2 = -1. h' = 2.
    beta 0.5: target 1/(2*0.5) = 1, loss (2-1)^2 = 1 (summed log-ratios would give h = 6 and
    (6-1)^2 = 25). beta 0.25: target 2, loss 0 (sums: (6-2)^2 = 16).
    The rewards stay on summed log-ratios: 0.5*4 = 2 and 0.5*(-2) = -1."""
    args = (t(-8.0), t(-9.0), t(-12.0), t(-7.0))
    lens = dict(chosen_lengths=t(4.0), rejected_lengths=t(2.0))
    losses, rc, rr = dpo_loss(*args, beta=0.5, loss_type="ipo", **lens)
    assert losses.item() == pytest.approx(1.0) and rc.item() == pytest.approx(2.0) and rr.item() == pytest.approx(-1.0)
    losses, _, _ = dpo_loss(*args, beta=0.25, loss_type="ipo", **lens)
    assert losses.item() == pytest.approx(0.0, abs=1e-12)


def test_hinge_worked_case():
    """SLiC hinge relu(1 - beta*h), beta 0.1. Pair 1: h = 4 gives 1 - 0.4 = 0.6.
    Pair 2: h = 20 gives 1 - 2 < 0, so 0 (a pair ranked by a wide margin stops contributing)."""
    losses, _, _ = dpo_loss(t(-1.0, 0.0), t(-5.0, -20.0), t(0.0, 0.0), t(0.0, 0.0), beta=0.1, loss_type="hinge")
    assert losses.tolist() == pytest.approx([0.6, 0.0])


def test_reference_free_worked_case():
    """Reference-free DPO takes log pi_ref = 0: h = log pi(y_w) - log pi(y_l) = -3 - (-5) = 2.
    beta 1: -log sigmoid(2) = log(1 + e^-2) = 0.1269280. Rewards: -3 and -5."""
    losses, rc, rr = dpo_loss(t(-3.0), t(-5.0), None, None, beta=1.0)
    assert losses.item() == pytest.approx(0.1269280, abs=1e-6)
    assert (rc.item(), rr.item()) == (-3.0, -5.0)


def test_gradient_matches_closed_form():
    """With z = beta*h and h = (pc - rc) - (pr - rr) computed here from the inputs alone, the
    (conservative) sigmoid loss -(1-eps) log sigmoid(z) - eps log sigmoid(-z) has
    dL/dz = -(1-eps)(1 - sigmoid(z)) + eps*sigmoid(z) = sigmoid(z) - (1-eps), so
    dL/d(log pi_w) = beta*(sigmoid(z) - 1 + eps) and dL/d(log pi_l) is its negative. For eps = 0
    that is -beta*sigmoid(-z) = -beta*sigmoid(r_hat_l - r_hat_w): the DPO weight. Checked against
    autograd on 8 random pairs, two betas and two eps, with sigmoid written out via math.exp."""
    g = torch.Generator().manual_seed(0)
    for beta in (0.1, 0.7):
        for eps in (0.0, 0.2):
            pc, pr, rc, rr = (-20 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(4))
            pc.requires_grad_(True)
            pr.requires_grad_(True)
            dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)[0].sum().backward()
            h = [(a - b) - (c - d) for a, b, c, d in zip(pc.tolist(), rc.tolist(), pr.tolist(), rr.tolist())]
            expected = t(*(beta * (1 / (1 + math.exp(-beta * x)) - 1 + eps) for x in h))
            assert torch.allclose(pc.grad, expected, rtol=1e-12, atol=1e-15)
            assert torch.allclose(pr.grad, -expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss_type, label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.3), ("ipo", 0.0), ("hinge", 0.0)])
def test_gradients_match_finite_differences(loss_type, label_smoothing):
    """Autograd's gradient w.r.t. each of the four log-prob inputs equals the central difference
    [L(x + d) - L(x - d)] / 2d, d = 1e-6, in float64 (truncation error ~d^2 times the third
    derivative, round-off ~1e-16/d: both far below the 1e-6 tolerance). Each pair's loss depends
    on that pair's inputs only, so one input is nudged for all 6 pairs at once and compared pair
    by pair. Random log-probs in [-30, 0], lengths 1-9, beta 0.3. For the hinge, pairs within 0.01
    of the kink 1 - beta*h = 0 are moved off it (no derivative there); the seeded draw has pairs
    on both sides of it."""
    g = torch.Generator().manual_seed(1)
    x = [-30 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4)]
    lens = dict(chosen_lengths=torch.randint(1, 10, (6,), generator=g).double(),
                rejected_lengths=torch.randint(1, 10, (6,), generator=g).double())
    beta = 0.3
    if loss_type == "hinge":
        near = (1 - beta * ((x[0] - x[2]) - (x[1] - x[3]))).abs() < 0.01
        x[0] = x[0] + near * 0.1
        margins = 1 - beta * ((x[0] - x[2]) - (x[1] - x[3]))
        assert (margins > 0).any() and (margins < 0).any()

    def losses(*xs):
        return dpo_loss(*xs, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, **lens)[0]

    xs = [v.clone().requires_grad_(True) for v in x]
    grads = torch.autograd.grad(losses(*xs).sum(), xs)
    d = 1e-6
    for k in range(4):
        up = [v + d if j == k else v for j, v in enumerate(x)]
        down = [v - d if j == k else v for j, v in enumerate(x)]
        numeric = (losses(*up) - losses(*down)) / (2 * d)
        assert torch.allclose(grads[k], numeric, rtol=0, atol=1e-6), (k, grads[k], numeric)


def test_bad_shapes_and_half_reference():
    """dpo_loss checks its tensors: a reference of shape (1,) against policy log-probs of shape (2,)
    is named with the expected shape (2,); one reference given and the other None is refused
    (reference-free needs None for both); ipo without the lengths, or with a length of 0 (the
    per-token mean would divide by 0), is refused."""
    with pytest.raises(ValueError, match="reference_rejected_logps must be a 1-D tensor of shape \\(2,\\)"):
        dpo_loss(t(-1.0, -2.0), t(-2.0, -3.0), t(-1.0, -1.0), t(-2.0))
    with pytest.raises(ValueError, match="None for both"):
        dpo_loss(t(-1.0), t(-2.0), t(-1.0), None)
    with pytest.raises(ValueError, match="needs chosen_lengths and rejected_lengths"):
        dpo_loss(t(-1.0), t(-2.0), t(-1.0), t(-2.0), loss_type="ipo")
    with pytest.raises(ValueError, match="> 0"):
        dpo_loss(t(-1.0), t(-2.0), t(-1.0), t(-2.0), loss_type="ipo", chosen_lengths=t(0.0), rejected_lengths=t(1.0))


# ------------------------------------------------------------------------------------------------
# the closed-form optimum, checked by actually minimising the loss
#
# Setting. A few prompts x, each with K candidate responses y; a tabular policy
# pi_theta(y|x) = softmax(theta[x]) with theta a free (n_prompts, K) table; a fixed, non-uniform
# reference pi_ref(y|x); known rewards r(x, y). Every ordered pair (y_i, y_j), i != j, of the same
# prompt is sampled with weight w_ij > 0 and labelled by Bradley-Terry: y_i wins with probability
# p_ij = sigmoid(r_i - r_j). The EXACT expected DPO loss is then
#
#     E(theta) = sum_{x, i != j} w_ij * [ p_ij * L(i beats j) + (1 - p_ij) * L(j beats i) ],
#
# with L(a beats b) = dpo_loss(log pi(a), log pi(b), log pi_ref(a), log pi_ref(b), beta), the
# project's own function, evaluated on all pairs at once.
#
# Why the minimiser is pi_ref * exp(r/beta) / Z. dpo_loss sees the policy only through the implicit
# reward margin m_ij = beta * [log(pi_i/ref_i) - log(pi_j/ref_j)]: L(i beats j) = -log sigmoid(m_ij)
# and L(j beats i) = -log sigmoid(-m_ij). Grouping the two orders of each unordered pair, the
# pair's term is a binary cross-entropy between the label distribution (p_ij, 1 - p_ij) and the
# model's (sigmoid(m_ij), 1 - sigmoid(m_ij)); by Gibbs' inequality it is smallest exactly when
# sigmoid(m_ij) = p_ij = sigmoid(r_i - r_j), i.e. m_ij = r_i - r_j. All pairs can meet this at once:
# it holds for every pair iff beta * log(pi/pi_ref) = r + c(x) for some per-prompt constant c(x).
# So pi = pi_ref * exp(r/beta) * exp(c(x)/beta), and normalising over y forces exp(-c(x)/beta) =
# Z(x) = sum_y pi_ref exp(r/beta). Since every pair's term is individually minimal there, this is
# the minimiser for ANY positive pair weights w_ij (the weights only matter when the policy
# class cannot match every margin). In theta the minimiser is unique only up to adding a
# per-prompt constant to theta[x] -- the same freedom as c(x) -- which softmax absorbs, so the
# probabilities are unique and that is what we compare.
#
# Problem chosen here: 2 prompts, K = 5, pair weights w_ij = pi_ref(y_i) pi_ref(y_j) (pairs drawn
# from the reference, as in practice). The rewards are in [-0.6, 0.9]; the optimum's probabilities
# lie in [0.038, 0.41] at beta = 0.5 and [0.098, 0.27] at beta = 2.0, up to 0.31 resp. 0.09 away
# from pi_ref and 0.21 resp. 0.10 away from uniform, so the check is neither trivial nor near a
# degenerate 0/1 corner (the helper below asserts this, so a later edit of the numbers can't
# quietly weaken the test). beta = 1 is deliberately avoided: there exp(r/beta) = exp(r*beta).

DTYPE = torch.float64
BETAS = (0.5, 2.0)


def make_problem():
    """(log pi_ref, rewards), both (2, 5) float64. Fixed numbers: nothing random to seed here."""
    ref = torch.tensor([[0.35, 0.25, 0.20, 0.12, 0.08],
                        [0.10, 0.30, 0.15, 0.25, 0.20]], dtype=DTYPE)
    rewards = torch.tensor([[-0.5, 0.2, 0.6, -0.3, 0.9],
                            [0.8, -0.6, 0.3, 0.0, -0.4]], dtype=DTYPE)
    return ref.log(), rewards


def closed_form(log_ref, rewards, beta):
    """pi_ref * exp(r/beta) / Z, per prompt."""
    return torch.softmax(log_ref + rewards / beta, dim=-1)


def expected_dpo_loss(theta, log_ref, rewards, beta):
    """Exact expected DPO loss of the tabular policy softmax(theta) over all ordered pairs i != j
    of each prompt, pairs weighted by pi_ref(y_i) pi_ref(y_j), labels by Bradley-Terry."""
    n, K = theta.shape
    log_pi = torch.log_softmax(theta, dim=-1)
    x, i, j = torch.meshgrid(torch.arange(n), torch.arange(K), torch.arange(K), indexing="ij")
    off = i != j
    x, i, j = x[off], i[off], j[off]                          # every ordered pair, flattened
    w = (log_ref[x, i] + log_ref[x, j]).exp()
    p_i_wins = torch.sigmoid(rewards[x, i] - rewards[x, j])
    loss_i_wins, _, _ = dpo_loss(log_pi[x, i], log_pi[x, j], log_ref[x, i], log_ref[x, j], beta)
    loss_j_wins, _, _ = dpo_loss(log_pi[x, j], log_pi[x, i], log_ref[x, j], log_ref[x, i], beta)
    return (w * (p_i_wins * loss_i_wins + (1 - p_i_wins) * loss_j_wins)).sum()


def minimise(log_ref, rewards, beta, seed=0):
    """Minimise the expected loss over theta from a seeded random start with float64 L-BFGS.
    The loss is convex in theta (a sum of -log sigmoid of linear functions of theta), so L-BFGS
    with a strong-Wolfe line search converges reliably (max |grad| ~1e-8, the loss's float64
    resolution, leaving ~1e-8 error in the probabilities); the flat direction (a per-prompt shift
    of theta) leaves the probabilities unchanged and does no harm."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(log_ref.shape, generator=g, dtype=DTYPE).requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, history_size=20,
                            tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = expected_dpo_loss(theta, log_ref, rewards, beta)
        loss.backward()
        return loss

    opt.step(closure)        # ~20 evaluations; stops when the loss stalls at float64 resolution
    assert theta.grad.abs().max() < 1e-6, "L-BFGS did not converge"
    return theta.detach()


def check_problem_is_informative(log_ref, rewards, beta):
    """Guard on the chosen numbers: the optimum is away from pi_ref, from uniform and from 0/1,
    and the wrong exponent exp(r*beta) would give clearly different probabilities."""
    target = closed_form(log_ref, rewards, beta)
    K = target.shape[-1]
    assert (target - log_ref.exp()).abs().max() > 0.05
    assert (target - 1 / K).abs().max() > 0.05
    assert target.min() > 0.03 and target.max() < 0.5
    assert (target - torch.softmax(log_ref + rewards * beta, -1)).abs().max() > 0.05
    return target


@pytest.mark.parametrize("beta", BETAS)
def test_minimiser_of_expected_dpo_loss_is_closed_form(beta):
    """L-BFGS on the exact expected loss E(theta), from a random start, lands on
    softmax(theta) = pi_ref * exp(r/beta) / Z (derived above) to within 1e-3 in every probability
    (measured ~1e-8); the target is first checked to be away from pi_ref, uniform, 0/1 and the
    wrong exponent exp(r*beta) by more than 0.05, so a wrong minimiser cannot pass."""
    torch.manual_seed(0)
    log_ref, rewards = make_problem()
    target = check_problem_is_informative(log_ref, rewards, beta)
    theta = minimise(log_ref, rewards, beta)
    learned = torch.softmax(theta, dim=-1)
    err = (learned - target).abs().max().item()
    assert err < 1e-3, f"beta={beta}: max |pi_learned - pi_ref*exp(r/beta)/Z| = {err:.3e}"


@pytest.mark.parametrize("beta", BETAS)
def test_closed_form_is_stationary_and_beats_alternatives(beta):
    """The converse direction, without any optimiser: at theta* = log pi_ref + r/beta the gradient
    vanishes, the loss equals its theoretical floor (the weighted Bradley-Terry label entropy,
    reached because every pair's margin matches), and pi_ref or a perturbed optimum does worse."""
    torch.manual_seed(0)
    log_ref, rewards = make_problem()
    theta_star = (log_ref + rewards / beta).requires_grad_(True)
    loss_star = expected_dpo_loss(theta_star, log_ref, rewards, beta)
    (grad,) = torch.autograd.grad(loss_star, theta_star)
    assert grad.abs().max() < 1e-12

    # floor: sum_{x, i != j} w_ij * H(p_ij), the entropy of the labels themselves
    K = rewards.shape[-1]
    off = ~torch.eye(K, dtype=torch.bool)
    w = (log_ref[:, :, None] + log_ref[:, None, :]).exp()
    p = torch.sigmoid(rewards[:, :, None] - rewards[:, None, :])
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    floor = (w * entropy)[:, off].sum()
    torch.testing.assert_close(loss_star.detach(), floor, rtol=1e-12, atol=1e-12)

    # a per-prompt shift of theta changes nothing (the non-uniqueness that softmax absorbs)
    shifted = theta_star.detach() + torch.tensor([[3.0], [-7.0]], dtype=DTYPE)
    torch.testing.assert_close(expected_dpo_loss(shifted, log_ref, rewards, beta), loss_star.detach(),
                               rtol=1e-12, atol=1e-12)

    with torch.no_grad():
        assert expected_dpo_loss(log_ref, log_ref, rewards, beta) > loss_star + 1e-4
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            bump = 0.1 * torch.randn(theta_star.shape, generator=g, dtype=DTYPE)
            bump -= bump.mean(-1, keepdim=True)               # a real change of the probabilities
            assert expected_dpo_loss(theta_star + bump, log_ref, rewards, beta) > loss_star


# ------------------------------------------------------------------------------------------------
# log-probabilities of responses

def test_sequence_logps_by_hand():
    """Vocabulary {0, 1, 2}; every position's logits are log[1, 2, 1], so p = [1/4, 1/2, 1/4].
    Row ids [0, 1, 2, 1], prompt = positions 0-1, response = positions 2-3 (mask [F, F, T, T]).
    Token 2 is predicted by position 1 (p = 1/4), token 1 by position 2 (p = 1/2):
    sum = log(1/8) = -2.0794415, 2 response tokens. The logit at position 3 predicts nothing.
    Changing the prompt tokens' ids (their targets are never scored) changes nothing."""
    logits = torch.log(torch.tensor([1.0, 2.0, 1.0])).expand(1, 4, 3)
    ids = torch.tensor([[0, 1, 2, 1]])
    mask = torch.tensor([[False, False, True, True]])
    lp, n = sequence_logps(logits, ids, mask)
    assert lp.item() == pytest.approx(math.log(1 / 8)) and n.item() == 2
    lp2, _ = sequence_logps(logits, torch.tensor([[2, 0, 2, 1]]), mask)
    assert lp2.item() == pytest.approx(math.log(1 / 8))


def test_sequence_logps_ignores_right_padding():
    """Appending padding (any token, mask False) to the right changes nothing: attention is
    causal, so real positions never see it, and the padded positions are not scored. The same 4
    response tokens, and both summed log-probs equal the unpadded row's float64 value, each within
    conftest's rule (the two runs have other shapes, so other kernels and rounding)."""
    m = tiny_model()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[False, False, True, True, True, True]])
    lp, n = sequence_logps(m(ids), ids, mask)
    ids_p = torch.cat([ids, torch.full((1, 5), 11)], 1)
    mask_p = torch.cat([mask, torch.zeros(1, 5, dtype=torch.bool)], 1)
    lp_p, n_p = sequence_logps(m(ids_p), ids_p, mask_p)
    expected, bound, _, _ = float64_logps(m, ids, mask)
    assert (lp.double() - expected).abs() <= bound and (lp_p.double() - expected).abs() <= bound
    assert n.item() == n_p.item() == 4


def test_response_only_fast_path_equals_full_logits():
    """response_logps pushes only the scored positions through lm_head; it must equal the literal
    definition sequence_logps(model(ids), ids, mask) (full logits, shift, log_softmax, gather,
    mask, sum), values and gradients. Four rows with responses of 9, 4, 3 and 4 tokens at different
    offsets, so both count 9, 4, 3, 4 response tokens. Values: each path within conftest's rule of
    the float64 sums. Gradients (of the summed log-probs, on the tied embedding): the two float32
    paths share the trunk and differ only in which rows reach the output layer, so the output
    layer's weight gradient adds the 20 scored rows' terms (the full path: and 28 exact zeros) in
    another order; stated bound: the rule's 64 u per token, times 20 tokens, times max|g| (measured:
    equal on AVX-512; an off-by-one row would move elements by O(max|g|) = 4)."""
    m = tiny_model(seed=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 37, (4, 12), generator=g)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    for b, (s, e) in enumerate([(3, 12), (5, 9), (1, 4), (8, 12)]):
        mask[b, s:e] = True
    full, n_full = sequence_logps(m(ids), ids, mask)
    full.sum().backward()
    g_full = m.transformer.wte.weight.grad.clone()
    m.zero_grad()
    fast, n_fast = response_logps(m, ids, mask)
    fast.sum().backward()
    expected, bound, _, _ = float64_logps(m, ids, mask)
    assert ((full.double() - expected).abs() <= bound).all() and ((fast.double() - expected).abs() <= bound).all()
    assert torch.equal(n_full, n_fast) and n_fast.tolist() == [9, 4, 3, 4]
    g_fast = m.transformer.wte.weight.grad
    assert (g_full - g_fast).abs().max() <= 64 * U32 * 20 * g_full.abs().max()


def test_concatenated_forward_equals_two_forwards():
    """Chosen and rejected stacked in one (2B, T) call give the same log-probs as scoring each
    half on its own (the rejected half with its own, shorter padding: 5 columns instead of 7): all
    within conftest's rule of the float64 values. Response-token counts: chosen 2 and 4, rejected 1 and 2."""
    m = tiny_model(seed=2)
    chosen = torch.tensor([[1, 2, 3, 4, 5, 0, 0], [6, 7, 8, 9, 10, 11, 12]])
    rejected = torch.tensor([[1, 2, 3, 20, 0, 0, 0], [6, 7, 8, 21, 22, 0, 0]])
    mc = torch.tensor([[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    mr = torch.tensor([[0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    c, r, nc, nr = concatenated_logps(m, torch.cat([chosen, rejected]), torch.cat([mc, mr]))
    c1, nc1 = sequence_logps(m(chosen), chosen, mc)
    r1, nr1 = sequence_logps(m(rejected[:, :5]), rejected[:, :5], mr[:, :5])
    for got, (expected, bound, _, _) in (((c, c1), float64_logps(m, chosen, mc)), ((r, r1), float64_logps(m, rejected, mr))):
        assert all(((x.double() - expected).abs() <= bound).all() for x in got)
    assert nc.tolist() == nc1.tolist() == [2, 4] and nr.tolist() == nr1.tolist() == [1, 2]


# ------------------------------------------------------------------------------------------------
# the Unlikelihood baseline

def test_rejected_after_divergence_by_hand():
    """Two pairs, prompt [1, 2]. Pair 1: chosen 3 4 5 | rejected 3 6 7 8: they part at the second
    response token, so rejected 6 7 8 are penalised and its 3 (shared with the chosen) is not.
    Pair 2: chosen 9 | rejected 9 10: rejected 10 stands where the chosen has ended (padding), so
    only it counts. The (N,) result follows response_token_logps' order: the 3 + 1 chosen tokens
    (never), then rejected rows 3 6 7 8 and 9 10."""
    pad = 0
    chosen = [[1, 2, 3, 4, 5, pad], [1, 2, 9, pad, pad, pad]]
    rejected = [[1, 2, 3, 6, 7, 8], [1, 2, 9, 10, pad, pad]]
    ids = torch.tensor(chosen + rejected)
    lens = [3, 1, 4, 2]
    mask = torch.tensor([[False, False] + [True] * n + [False] * (4 - n) for n in lens])
    got = rejected_after_divergence(ids, mask).tolist()
    assert got == [False] * 4 + [False, True, True, True] + [False, True]


def test_unlikelihood_loss_by_hand():
    """Chosen summed log-probs (-2, -4) over (2, 4) tokens: likelihood term 6 / 6 = 1, as in
    Preferred-FT. Two penalised rejected tokens with p = 0.5 and 0.75: -log(1 - p) = log 2 and
    log 4, mean 1.5 log 2. alpha 0.5: loss = 1 + 0.75 log 2 = 1.519860. Gradient on a rejected
    token's log-prob l: alpha/M * d/dl[-log(1 - e^l)] = alpha/M * p/(1 - p) = 0.25 * (1, 3), both
    positive, so a descent step lowers them; on each chosen log-prob -1/6. alpha 0 is Preferred-FT;
    no penalised token gives 0 (not nan); p = 1 is floored, a finite loss -log(1e-5) = 11.5129."""
    pc = torch.tensor([-2.0, -4.0], requires_grad=True)
    lt = torch.tensor([math.log(0.5), math.log(0.75)], requires_grad=True)
    loss, nll, ul = unlikelihood_loss(pc, torch.tensor([2.0, 4.0]), lt, alpha=0.5)
    assert loss.item() == pytest.approx(1 + 0.75 * math.log(2))
    assert nll.item() == pytest.approx(1.0) and ul.item() == pytest.approx(1.5 * math.log(2))
    loss.backward()
    assert lt.grad.tolist() == pytest.approx([0.25, 0.75]) and pc.grad.tolist() == pytest.approx([-1 / 6, -1 / 6])
    assert unlikelihood_loss(pc, torch.tensor([2.0, 4.0]), lt, alpha=0.0)[0].item() == pytest.approx(1.0)
    empty = unlikelihood_loss(pc, torch.tensor([2.0, 4.0]), torch.zeros(0), alpha=1.0)
    assert empty[0].item() == pytest.approx(1.0) and empty[2].item() == 0.0
    sure = unlikelihood_loss(pc, torch.tensor([2.0, 4.0]), torch.zeros(1), alpha=1.0)[2]
    assert sure.item() == pytest.approx(-math.log(1e-5), rel=1e-4)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        unlikelihood_loss(pc, torch.tensor([2.0, 4.0]), lt, alpha=-1.0)


def test_penalised_token_logps_match_full_logits():
    """concatenated_logps(with_tokens=True) returns each response token's log-prob; selecting the
    penalised ones with rejected_after_divergence must give what the literal definition of full
    logits gives with a mask of just those tokens (chosen rows masked out), row by row, within
    conftest's rule of the float64 values; and the per-token values sum to the returned per-sequence
    log-probs: the same float32 numbers added in another order, so within 2 (n - 1) u sum|x|."""
    m = tiny_model(seed=4)
    chosen = torch.tensor([[1, 2, 3, 4, 5, 0], [1, 2, 9, 0, 0, 0]])
    rejected = torch.tensor([[1, 2, 3, 6, 7, 8], [1, 2, 9, 10, 0, 0]])
    ids = torch.cat([chosen, rejected])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    c, r, _, _, tok = concatenated_logps(m, ids, mask, with_tokens=True)
    assert abs(tok.sum().item() - (c.sum() + r.sum()).item()) <= 2 * (len(tok) - 1) * U32 * tok.abs().sum().item()
    picked = tok[rejected_after_divergence(ids, mask)]
    only = torch.zeros_like(mask)
    only[2, 3:6] = True  # 6 7 8
    only[3, 3] = True    # 10
    expected, bound, _, _ = float64_logps(m, ids, only)
    got = torch.stack([picked[:3].sum(), picked[3:].sum()]).double()
    assert ((got - expected[2:]).abs() <= bound[2:]).all()
