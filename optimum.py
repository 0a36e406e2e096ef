"""
The best any policy can do at each KL, estimated from the reference's own samples; and Best-of-N's KL.

dpo.py derives the optimum of the KL-regularised objective max_pi E_{y~pi}[r(x,y)] - beta*KL(pi||pi_ref):
    pi*(y|x) = pi_ref(y|x) exp(r(x,y)/beta) / Z(x),   Z(x) = sum_y pi_ref(y|x) exp(r(x,y)/beta) = E_{pi_ref}[e^{r/beta}].
Everything about pi* follows from Z and from expectations under it:
    E_{pi*}[r]            = E_{pi_ref}[r e^{r/beta}] / Z(x)
    KL(pi* || pi_ref)     = E_{pi*}[log pi*/pi_ref] = E_{pi*}[r/beta - log Z(x)] = E_{pi*}[r]/beta - log Z(x)
    the objective's value = E_{pi*}[r] - beta*KL = beta*log Z(x)
Sweeping beta from large to small traces the frontier: the most reward any policy reaches at each KL (no
policy does better at the same KL, else it would beat pi*'s objective for that beta).

With N samples y_1..y_N ~ pi_ref(.|x) and their exact rewards r_i (a task with a reward, such as reviews):
    log Z(x)   ~ log mean_i exp(r_i/beta)                    (log-mean-exp, computed stably)
    w_i        = exp(r_i/beta) / sum_j exp(r_j/beta)         (self-normalised importance weights: pi* on the samples)
    E_{pi*}[r] ~ sum_i w_i r_i,   KL ~ sum_i w_i r_i / beta - log Z
The estimate is pi* restricted to the N samples, so its KL can never exceed log N (all weight on one sample)
and it is trustworthy only while many samples carry the weight: the effective sample size 1/sum_i w_i^2 is N
for beta -> infinity (pi* = pi_ref, KL 0) and falls to 1 as beta -> 0. Finite N biases E_{pi*}[r] down
(the best responses are missing from the sample) and log Z down (Jensen), so a trained policy can land a
little above an estimated frontier where the frontier is near its ceiling.

Best-of-N's distribution is not pi*, but on the same samples its reward distribution is exact
(Beirami et al. 2024, arXiv:2401.01879): with F the reference's reward CDF at x, the best of N draws has
    P_N(r) = F(r)^N - F(r-)^N   for each distinct reward r,   KL(best-of-N || pi_ref) = sum_r P_N(r) log(P_N(r)/p(r)),
p(r) = F(r) - F(r-) (responses of equal reward are kept in the reference's proportions, so the KL over
responses equals the KL over rewards). Only without ties, and as the atoms become small, does it reach
log N - (N-1)/N, the value used since Stiennon et al. 2020; ties (integer rewards) make it much smaller.
"""
import math

import numpy as np


def frontier_at(rewards, beta):
    """rewards (P, N) float64: N reference samples' rewards for each of P prompts. -> per-prompt arrays
    (each (P,)): reward E_{pi*}[r], kl KL(pi*||pi_ref), log_z log Z(x), ess 1/sum w^2."""
    z = rewards / beta                                                   # (P, N)
    top = z.max(1, keepdims=True)
    e = np.exp(z - top)                                                  # (P, N), max 1: no overflow
    w = e / e.sum(1, keepdims=True)                                      # (P, N) self-normalised weights
    log_z = top[:, 0] + np.log(e.mean(1))                                # log mean exp(r/beta)
    reward = (w * rewards).sum(1)
    kl = np.maximum(reward / beta - log_z, 0.0)  # >= 0 exactly (Jensen); rounding can leave -1e-16
    return dict(reward=reward, kl=kl, log_z=log_z, ess=1.0 / (w ** 2).sum(1))


