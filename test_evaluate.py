"""
Tests of evaluate.py: scoring in sorted batches, the held-out preference metrics against a float64
computation, the KL estimate, judges (pluggable, broken, a reward model), the win rate, Best-of-N,
and evaluating a checkpoint alone.
"""
import json
import math
import os
import contextlib
import itertools
import random
import re
from types import SimpleNamespace

import pytest
import torch

import data
import evaluate
import train
from checkpoint import load_model
from conftest import TINY, U32, float64_logps, run_train, stage_inputs, tiny_model, token_bound
from task import text


# ------------------------------------------------------------------------------------------------
# scoring and the held-out metrics

def test_score_puts_sorted_batches_back_in_order(tiny_run, tmp_path):
    """score() batches sequences sorted by length; its outputs must come back in the input order:
    for 37 sequences of mixed lengths, batches of 8, each summed log-prob equals the float64 value
    of that very sequence, to conftest's rule (a neighbour's value is off by whole nats), and each
    count is the sequence's response length."""
    cfg, run, d = stage_inputs(tmp_path, "--score_batch_size=8")
    m = load_model(f"{tiny_run[0]}/ref.pt")
    rng = random.Random(0)
    seqs = [(p, c[:rng.randint(1, len(c))]) for p, c, _ in d.train[:37]]
    lp, n = evaluate.score(cfg, run, m, seqs, d.eot)
    expected, bound, _, _ = float64_logps(m, *data.collate_sft(seqs, d.eot))
    assert n.tolist() == [len(c) for _, c in seqs]
    assert ((lp.double() - expected).abs() <= bound).all()


def test_preference_eval_scores_the_held_out_pairs(tmp_path):
    """preference_eval against an independent float64 computation on data.val: the literal
    log-probs of full logits (conftest.float64_logps), the DPO loss -log sigmoid(beta*h), accuracy =
    share of h > 0. Tolerance (conftest's rule): h is a sum of four sums of token log-probs, so its
    float32 error is at most the sum of their four bounds, and -log sigmoid is 1-Lipschitz, so the
    mean loss is within the mean of those bounds (0.011 here, where scoring the wrong set or
    swapping chosen and rejected moves it by 86). No |h| is that close to 0, so the accuracy must be exact. data.train holds the same
    pairs with chosen and rejected swapped, so scoring the wrong set gives the complement."""
    cfg, run, d = stage_inputs(tmp_path)
    d.val = d.val[:6]
    d.train = [(p, r, c) for p, c, r in d.val]
    policy, ref = tiny_model(seed=1, vocab_size=257, n_embd=64, block_size=160), tiny_model(seed=2, vocab_size=257, n_embd=64, block_size=160)
    val_ref = evaluate.score_pairs(cfg, run, ref, d.val, d.eot)[:2]
    res = evaluate.preference_eval(cfg, run, d, policy, val_ref)

    def logps(m, rows):  # -> (float64 sums, their bounds)
        return float64_logps(m, *data.collate_sft(rows, d.eot))[:2]
    parts = [logps(m, [(p, c) for p, c, _ in d.val]) + logps(m, [(p, r) for p, _, r in d.val]) for m in (policy, ref)]
    h = (parts[0][0] - parts[0][2]) - (parts[1][0] - parts[1][2])
    bound = sum(parts[0][1::2]) + sum(parts[1][1::2])  # (6,) per pair
    assert (h.abs() > bound).all()  # every sign is certain
    assert abs(res["val_loss"] - -torch.nn.functional.logsigmoid(h).mean().item()) <= bound.mean().item()
    assert res["pref_accuracy"] == (h > 0).double().mean().item()
    assert 0 < res["pref_accuracy"] < 1  # the swapped set would give 1 - accuracy


