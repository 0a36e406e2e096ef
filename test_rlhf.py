"""
Tests of rlhf.py: a rollout's scores with the no-eos penalty, PPO's first iteration and exact
resume, PPO on a reward model's scores, GRPO's and RLOO's group advantages in a rollout, their exact
resume in one process and under torchrun, the divergence guard, and bad RLHF inputs.
"""
import os
import re

import pytest
import torch

import rlhf
import reviews
from checkpoint import load_model
from conftest import RLHF, TINY, read_metrics, run_train, stage_inputs
from test_checkpoint import torchrun
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


def test_group_rollout_advantages(tiny_run, tmp_path):
    """GRPO and RLOO rollouts of 3 prompts x group_size 4: each response's score is the task's
    reward minus the no-eos penalty; its total is score - kl_coef x its summed log pi/pi_ref (0.7
    here; the policy is a perturbed copy of the reference, so the KL terms are not 0); the advantage
    of every token of a response is group_advantages of the group's totals (tested by hand in
    test_ppo.py), 0 at the padding; no values or returns exist; tied is the share of groups whose
    totals all tie. With kl_penalty=loss the totals are the scores alone."""
    cfg, run, d = stage_inputs(tmp_path, "--method=grpo", "--group_size=4", "--rollout_batch=12", "--ppo_minibatch=4",
                               "--max_new_tokens=12")
    reference = load_model(f"{tiny_run[0]}/ref.pt", "cpu")
    policy = load_model(f"{tiny_run[0]}/ref.pt", "cpu")
    with torch.no_grad():
        policy.lm_head.weight.mul_(1.5)
    prompts = [d.train[i][0] for i in range(3) for _ in range(4)]
    for method, penalty in (("grpo", "reward"), ("rloo", "reward"), ("grpo", "loss")):
        cfg.method, cfg.kl_penalty = method, penalty
        ep = rlhf.rollout(cfg, run, d, policy, reference, None, None, prompts, 0, 0.7)
        assert ep.values is None and ep.returns is None and (ep.kl != 0).all()
        total = ep.scores - (0.7 * ep.kl if penalty == "reward" else 0)
        expected = rlhf.P.group_advantages(total.view(3, 4), method).view(-1)
        assert torch.equal(ep.advantages, expected[:, None] * ep.rmask)
        groups = total.view(3, 4)
        assert ep.tied.item() == (groups.amax(1) == groups.amin(1)).float().mean().item()  # logged as 'tied'


def test_critic_free_exact_resume_and_no_value_model(tiny_run, tmp_path, method="rloo"):
    """RLOO-GT (GRPO: the same loop, under torchrun below), 4 iterations in one go equal 2 + stop + resume for 2 more (policy,
    optimizer, prompt order, sampling and minibatch seeds restored): every logged statistic agrees.
    The first KL is exactly 0 (the policy starts as the reference). No value model is built: the
    checkpoint holds none, and its stage is the method's."""
    args = [f"--method={method}", "--ppo_iters=4", "--group_size=2", *RLHF]
    run_train(tmp_path / "a", f"--init_from={tiny_run[0]}/ref.pt", *args)
    run_train(tmp_path / "b", f"--init_from={tiny_run[0]}/ref.pt", *args, "--stop_at=2")
    run_train(tmp_path / "b", "--init_from=resume", *args)
    drop = ("sample_s", "score_s", "update_s", "elapsed")
    a, b = ([{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / d) if r["stage"] == method]
            for d in ("a", "b"))
    assert a[0]["kl"] == 0.0 and len(a) == 4 and a == b and "value_loss" not in a[0]
    ck = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert ck["stage"] == method and not {"value", "value_optimizer"} & set(ck)


def test_grpo_under_torchrun_resumes_exactly(tiny_run, tmp_path):
    """GRPO in two processes (gloo): each samples its own 4 prompts x 2 responses, the gradients are
    averaged. 3 iterations in one go equal 1 + stop + resume for 2 more: the same logged statistics
    (each averaged over both ranks) and the same final weights, bit for bit."""
    args = [*TINY, f"--init_from={tiny_run[0]}/ref.pt", "--method=grpo", "--ppo_iters=3", "--group_size=2", *RLHF,
            "--eval_samples=2"]
    torchrun(tmp_path / "a", *args)
    torchrun(tmp_path / "b", *args, "--stop_at=1")
    torchrun(tmp_path / "b", "--init_from=resume")
    drop = ("sample_s", "score_s", "update_s", "elapsed")
    a, b = ([{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / d) if r["stage"] == "grpo"]
            for d in ("a", "b"))
    assert len(a) == 3 and a == b
    wa, wb = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_grpo_divergence_stops_before_a_bad_checkpoint(tiny_run, tmp_path):
    """--ppo_lr=1e3: AdamW's first step moves every weight by about 1e3, so the weights' norm grows
    far more than 2x at GRPO step 1 and the run stops there, naming ref.pt; no ckpt.pt is written."""
    with pytest.raises(SystemExit, match=r"grpo step 1: the weights' norm went from .* The last good checkpoint is "
                                         r".*ref.pt \(the SFT model"):
        run_train(tmp_path, f"--init_from={tiny_run[0]}/ref.pt", "--method=grpo", "--ppo_iters=2", "--group_size=2",
                  "--ppo_lr=1e3", "--ckpt_interval=1", *RLHF)
    assert not os.path.exists(tmp_path / "ckpt.pt")


def test_ppo_rm_and_a_reward_model_as_judge(tiny_run, tiny_rm, tmp_path):
    """PPO-RM scores rollouts with the reward model, which also serves as --judge; the run ends
    with the usual evaluation, whose win rate is the share the reward model prefers."""
    rm = f"{tiny_rm[0]}/ckpt.pt"
    res = run_train(tmp_path, f"--init_from={tiny_run[0]}/ref.pt", "--method=ppo", "--ppo_iters=2",
                    f"--reward_model={rm}", f"--judge={rm}", *RLHF)
    assert set(("kl", "win_rate", "policy_reward", "valid_fraction")) <= set(res)


def test_rloo_on_a_reward_model(tiny_run, tiny_rm, tmp_path):
    """RLOO-RM: the groups are scored by the reward model (no value model is built from it or from
    anything else); the run ends with the usual evaluation."""
    res = run_train(tmp_path, f"--init_from={tiny_run[0]}/ref.pt", "--method=rloo", "--ppo_iters=1", "--group_size=2",
                    f"--reward_model={tiny_rm[0]}/ckpt.pt", *RLHF)
    assert set(("kl", "kl_analytic", "win_rate", "policy_reward")) <= set(res)
    assert "value" not in torch.load(tmp_path / "ckpt.pt", weights_only=True)


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
             (["--method=ppo", "--precompute_ref=True"], "--precompute_ref=True is a DPO setting"),
             (["--method=grpo", "--group_size=3"], "bad value for --group_size: 3 (must be >= 2 and, for grpo and rloo, a divisor"),
             (["--method=rloo", "--group_size=1"], "bad value for --group_size: 1"),
             (["--method=ppo", "--kl_penalty=loss"], "bad value for --kl_penalty: 'loss' (must be 'reward', or 'loss' with")]
    for i, (args, message) in enumerate(cases):
        with pytest.raises(SystemExit, match=re.escape(message)):
            run_train(tmp_path / f"bad{i}", *RLHF, *args)
