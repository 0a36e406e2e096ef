"""
Tests of optimum.py, by enumeration on problems small enough to list every response: the optimum
pi* = pi_ref exp(r/beta) / Z, its reward and KL exactly, the sample estimators converging to them, and
Best-of-N's exact KL against brute force, with ties and without.
"""
import itertools
import math

import numpy as np
import pytest

import optimum

# a reference over four responses, as ten equally likely samples: probabilities 0.4, 0.3, 0.2, 0.1
P_REF = np.array([0.4, 0.3, 0.2, 0.1])
R = np.array([0.0, 1.0, 2.0, 3.0])
POPULATION = np.repeat(R, [4, 3, 2, 1])


def test_optimum_of_a_four_response_problem_by_hand():
    """beta = 1: Z = 0.4 + 0.3e + 0.2e^2 + 0.1e^3 = 0.4 + 0.8154845 + 1.4778112 + 2.0085537 = 4.7018495,
    log Z = 1.5479559; pi* = p e^r / Z = (0.0850729, 0.1734391, 0.3143042, 0.4271838);
    E_{pi*}[r] = 0.1734391 + 2 x 0.3143042 + 3 x 0.4271838 = 2.0835988;
    KL(pi*||pi_ref) = E_{pi*}[r]/beta - log Z = 0.5356429, which equals sum pi* log(pi*/p) computed
    directly. The ten samples that are the reference's distribution exactly give these values to
    rounding (self-normalised weights over exact multiplicities are exact), and beta log Z is the
    objective E[r] - beta KL at the optimum."""
    f = optimum.frontier_at(POPULATION[None, :], 1.0)
    pi_star = P_REF * np.exp(R) / 4.7018495
    assert pi_star == pytest.approx([0.0850729, 0.1734391, 0.3143042, 0.4271838], abs=1e-7)
    assert f["log_z"][0] == pytest.approx(1.5479559, abs=1e-7)
    assert f["reward"][0] == pytest.approx(2.0835988, abs=1e-7)
    assert f["kl"][0] == pytest.approx(0.5356429, abs=1e-7)
    assert f["kl"][0] == pytest.approx((pi_star * np.log(pi_star / P_REF)).sum(), abs=1e-7)
    assert f["reward"][0] - 1.0 * f["kl"][0] == pytest.approx(f["log_z"][0], abs=1e-12)


def test_weights_at_the_extremes_of_beta():
    """beta -> infinity: every weight 1/N, so pi* = pi_ref: KL 0, reward the samples' mean 1.0,
    effective sample size N = 10. beta -> 0: all weight on the single best sample: KL = log N = log 10
    (the ceiling of any estimate from N samples), reward 3, effective sample size 1."""
    wide, narrow = optimum.frontier_at(POPULATION[None, :], 1e6), optimum.frontier_at(POPULATION[None, :], 1e-3)
    assert wide["kl"][0] == pytest.approx(0, abs=1e-6) and wide["reward"][0] == pytest.approx(1.0, abs=1e-5)
    assert wide["ess"][0] == pytest.approx(10, abs=1e-4)
    assert narrow["kl"][0] == pytest.approx(math.log(10), abs=1e-9) and narrow["reward"][0] == 3.0
    assert narrow["ess"][0] == pytest.approx(1, abs=1e-9)


def test_sample_estimates_converge_to_the_optimum():
    """400 'prompts', each N = 2000 samples drawn from the four-response reference: the mean over prompts
    of each estimate must be within 4 standard errors (their spread over prompts / sqrt(400)) plus the
    self-normalised estimator's first-order bias, E[w^2] max|r - E*[r]| / N with E[w^2] = E_ref[e^{2r}]/Z^2
    = 53.879/22.107 = 2.437: 2.437 x 2.084 / 2000 = 0.0025 for the reward; log Z's Jensen bias is about
    E[w^2]/(2N) = 0.0006. At N = 20 the reward estimate is visibly biased low (the missing best samples)."""
    rng = np.random.default_rng(0)
    big = rng.choice(R, p=P_REF, size=(400, 2000))
    f = optimum.frontier_at(big, 1.0)
    se = lambda x: x.std(ddof=1) / math.sqrt(len(x))
    assert abs(f["reward"].mean() - 2.0835988) <= 4 * se(f["reward"]) + 0.0025
    assert abs(f["log_z"].mean() - 1.5479559) <= 4 * se(f["log_z"]) + 0.0006
    assert abs(f["kl"].mean() - 0.5356429) <= 4 * se(f["kl"]) + 0.0025 + 0.0006
    small = optimum.frontier_at(rng.choice(R, p=P_REF, size=(4000, 20)), 1.0)
    assert small["reward"].mean() < 2.0835988 - 4 * se(small["reward"])


