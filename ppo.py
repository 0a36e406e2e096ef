"""
RLHF with a reward model and PPO: the per-token rewards, GAE, the clipped losses, the reward model's loss.

The objective is the one DPO solves in closed form (dpo.py): maximise E_{x, y~pi}[r(x,y)] - beta*KL(pi||pi_ref),
with beta called kl_coef here. PPO optimises it by reinforcement learning instead.

(1) The KL is a per-token reward. An autoregressive policy factorises, log pi(y|x) = sum_t log pi(y_t|x,y_<t), so
    KL(pi||pi_ref)(x) = E_{y~pi}[ sum_t k_t ],   k_t = log pi(y_t|x,y_<t) - log pi_ref(y_t|x,y_<t).
Read each token as an action and prompt + tokens so far as the state, and pay the reward
    r_t = -beta*k_t  at every response token,   plus r(x,y) at the last one.
With gamma = 1 the return sum_t r_t is r(x,y) - beta*sum_t k_t, whose expectation IS the objective: a plain RL
problem. k_t of the sampled token is a one-sample estimate (it can be negative) whose sum is unbiased for the
sequence KL. That r_t depends on pi itself does not bias the policy gradient: the extra term,
-beta*E_pi[grad log pi], is zero. So the rewards are computed once per rollout and held fixed.

(2) GAE estimates the advantage A(s_t,a_t) = Q(s_t,a_t) - V(s_t): how much better token a_t was than the policy's
average at that state. With the one-step TD error delta_t = r_t + gamma*V(s_{t+1}) - V(s_t),
    A_t = sum_{l>=0} (gamma*lam)^l delta_{t+l}   (= delta_t + gamma*lam*A_{t+1}, computed backwards).
lam = 0 gives delta_t: low variance, but biased by the value head's errors. lam = 1 telescopes to the Monte-Carlo
return sum_l gamma^l r_{t+l} minus V(s_t): unbiased, but it carries the noise of every later token. lam in between
trades the two. A_t + V(s_t) is the TD(lam) return, the regression target of the value head. The episode ends after
the last real token, so V = 0 there. A response cut at the maximum length without an end token is really an episode
cut by a time limit; it is still treated as terminal here (V = 0 after its last token), and the caller decides how
to score it (e.g. a fixed penalty in place of r(x,y)).

(3) Why the ratio is clipped. With rho = pi(a_t|s_t) / pi_old(a_t|s_t), the surrogate E_old[rho*A_t] has the true
objective's gradient at pi = pi_old, but it is only a good approximation near pi_old: the advantages were estimated
under pi_old and go stale as pi moves. Maximised without limit over several epochs of minibatch steps on one
rollout, it drives rho as far as the advantage's sign says. PPO-clip maximises min(rho*A, clip(rho,1-eps,1+eps)*A)
instead: once rho has left [1-eps, 1+eps] in the direction A favours, the clipped constant is the smaller term and
the token's gradient is zero, so there is no gain in moving further; a move in the unfavoured direction keeps the
unclipped term, so it is still corrected. The loss minimised is its negative, max(-rho*A, -clip(rho)*A).

(4) The value head is clipped the same way: its new prediction earns nothing from moving more than c away from the
rollout's old prediction, by taking the larger of the two squared errors. The reward model r(x,y) is fitted to
preference pairs with the Bradley-Terry model, P(y_w beats y_l | x) = sigmoid(r(x,y_w) - r(x,y_l)), by maximum
likelihood: loss = -log sigmoid(r_w - r_l). DPO fits this very likelihood, but with r replaced by the implicit
reward beta*log(pi/pi_ref), which folds the reward model and this RL step into one loss on the policy.

(5) Without a critic: GRPO and RLOO. Both sample a group of G responses per prompt and use the group itself as
the baseline that the value head provides in (2), so one advantage holds for every token of a response:
    RLOO (Ahmadian et al. 2024, arXiv:2402.14740, section 3; Kool et al. 2019): A_i = R_i - 1/(G-1) sum_{j!=i} R_j.
        The baseline leaves out R_i itself, so it is independent of y_i and E[A_i grad log pi(y_i)] is exactly
        the gradient of E[R]: unbiased. Equal to G/(G-1) (R_i - mean R).
    GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, section 4.1, outcomes): A_i = (R_i - mean R) / std R.
        Dividing by the group's spread makes each prompt's advantages O(1) whatever its reward scale; it also
        weighs a prompt the policy almost always gets right (tiny std) as much as a hard one (Liu et al. 2025,
        Dr. GRPO, call this a bias). A group whose rewards all tie has no signal: its advantages are exactly 0.
R_i is the response's score, and the KL to the reference enters in one of two ways:
    kl_penalty=reward: R_i = r(x,y_i) - beta*sum_t k_t, the sequence form of (1), as RLOO does. With RLOO's
        advantages the expected gradient is the gradient of the objective E[r] - beta*KL(pi||pi_ref), the one
        DPO solves. GRPO's division by each group's std reweights the prompts, so its gradient is not exactly
        that; and in a group whose rewards all tie, the z-score is of the KL terms alone, full size whatever beta.
    kl_penalty=loss: R_i = r(x,y_i), and beta*mean_t k3_t is added to the loss, as GRPO does, with
        k3 = rho - log rho - 1, rho = pi_ref(y_t|s_t)/pi(y_t|s_t) (Schulman, "Approximating KL divergence"):
        k3 >= 0 and E_{y_t~pi}[k3] = KL(pi||pi_ref) at s_t. But its gradient through log pi (samples held fixed)
        is (1 - rho) grad log pi, whose expectation under pi is -E_{pi_ref}[grad log pi] = grad KL(pi_ref||pi):
        the reverse KL's gradient, not the forward KL's that the RLHF objective has. The default is
        kl_penalty=reward, so that every method in Figure 2 solves the same objective.
The loss is PPO's clipped loss (3) with these advantages, averaged over every response token of the batch.
"""
import math