def test_kl_estimate_is_positive_and_zero_for_the_reference(tmp_path):
    """kl = mean over policy samples of log pi(y) - log pi_ref(y). A policy equal to the reference
    gives exactly 0; one whose weights are perturbed has KL(pi || pi_ref) > 0, and the estimate on
    its own samples is positive (a flipped sign would make it negative)."""
    cfg, run, d = stage_inputs(tmp_path)
    ref = tiny_model(seed=3, vocab_size=257, n_embd=64, block_size=160)
    same = tiny_model(seed=3, vocab_size=257, n_embd=64, block_size=160)
    res = evaluate.sample_eval(cfg, run, d, same, ref)
    assert res["kl"] == res["kl_analytic"] == res["kl_se"] == res["kl_analytic_se"] == 0.0
    other = tiny_model(seed=3, vocab_size=257, n_embd=64, block_size=160)
    with torch.no_grad():
        other.transformer.wte.weight.mul_(20)  # much sharper next-token distributions
    res = evaluate.sample_eval(cfg, run, d, other, ref)
    assert res["kl"] > 0.5 and res["kl_analytic"] > 0.5 and res["kl_se"] > 0 and res["kl_analytic_se"] > 0


def every_response(L, eot):
    """Every response a sampler can return over the vocabulary {0, 1, eot} with max_new_tokens = L:
    m < L tokens of {0, 1} then eot, or L tokens of {0, 1} (cut). 2^L - 1 + 2^L of them."""
    return [list(t) + [eot] for m in range(L) for t in itertools.product((0, 1), repeat=m)] + \
        [list(t) for t in itertools.product((0, 1), repeat=L)]


def test_kl_estimates_by_enumeration():
    """Both KL estimates against the exact KL of a model small enough to list every response.
    Vocabulary {0, 1, 2 = eot}, prompt [0, 1], at most L = 4 response tokens: 2^4 - 1 + 2^4 = 31
    responses, whose probabilities under the float64 model sum to 1 (checked: the list is whole).
    Exact: KL = sum_y pi(y) (log pi(y) - log pi_ref(y)), every term in float64. Each estimator is
    a function of y; its expectation under pi is sum_y pi(y) estimate(y), and both must equal KL:
    the sample one by definition, the analytic one by the chain rule of KL, and either would miss by
    a whole term if it dropped or shifted a position (the first response token, say, predicted at
    the prompt's last position). The float32 estimates differ from float64 per position by at most
    (3 + max|log p - log q|) token_bound: 2 token_bounds from the two log-softmaxes, one from
    exp(log p)'s relative error times |log p - log q|, so per response L times that; the weights
    sum to 1, so the expectations keep the bound (exact KL 0.61 here). The analytic terms are KLs, so A(y) >= 0 for
    every y, while the sample estimate is negative on some responses (the reason it varies more)."""
    eot, L, prompt = 2, 4, [0, 1]
    ref = tiny_model(seed=1, vocab_size=3, block_size=16)
    policy = tiny_model(seed=2, vocab_size=3, block_size=16)
    with torch.no_grad():
        policy.lm_head.weight.mul_(8)  # sharper next-token distributions: a KL of about a nat
    ys = every_response(L, eot)
    ids, mask = data.collate_sft([(prompt, y) for y in ys], eot)
    lp, _, zp, _ = float64_logps(policy, ids, mask)
    lq, _, zq, _ = float64_logps(ref, ids, mask)
    pi = lp.exp()
    assert abs(pi.sum().item() - 1) < 1e-12  # every response listed, none twice
    exact = (pi * (lp - lq)).sum().item()
    cfg, run = SimpleNamespace(score_batch_size=8), SimpleNamespace(ctx=contextlib.nullcontext(), device="cpu")
    sample_kl, analytic_kl = evaluate.kl_estimates(cfg, run, policy, ref, [(prompt, y) for y in ys], eot)
    bound = L * (3 + 2 * (zp + zq)) * token_bound(max(zp, zq))  # |log p - log q| <= 2 (|z_p| + |z_q|)
    assert 0.5 < exact
    assert abs((pi * sample_kl).sum().item() - exact) <= bound
    assert abs((pi * analytic_kl).sum().item() - exact) <= bound
    assert (sample_kl - (lp - lq)).abs().max().item() <= bound  # each response's own, in input order
    assert (analytic_kl >= 0).all() and (sample_kl < 0).any()
    var = lambda est: (pi * (est - exact) ** 2).sum().item()
    assert var(analytic_kl) < var(sample_kl) / 2  # here 0.23 against 1.04 (not a theorem: this model's)


