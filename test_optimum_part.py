"""The closed-form DPO optimum, checked by actually minimising the loss.

Setting. A few prompts x, each with K candidate responses y; a tabular policy
pi_theta(y|x) = softmax(theta[x]) with theta a free (n_prompts, K) table; a fixed, non-uniform
reference pi_ref(y|x); known rewards r(x, y). Every ordered pair (y_i, y_j), i != j, of the same
prompt is sampled with weight w_ij > 0 and labelled by Bradley-Terry: y_i wins with probability
p_ij = sigmoid(r_i - r_j). The EXACT expected DPO loss is then

    E(theta) = sum_{x, i != j} w_ij * [ p_ij * L(i beats j) + (1 - p_ij) * L(j beats i) ],

with L(a beats b) = dpo_loss(log pi(a), log pi(b), log pi_ref(a), log pi_ref(b), beta), the
project's own function, evaluated on all pairs at once.

Why the minimiser is pi_ref * exp(r/beta) / Z. dpo_loss sees the policy only through the implicit
reward margin m_ij = beta * [log(pi_i/ref_i) - log(pi_j/ref_j)]: L(i beats j) = -log sigmoid(m_ij)
and L(j beats i) = -log sigmoid(-m_ij). Grouping the two orders of each unordered pair, the
pair's term is a binary cross-entropy between the label distribution (p_ij, 1 - p_ij) and the
model's (sigmoid(m_ij), 1 - sigmoid(m_ij)); by Gibbs' inequality it is smallest exactly when
sigmoid(m_ij) = p_ij = sigmoid(r_i - r_j), i.e. m_ij = r_i - r_j. All pairs can meet this at once:
it holds for every pair iff beta * log(pi/pi_ref) = r + c(x) for some per-prompt constant c(x).
So pi = pi_ref * exp(r/beta) * exp(c(x)/beta), and normalising over y forces exp(-c(x)/beta) =
Z(x) = sum_y pi_ref exp(r/beta). Since every pair's term is individually minimal there, this is
the minimiser for ANY positive pair weights w_ij (the weights only matter when the policy
class cannot match every margin). In theta the minimiser is unique only up to adding a
per-prompt constant to theta[x] -- the same freedom as c(x) -- which softmax absorbs, so the
probabilities are unique and that is what we compare.

Problem chosen here: 2 prompts, K = 5, pair weights w_ij = pi_ref(y_i) pi_ref(y_j) (pairs drawn
from the reference, as in practice). The rewards are in [-0.6, 0.9]; the optimum's probabilities
lie in [0.038, 0.41] at beta = 0.5 and [0.098, 0.27] at beta = 2.0, up to 0.31 resp. 0.09 away
from pi_ref and 0.21 resp. 0.10 away from uniform, so the check is neither trivial nor near a
degenerate 0/1 corner (the helper below asserts this, so a later edit of the numbers can't
quietly weaken the test). beta = 1 is deliberately avoided: there exp(r/beta) = exp(r*beta).
"""
import pytest
import torch

from dpo import dpo_loss

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
    with a strong-Wolfe line search converges reliably; the flat direction (a per-prompt shift
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

    for _ in range(5):                                        # a restart or two if max_iter ran out
        opt.step(closure)
        if theta.grad.abs().max() < 1e-10:
            break
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