def optimal_frontier(rewards, betas, n_boot=200, seed=0, min_ess=10.0):
    """The frontier averaged over prompts, one row per beta (sorted by KL): reward, kl, log_z (means),
    ess_median, and 95% bootstrap intervals over prompts (reward_lo/hi, kl_lo/hi: the prompts
    resampled with replacement n_boot times). trusted: the median prompt keeps >= min_ess effective
    samples and the mean KL is at least 1 nat below its ceiling log N."""
    P, N = rewards.shape
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, P, size=(n_boot, P))                         # (n_boot, P) bootstrap prompt sets
    rows = []
    for beta in betas:
        f = frontier_at(rewards, beta)
        boot_r, boot_kl = f["reward"][picks].mean(1), f["kl"][picks].mean(1)   # (n_boot,)
        ess = float(np.median(f["ess"]))
        kl = float(f["kl"].mean())
        rows.append(dict(beta=float(beta), reward=float(f["reward"].mean()), kl=kl, log_z=float(f["log_z"].mean()),
                         ess_median=ess, reward_lo=float(np.percentile(boot_r, 2.5)),
                         reward_hi=float(np.percentile(boot_r, 97.5)), kl_lo=float(np.percentile(boot_kl, 2.5)),
                         kl_hi=float(np.percentile(boot_kl, 97.5)), trusted=bool(ess >= min_ess and kl <= math.log(N) - 1)))
    return sorted(rows, key=lambda r: r["kl"])


def optimum_reward_at(frontier, kl, reference_reward):
    """R*(KL): the frontier's reward at this KL, linear between its trusted points (the rows of
    optimal_frontier, sorted by KL) and from (0, reference_reward), where every frontier starts
    (beta -> infinity: pi* = pi_ref); None beyond its last trusted point."""
    trusted = [r for r in frontier if r["trusted"]]
    if not trusted or kl > trusted[-1]["kl"]:
        return None
    return float(np.interp(kl, [0.0] + [r["kl"] for r in trusted], [reference_reward] + [r["reward"] for r in trusted]))


def best_of_n_exact(scores_row, n, rewards_row=None):
    """Best-of-n from one prompt's reference samples (N,): the empirical distribution p(s) of the score it
    selects on over distinct scores, then P_n(s) = F(s)^n - F(s-)^n. The selected response is one of the
    highest-scored, equal scores kept in the reference's proportions, so its expected reward is
    sum_s P_n(s) mean(reward | s); rewards_row: each sample's reward, if not the score itself (e.g. the
    score minus a penalty). -> (KL(best-of-n || pi_ref), E_{best-of-n}[reward])."""
    rewards_row = scores_row if rewards_row is None else rewards_row
    values, inverse, counts = np.unique(scores_row, return_inverse=True, return_counts=True)  # sorted distinct scores
    p = counts / counts.sum()
    F = np.cumsum(p)
    F_below = np.concatenate([[0.0], F[:-1]])
    p_n = F ** n - F_below ** n
    mean_reward = np.bincount(inverse, weights=rewards_row) / counts    # (distinct scores,)
    keep = p_n > 0
    return float((p_n[keep] * np.log(p_n[keep] / p[keep])).sum()), float((p_n * mean_reward).sum())


def best_of_n_table(rewards, ns, scores=None):
    """For each n: the mean over prompts of best-of-n's exact KL and reward, with the KL's standard error,
    beside the bound log n - (n-1)/n. rewards (P, N); scores (P, N), what best-of-n selects on, if not the
    rewards. -> [dict(n, kl, kl_se, reward, bound)]"""
    scores = rewards if scores is None else scores
    out = []
    for n in ns:
        kl, reward = np.array([best_of_n_exact(s, n, r) for s, r in zip(scores, rewards)]).T
        se = float(kl.std(ddof=1) / math.sqrt(len(kl))) if len(kl) > 1 else 0.0
        out.append(dict(n=int(n), kl=float(kl.mean()), kl_se=se,
                        reward=float(reward.mean()), bound=math.log(n) - (n - 1) / n))
    return out