# ------------------------------------------------------------------------------------------------
# judges

def test_win_rate_counts_ties_half():
    """Verdicts 0 (policy wins), None (tie), 1 (reference wins), 0: (1 + 0.5 + 0 + 1) / 4 = 0.625."""
    assert evaluate.win_rate([0, None, 1, 0]) == 0.625


def judge_that_raises(prompt, a, b):
    raise RuntimeError("reward model offline")


def judge_that_returns_two(prompt, a, b):
    return 2


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:judge", "--judge=no_such_module_xyz:judge: cannot load it"),
    ("test_evaluate:no_such_function", "--judge=test_evaluate:no_such_function: cannot load it"),
    ("test_evaluate:judge_that_raises", "judge test_evaluate:judge_that_raises raised RuntimeError: reward model offline"),
    ("test_evaluate:judge_that_returns_two", "judge test_evaluate:judge_that_returns_two returned 2; it must return 0, 1 or None"),
])
def test_bad_judges_name_themselves(tiny_run, tmp_path, spec, message):
    """A judge that cannot be imported, does not exist, raises, or returns something other than 0, 1 or
    None stops the run with its name."""
    ref = os.path.join(tiny_run[0], "ref.pt")
    with pytest.raises(SystemExit, match=re.escape(message)):
        run_train(tmp_path, f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=2", "--online=True", f"--judge={spec}")


# ------------------------------------------------------------------------------------------------
# Best-of-N; evaluating a checkpoint

def independent_best_of(cfg, run, d, ref, score_fn):
    """Best-of-N outside evaluate.best_of_n: the same cfg.best_of samples per held-out prompt drawn
    again (the reference's own distribution, the policy's evaluation seed), scored by
    score_fn(prompts, outs) minus 1 (no_eos_penalty) where cut without an end token; each prompt's
    first highest. -> (the samples, the picks)."""
    n = cfg.best_of
    prompts = [p for p in d.eval_ids for _ in range(n)]
    outs = evaluate.sample(cfg, run, ref, prompts, cfg.policy_seed + 1, d.eot, temperature=1.0, top_k=0)
    scores = score_fn(prompts, outs) - torch.tensor([float(r[-1] != d.eot) for r in outs])
    return outs, [outs[n * i + int(k)] for i, k in enumerate(scores.view(-1, n).argmax(1))]


def test_best_of_n_keeps_the_judges_best_of_each_prompt(tiny_run, tmp_path):
    """best_of_n against an independent pick: the same N = 4 samples per prompt drawn again from
    the reference's own distribution with the policy's evaluation seed, scored as PPO scores them:
    the task's exact reward, minus no_eos_penalty = 1 for a response cut at max_new_tokens (24
    here, so many are); each pick is the first of the highest-scored of its prompt's four. A whole
    run does no training and reports the bound log 4 - 3/4 = 0.636294 as kl_bound, no sampled kl."""
    cfg, run, d = stage_inputs(tmp_path / "unit", "--method=best_of_n", "--best_of=4")
    ref = load_model(os.path.join(tiny_run[0], "ref.pt"), "cpu").eval()
    picks = evaluate.best_of_n(cfg, run, d, ref)
    outs, expected = independent_best_of(cfg, run, d, ref, lambda prompts, outs: torch.tensor(
        [d.task.reward(d.enc.decode(p), text(d, r)) for p, r in zip(prompts, outs)], dtype=torch.float))
    assert any(r[-1] != d.eot for r in outs) and any(r[-1] == d.eot for r in outs)  # the penalty matters here
    assert picks == expected
    res = run_train(tmp_path / "run", f"--init_from={tiny_run[0]}/ref.pt", "--sft_iters=0", "--method=best_of_n", "--best_of=4")
    assert res["kl_bound"] == pytest.approx(math.log(4) - 0.75) and "kl" not in res
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt") and os.path.exists(tmp_path / "run" / "eval.json")


def test_best_of_n_ranks_by_a_reward_model(tiny_run, tiny_rm, tmp_path):
    """Best-of-N with --reward_model ranks by the reward model's score: its picks are the samples
    whose score, read independently with score() and minus the no-eos penalty, is highest of their
    prompt's N = 2; the bound log 2 - 1/2 is reported."""
    rm = str(tiny_rm[0] / "ckpt.pt")
    cfg, run, d = stage_inputs(tmp_path / "unit", "--method=best_of_n", "--best_of=2", f"--reward_model={rm}")
    ref = load_model(os.path.join(tiny_run[0], "ref.pt"), "cpu").eval()
    picks = evaluate.best_of_n(cfg, run, d, ref)
    scorer = load_model(rm, "cpu", kind="ScalarGPT").eval()
    _, expected = independent_best_of(cfg, run, d, ref, lambda prompts, outs: evaluate.score(
        cfg, run, scorer, list(zip(prompts, outs)), d.eot)[0])
    assert picks == expected
    res = run_train(tmp_path / "run", f"--init_from={tiny_run[0]}/ref.pt", "--sft_iters=0", "--method=best_of_n",
                    "--best_of=2", f"--reward_model={rm}")
    assert res["kl_bound"] == pytest.approx(math.log(2) - 0.5)


def test_eval_only_samples_a_checkpoint(tiny_run, capsys):
    """--eval_only evaluates a checkpoint against the ref.pt beside it with the same seeds as the
    run's final evaluation, so it reproduces that evaluation exactly (every metric but the times),
    and samples --prompt from both models."""
    out, final = tiny_run
    res = train.main(TINY + [f"--init_from={out}/ckpt.pt", "--eval_only=True", f"--out_dir={out}",
                             "--prompt=Honestly, the comedy felt", "--beta=0.5"])  # the run's beta
    shown = capsys.readouterr().out
    assert "policy: 'Honestly, the comedy felt' ->" in shown and "reference: " in shown
    assert {k: v for k, v in res.items() if "seconds" not in k} == \
        {k: v for k, v in final.items() if "seconds" not in k}


def test_a_collapsed_policy_is_reported_and_fails_the_run(tiny_run, tmp_path):
    """The collapse rule by hand: KL 30 nats over 100 tokens is 0.3 per token, over --collapse_kl=0.25:
    collapsed; 20 over 100 (0.2) is not; 0 turns the rule off; a Best-of-N result (no kl) is never
    judged. Then a real one: 6 DPO steps at lr 5e-3 wreck the tiny model (measured: KL 14.7 nats over
    24 tokens); the run writes eval.json with 'collapsed' and its reason, logs the final line, and
    exits with 1 and one line; with the rule off the same run returns normally."""
    cfg = train.parse_config(["--collapse_kl=0.25"])
    assert "0.30 per token > --collapse_kl=0.25" in evaluate.collapse(cfg, dict(kl=30.0, policy_mean_length=100.0))
    assert evaluate.collapse(cfg, dict(kl=20.0, policy_mean_length=100.0)) is None
    assert evaluate.collapse(cfg, dict(kl_bound=3.0, policy_mean_length=100.0)) is None
    cfg.collapse_kl = 0
    assert evaluate.collapse(cfg, dict(kl=300.0, policy_mean_length=1.0)) is None
    args = [f"--init_from={tiny_run[0]}/ref.pt", "--sft_iters=0", "--dpo_iters=6", "--dpo_lr=5e-3", "--eval_samples=8"]
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "a", *args, "--collapse_kl=0.25")
    assert e.value.code.startswith("the policy collapsed (KL ") and "\n" not in e.value.code
    result = json.load(open(tmp_path / "a" / "eval.json"))
    assert result["collapsed"].endswith("per token > --collapse_kl=0.25") and result["kl"] / result["policy_mean_length"] > 0.25
    assert "collapsed" not in run_train(tmp_path / "b", *args)  # TINY has --collapse_kl=0
