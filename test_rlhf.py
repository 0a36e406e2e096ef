"""
Tests of rlhf.py: a rollout's scores with the no-eos penalty, PPO's first iteration and exact
resume, PPO on a reward model's scores, and bad RLHF inputs.
"""
import re

import pytest
import torch

import rlhf
import reviews
from checkpoint import load_model
from conftest import RLHF, read_metrics, run_train, stage_inputs
from model import ScalarGPT


def test_rollout_scores_truncated_responses_with_a_penalty(tiny_run, tmp_path):
    """With max_new_tokens = 4 every sample of the barely trained reference is cut before its end
    token, so each score is the task's exact reward of the text minus no_eos_penalty = 1.5; the
    per-token KL against itself is 0, so the GAE returns at the first token (gamma = lambda = 1)
    equal the scores."""
    cfg, run, d = stage_inputs(tmp_path, "--max_new_tokens=4", "--no_eos_penalty=1.5", "--lam=1.0")
    policy = load_model(f"{tiny_run[0]}/ref.pt", "cpu")
    value = ScalarGPT.from_model(policy)
    prompts = [d.train[i][0] for i in range(6)]
    ep = rlhf.rollout(cfg, run, d, policy, policy, value, None, prompts, 0, 1.0)
    assert ep.truncated.tolist() == [1.0] * 6
    texts = [d.enc.decode(ids[m].tolist()) for ids, m in zip(ep.ids, ep.mask)]
    expected = [reviews.reward(None, t) - 1.5 for t in texts]
    assert ep.scores.tolist() == pytest.approx(expected) and ep.returns[:, 0].tolist() == pytest.approx(expected)


def test_ppo_first_iteration_and_exact_resume(tiny_run, tmp_path):
    """PPO-GT: the first rollout's old log-probs come from the policy, which is the reference, so
    the first iteration's KL is exactly 0. 4 iterations in one go equal 2 + stop + resume for 2 more
    (policy, value model, both optimizers, prompt order, sampling and minibatch seeds restored):
    the logged records agree in every statistic."""
    ref = f"--init_from={tiny_run[0]}/ref.pt"
    run_train(tmp_path / "a", ref, "--method=ppo", "--ppo_iters=4", *RLHF)
    run_train(tmp_path / "b", ref, "--method=ppo", "--ppo_iters=4", "--stop_at=2", *RLHF)
    run_train(tmp_path / "b", "--init_from=resume", "--method=ppo", "--ppo_iters=4", *RLHF)
    drop = ("sample_s", "score_s", "update_s", "elapsed")
    a, b = ([{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / d) if r["stage"] == "ppo"]
            for d in ("a", "b"))
    assert a[0]["kl"] == 0.0 and len(a) == 4 and a == b
    ck = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert ck["kind"] == "GPT" and {"value", "value_optimizer"} <= set(ck)


def test_ppo_rm_and_a_reward_model_as_judge(tiny_run, tiny_rm, tmp_path):
    """PPO-RM scores rollouts with the reward model, which also serves as --judge; the run ends
    with the usual evaluation, whose win rate is the share the reward model prefers."""
    rm = f"{tiny_rm[0]}/ckpt.pt"
    res = run_train(tmp_path, f"--init_from={tiny_run[0]}/ref.pt", "--method=ppo", "--ppo_iters=2",
                    f"--reward_model={rm}", f"--judge={rm}", *RLHF)
    assert set(("kl", "win_rate", "policy_reward", "valid_fraction")) <= set(res)


def test_rlhf_bad_inputs_name_themselves(tiny_run, tiny_rm, tmp_path):
    """A policy checkpoint given as reward model, a reward model given as policy, out-of-range
    kl_coef, clip_range, gamma or minibatch, and DPO-only settings stop with one line naming them."""
    ref = f"{tiny_run[0]}/ref.pt"
    cases = [([f"--init_from={ref}", "--method=ppo", f"--reward_model={ref}"], "holds a language model (policy), where a reward model is needed"),
             ([f"--init_from={tiny_rm[0]}/ckpt.pt", "--method=ppo"], "holds a reward model, where a language model (policy) is needed"),
             (["--method=ppo", "--kl_coef=-1"], "bad value for --kl_coef: -1.0 (must be >= 0)"),
             (["--method=ppo", "--clip_range=1.5"], "bad value for --clip_range: 1.5 (must be in (0, 1))"),
             (["--method=ppo", "--gamma=0"], "bad value for --gamma: 0.0 (must be in (0, 1])"),
             (["--method=ppo", "--ppo_minibatch=3"], "bad value for --ppo_minibatch: 3 (must be a divisor of --rollout_batch)"),
             (["--method=dpo", f"--reward_model={ref}"], "bad value for --reward_model"),
             (["--method=ppo", "--precompute_ref=True"], "--precompute_ref=True is a DPO setting")]
    for i, (args, message) in enumerate(cases):
        with pytest.raises(SystemExit, match=re.escape(message)):
            run_train(tmp_path / f"bad{i}", *RLHF, *args)