def test_frontier_rows_trust_and_interpolation():
    """optimal_frontier over the population (one prompt): rows sorted by KL, reward rising with KL;
    a row is trusted while its median ESS >= min_ess (2 here, as N is only 10) and its KL is at least
    1 nat below the ceiling, KL <= log 10 - 1 = 1.303. optimum_reward_at interpolates linearly between trusted rows and
    returns None past the last one; below the first row it runs from (0, the reference's reward), where
    every frontier starts: halfway to the first row's KL it is halfway to its reward."""
    rows = optimum.optimal_frontier(POPULATION[None, :], [0.25, 0.5, 1.0, 2.0, 8.0], n_boot=20, min_ess=2.0)
    kls, rewards = [r["kl"] for r in rows], [r["reward"] for r in rows]
    assert kls == sorted(kls) and rewards == sorted(rewards)
    assert [r["trusted"] for r in rows] == [r["ess_median"] >= 2 and r["kl"] <= math.log(10) - 1 for r in rows]
    trusted = [r for r in rows if r["trusted"]]
    a, b = trusted[0], trusted[1]
    mid = (a["kl"] + b["kl"]) / 2
    assert optimum.optimum_reward_at(rows, mid, 1.0) == pytest.approx((a["reward"] + b["reward"]) / 2)
    assert optimum.optimum_reward_at(rows, a["kl"] / 2, 1.0) == pytest.approx((1.0 + a["reward"]) / 2)
    assert optimum.optimum_reward_at(rows, trusted[-1]["kl"] + 0.01, 1.0) is None


def brute_force_best_of(p, rewards, n):
    """Every n-tuple of responses, weighted by its probability; the first response of highest reward
    is kept. -> (KL(best-of-n || p) over responses, the expected reward)."""
    q = np.zeros(len(p))
    for tup in itertools.product(range(len(p)), repeat=n):
        best = max(tup, key=lambda i: rewards[i])  # max returns the first of equals
        q[best] += np.prod(p[list(tup)])
    keep = q > 0
    return float((q[keep] * np.log(q[keep] / p[keep])).sum()), float((q * rewards).sum())


def test_best_of_n_with_ties_against_brute_force():
    """Responses a, b, c, d with p = (0.4, 0.3, 0.2, 0.1) and rewards (1, 1, 2, 0): a and b tie.
    Reward classes 0, 1, 2 with p = 0.1, 0.7, 0.2, F = 0.1, 0.8, 1; best of 3:
    P_3 = 0.001, 0.512 - 0.001 = 0.511, 1 - 0.512 = 0.488, so KL = 0.001 ln 0.01 + 0.511 ln(0.511/0.7)
    + 0.488 ln(0.488/0.2) = -0.0046052 - 0.1608172 + 0.4352950 = 0.2698727, well below the bound
    log 3 - 2/3 = 0.4319456; E[r] = 0.511 + 2 x 0.488 = 1.487. Brute force over the 4^3 triples of
    responses gives the same KL over responses (the tie keeps a and b in the reference's proportions)."""
    p, rewards = np.array([0.4, 0.3, 0.2, 0.1]), np.array([1.0, 1.0, 2.0, 0.0])
    samples = np.repeat(rewards, [4, 3, 2, 1])
    kl, reward = optimum.best_of_n_exact(samples, 3)
    assert kl == pytest.approx(0.2698727, abs=1e-7) and reward == pytest.approx(1.487, abs=1e-12)
    assert (kl, reward) == pytest.approx(brute_force_best_of(p, rewards, 3), abs=1e-12)
    assert kl < math.log(3) - 2 / 3


def test_best_of_n_selecting_on_a_penalised_score():
    """Best-of-N selects on score = reward - penalty x cut (a response cut without an end token loses 1),
    and reports the selected response's reward. Samples (reward, cut): (2, cut), (1, not), (0, not),
    (0, not): scores 1, 1, 0, 0. Score classes 0 and 1 with p = 0.5 each; best of 2 picks class 1 with
    1 - 0.5^2 = 0.75 and class 0 with 0.25: KL = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.3040988 - 0.1732868 = 0.1308120. Within class 1
    the pick is either of its two samples (rewards 2 and 1, mean 1.5), so E[reward] = 0.75 x 1.5 +
    0.25 x 0 = 1.125; brute force over the 16 ordered pairs of samples (first of the equals kept) agrees."""
    rewards, cut = np.array([2.0, 1.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.0, 0.0])
    kl, reward = optimum.best_of_n_exact(rewards - cut, 2, rewards)
    assert kl == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-12)
    assert kl == pytest.approx(0.1308120, abs=1e-7) and reward == pytest.approx(1.125, abs=1e-12)
    brute = np.mean([rewards[max((i, j), key=lambda k: rewards[k] - cut[k])] for i in range(4) for j in range(4)])
    assert reward == pytest.approx(brute, abs=1e-12)


def test_best_of_n_without_ties_reaches_the_bound():
    """Distinct rewards, K equally likely: P_N(k) = (k^N - (k-1)^N) / K^N. Brute force agrees at K = 5,
    N = 3 (125 triples); the KL is below log N - (N-1)/N at K = 10 (0.62883 against 0.63629 for N = 4)
    and tends to it as the atoms shrink: within 1e-6 at K = 10,000 (the continuous case's value,
    log N + (N-1) int_0^1 N u^(N-1) log u du = log N - (N-1)/N)."""
    assert optimum.best_of_n_exact(np.arange(5.0), 3) == pytest.approx(brute_force_best_of(np.full(5, 0.2), np.arange(5.0), 3), abs=1e-12)
    bound = math.log(4) - 0.75
    kl10 = optimum.best_of_n_exact(np.arange(10.0), 4)[0]
    assert kl10 == pytest.approx(0.6288251, abs=1e-7) and kl10 < bound
    assert abs(optimum.best_of_n_exact(np.arange(10000.0), 4)[0] - bound) < 1e-6
    table = optimum.best_of_n_table(np.arange(10000.0)[None, :], [4])
    assert table[0]["bound"] == bound and table[0]["n"] == 4