import torch
import torch.nn.functional as F

CRITIC_FREE = ("grpo", "rloo")  # the methods of (5): train.py's --method values that use group_advantages


def masked_mean(x, mask, dim=None):
    """Mean of x over the entries where mask is True; over everything if dim is None, else along dim."""
    x = x.masked_fill(~mask, 0)                    # masked-out entries may hold anything, even nan
    if dim is None:
        return x.sum() / mask.sum()
    return x.sum(dim) / mask.sum(dim)


def masked_var(x, mask):
    """Population (biased) variance of the masked entries of x."""
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / sqrt(var + eps), mean and population variance over the masked entries. shift_mean=False
    adds the mean back (rescale only, e.g. for rewards whose sign matters). Masked-out entries are 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    # all-equal entries: x - mean is rounding noise that rsqrt(eps) would blow up 1e4-fold, so it is 0
    # (no host sync: a 0-d bool); e.g. a group whose responses all earned the same reward
    same = x.masked_fill(~mask, -math.inf).amax() == x.masked_fill(~mask, math.inf).amin()
    out = torch.where(same, 0.0, x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out.masked_fill(~mask, 0)


def per_token_rewards(logprobs, ref_logprobs, mask, scores, kl_coef):
    """The episode's rewards of (1): r_t = -kl_coef*k_t, plus scores (B,) at each row's last real token.

    logprobs, ref_logprobs (B, T): log pi and log pi_ref of the sampled response tokens; mask (B, T) left-aligned.
    Returns (rewards (B, T), kl (B, T)), kl = logprobs - ref_logprobs; both 0 where mask is False.
    """
    B, T = mask.shape
    kl = (logprobs - ref_logprobs).masked_fill(~mask, 0)                          # (B, T)
    last = F.one_hot(mask.sum(1) - 1, T).to(kl.dtype)                            # (B, T), 1 at the last token
    rewards = -kl_coef * kl + last * scores[:, None]                              # (B, T), 0 at pads
    return rewards, kl


@torch.no_grad()
def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438), see (2).

    rewards, values (B, T): r_t and V(s_t) at the response tokens; mask (B, T) left-aligned.
    delta_t = r_t + gamma*V_{t+1} - V_t with V = 0 after each row's last real token; A_t = delta_t + gamma*lam*A_{t+1}.
    Returns (advantages (B, T), returns = advantages + values (B, T)), 0 where mask is False; no gradient.
    """
    T = mask.shape[1]
    # rows are left-aligned, so once the pads hold r = V = 0, V after each row's last real token is 0 (terminal)
    # and every pad gets delta = 0 and A = 0: nothing flows back from the pads into the real tokens
    rewards, values = rewards.masked_fill(~mask, 0), values.masked_fill(~mask, 0)    # (B, T)
    advantages = torch.zeros_like(values)
    next_adv = torch.zeros_like(values[:, 0])                                     # (B,) A_{t+1}
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(next_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]                 # (B,)
        next_adv = delta + gamma * lam * next_adv
        advantages[:, t] = next_adv
    return advantages, advantages + values


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    """PPO-clip (Schulman et al. 2017, arXiv:1707.06347, Eq. 7), see (3), averaged over the masked tokens.

    logprobs (B, T) of the current policy (with grad); old_logprobs, advantages (B, T) from the rollout.
    loss = mean of max(-A*rho, -A*clip(rho, 1-eps, 1+eps)), rho = exp(logprobs - old_logprobs).
    stats (detached 0-d tensors, no host sync):
      clip_fraction: share of masked tokens where the clipped term is strictly the larger, i.e. rho left
                     [1-eps, 1+eps] in the direction A favours and A != 0 (those tokens get zero gradient, as do
                     the tokens with A = 0, which are not counted);
      approx_kl:     mean of (rho - 1) - log rho, the k3 estimator of KL(pi_old||pi) (Schulman, "Approximating
                     KL divergence"): unbiased under tokens sampled from pi_old since E_old[rho] = 1, and >= 0.
    """
    log_ratio = logprobs - old_logprobs                                           # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio                                               # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = dict(clip_fraction=masked_mean((clipped > unclipped).to(ratio.dtype), mask),
                     approx_kl=masked_mean((ratio - 1) - log_ratio, mask))
    return loss, stats


def group_advantages(scores, method):
    """The critic-free advantages of (5), one per response. scores (P, G): G responses to each of P prompts.
    method 'rloo': R_i minus the mean of the other G - 1; 'grpo': (R_i - mean) / std, the sample std (n - 1),
    and exactly 0 for a group whose scores are all equal (its R_i - mean would be rounding noise, and so
    would the std). In float64: scores one float32 ulp apart still get their exact z-scores. -> (P, G)"""
    G, dtype = scores.shape[1], scores.dtype
    scores = scores.double()  # a group can differ by a float32 ulp: its mean and spread stay exact
    if G < 2:
        raise ValueError(f"a group needs at least 2 responses, got {G}")
    if method == "rloo":
        return (scores - (scores.sum(1, keepdim=True) - scores) / (G - 1)).to(dtype)
    if method != "grpo":
        raise ValueError(f"method {method!r}: 'grpo' or 'rloo'")
    tied = scores.amax(1, keepdim=True) == scores.amin(1, keepdim=True)        # (P, 1)
    centred = torch.where(tied, 0.0, scores - scores.mean(1, keepdim=True))
    return (centred / torch.where(tied, 1.0, scores.std(1, keepdim=True))).to(dtype)


def k3_kl(logprobs, ref_logprobs):
    """GRPO's per-token KL estimate, (5): k3 = rho - log rho - 1 with log rho = ref_logprobs - logprobs, for
    tokens sampled from pi. >= 0; its mean under pi is KL(pi||pi_ref); its gradient is the reverse KL's.
    log rho is clamped to [-20, 20], so a token whose probability fell e^20-fold gives a large, finite loss."""
    log_rho = (ref_logprobs - logprobs).clamp(-20, 20)  # a token pi all but abandoned: e^20, not inf
    return torch.expm1(log_rho) - log_rho   # expm1: no cancellation when rho is near 1


def value_loss(values, old_values, returns, mask, clip_range_value):
    """Clipped value loss (Ziegler et al. 2019, arXiv:1909.08593; OpenAI baselines' PPO2), see (4).

    v_clipped = old_values + clip(values - old_values, -c, c); loss = 0.5 * mean over the mask of
    max((values - returns)^2, (v_clipped - returns)^2). stats: value_clip_fraction = share of masked tokens where
    the clipped error is strictly the larger (those tokens get no gradient), a detached 0-d tensor.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    err = (values - returns) ** 2                                                 # (B, T)
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        # |values - old| > c as well: old + (values - old) can round an ulp away from values, which makes
        # err_clipped strictly larger on a token that was not clipped (and gets its full gradient)
        clipped = (err_clipped > err) & ((values - old_values).abs() > clip_range_value)
        stats = dict(value_clip_fraction=masked_mean(clipped.to(err.dtype), mask))
    return loss, stats


def entropy_from_logits(logits):
    """Entropy of softmax(logits) along the last dim, shape (...,). H = -sum p log p with log p = logits - lse,
    so H = lse - sum p*logits, without ever taking the log of a tiny p. Logits must be finite. The row's
    max is subtracted first (H does not change): with an offset of 100, lse and sum p*z would each be ~100
    and their float32 difference would lose ~1e-5."""
    z = logits - logits.amax(dim=-1, keepdim=True)
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


@torch.no_grad()
def explained_variance(values, returns, mask):
    """1 - Var[returns - values] / Var[returns] over the mask, a float: 1 for a perfect value head, 0 for one no
    better than predicting the mean, negative for a worse one; nan when the returns do not vary (all equal:
    their computed variance is then rounding noise, not 0, so equality is tested on the values)."""
    r = returns[mask]
    if r.numel() == 0 or (r.max() == r.min()).item():
        return float("nan")
    var_returns = masked_var(returns, mask).item()
    return 1.0 - masked_var(returns - values, mask).item() / var_returns


def bradley_terry_loss(chosen_scores, rejected_scores):
    """Reward-model loss on preference pairs (Bradley & Terry 1952; Ouyang et al. 2022, InstructGPT,
    arXiv:2203.02155, Eq. 1): -log sigmoid(r_w - r_l), the negative log-likelihood of the observed preference.
    chosen_scores, rejected_scores (B,). Returns (losses (B,), accuracy = share of pairs with r_w > r_l, a float;
    a tie counts as wrong). Only differences are fitted, so the scores' offset is free (normalise it afterwards)."""
    losses = -F.logsigmoid(chosen_scores - rejected_scores)                       # (B,)
    accuracy = (chosen_scores > rejected_scores).float().mean().item()
    return losses, accuracy


class AdaptiveKLController:
    """Adaptive kl_coef of Ziegler et al. 2019 (arXiv:1909.08593, section 2.2): a proportional controller that
    raises beta when the observed KL is above target and lowers it when below, with the error clipped to +-0.2:
        beta *= 1 + clip(KL/target - 1, -0.2, 0.2) * n_steps/horizon."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, observed_kl, n_steps):
        error = min(max(float(observed_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = float(state["value"])


# ---------------------------------------------------------------------------------------------------
# the per-token quantities PPO is made of, read off the models (as dpo.py's log-probabilities are for DPO)

def response_space(flat, rmask):
    """Values at the N positions that predict response tokens (row-major, as GPT.forward(select=)
    returns them) -> (B, R) with column t the t-th response token; rmask (B, R) is True where it exists."""
    out = flat.new_zeros(rmask.shape)
    out[rmask] = flat
    return out


def predicting(mask):
    """(B, T) True at the positions whose output predicts a response token: t-1 predicts token t."""
    pred = torch.zeros_like(mask)
    pred[:, :-1] = mask[:, 1:]
    return pred


def token_logps(model, ids, mask, rmask, entropy=False):
    """log pi of each sampled response token (B, R), and with entropy=True the entropy of pi there."""
    logits = model(ids, select=predicting(mask)).float()   # (N, V)
    logp = torch.log_softmax(logits, -1).gather(1, ids[:, 1:][mask[:, 1:]][:, None]).squeeze(1)
    if not entropy:
        return response_space(logp, rmask), None
    with torch.no_grad():  # only logged: no (N, V) softmax kept for backward
        ent = response_space(entropy_from_logits(logits.detach()), rmask)
    return response_space(logp, rmask), ent


def token_values(value, ids, mask, rmask):
    """V(s_t) (B, R): the value model at the position that predicts response token t."""
    return response_space(value(ids, select=predicting(mask)), rmask)


def last_token_scores(model, ids, mask):
    """A scalar model's output at each row's last response token (the end of prompt + response). -> (B,)"""
    last = torch.zeros_like(mask)
    last[torch.arange(len(mask)), mask.long().cumsum(1).argmax(1)] = True  # first column where the count peaks
    return model(ids, select=last)
