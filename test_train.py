"""
Tests of train.py (and bench.py): the stages as units, then tiny end-to-end runs: smoke, resume,
DDP, configuration errors, online DPO and judges, every loss type, a GPT-2 folder.
"""
import base64
import functools
import gzip
import importlib.util
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import data
import train
from conftest import TOKEN_ULPS, U32, float64_logps
from model import GPT, ScalarGPT, load_checkpoint, load_model, save_checkpoint
from test_model import Payload, hf_state_dict, tiny_model, write_config, write_safetensors


HERE = os.path.dirname(os.path.abspath(__file__))


TINY = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=160", "--batch_size=8", "--sft_batch_size=16",
        "--eval_pairs=32", "--eval_samples=8", "--max_new_tokens=24", "--show_samples=1", "--log_interval=1",
        "--dtype=float32", "--warmup_iters=2"]


@pytest.fixture(autouse=True, scope="module")
def task_built_once():
    """Every run in this file builds the same reviews task (seed 1337, 0.5 s each): build it once."""
    original = data.make_task
    data.make_task = functools.lru_cache(original)
    yield
    data.make_task = original


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    """The first 400 training pairs of the reviews task as a .jsonl preference file: for runs whose
    test needs a whole pass over the data (a precomputed reference), not the task's 10,000 pairs."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in data.make_task(seed=1337)["train"][:400]))
    return str(path)


def stage_inputs(tmp_path, *args):
    """cfg, run and tokenized data of the tiny reviews setting, as main builds them."""
    cfg = train.parse_config(TINY + [f"--out_dir={tmp_path}", *args])
    run = train.setup(cfg)
    d = train.load_data(cfg, run)
    train.tokenize(cfg, run, d, 160)
    return cfg, run, d


# ------------------------------------------------------------------------------------------------
# the stages as units: schedule, clipping, prompts, judges, checkpoints, the reference, the objective

def test_lr_schedule_warmup_constant_and_cosine():
    """lr_at(step, peak=1e-3, warmup=10, ...): step 0 gets peak*1/10 = 1e-4 (never 0), step 4 gets
    peak*5/10 = 5e-4, step 9 the peak; constant after that. Cosine over total=110 steps: at step 10
    frac = 0 -> peak*(0.1 + 0.9*0.5*(1+cos 0)) = peak; at step 60 frac = 0.5 -> peak*(0.1 + 0.45)
    = 5.5e-4; at step 110 frac = 1 -> 0.1*peak = 1e-4. No warm-up: step 0 already has the peak."""
    lr = lambda s, cosine=False, warmup=10: train.lr_at(s, 1e-3, warmup, 110, cosine)
    assert [lr(0), lr(4), lr(9), lr(50)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3], rel=1e-12)
    assert [lr(10, True), lr(60, True), lr(110, True)] == pytest.approx([1e-3, 5.5e-4, 1e-4], rel=1e-12)
    assert lr(0, warmup=0) == 1e-3


def test_clip_and_step_clips_then_steps():
    """A gradient (3, 4) has norm 5. With plain SGD at lr 1 the step is minus the clipped gradient:
    clip 1 -> w = -(0.6, 0.8); clip 0 (off) -> w = -(3, 4). The norm before clipping (5) is
    returned and the gradient cleared. A non-finite gradient returns a non-finite norm and leaves
    the weights as they were."""
    for clip, expected in ((1.0, [-0.6, -0.8]), (0.0, [-3.0, -4.0])):
        w = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([w], lr=1.0)
        w.grad = torch.tensor([3.0, 4.0])
        assert train.clip_and_step([w], opt, clip).item() == pytest.approx(5.0)
        assert w.detach().tolist() == pytest.approx(expected) and w.grad is None
    w.grad = torch.tensor([float("nan"), 1.0])
    assert not torch.isfinite(train.clip_and_step([w], opt, 1.0))
    assert w.detach().tolist() == pytest.approx([-3.0, -4.0])


def test_prompt_ids_keep_the_end_of_a_long_prompt():
    """Byte tokens: 'abcdef' with room for 4 tokens keeps 'cdef' (a response continues the end of
    its prompt); a short prompt is kept whole; an empty one becomes [eot] = [256]."""
    enc = data.get_tokenizer("bytes")
    assert train.prompt_ids(enc, "abcdef", 4) == list(b"cdef")
    assert train.prompt_ids(enc, "ab", 4) == list(b"ab")
    assert train.prompt_ids(enc, "", 4) == [256]


def test_win_rate_counts_ties_half():
    """Verdicts 0 (policy wins), None (tie), 1 (reference wins), 0: (1 + 0.5 + 0 + 1) / 4 = 0.625."""
    assert train.win_rate([0, None, 1, 0]) == 0.625


def test_reference_is_frozen_and_in_eval_mode(tmp_path):
    """With --dropout=0.5 the policy drops units, but the reference is loaded in eval mode with no
    parameter requiring a gradient, so two forwards of it agree exactly; reference-free: None."""
    cfg = train.parse_config(TINY + [f"--out_dir={tmp_path}", "--dropout=0.5"])
    run = train.setup(cfg)
    m = tiny_model(vocab_size=257, n_embd=64, block_size=160, dropout=0.5)
    save_checkpoint(str(tmp_path / "ref.pt"), m)
    ref = train.load_reference(cfg, run, str(tmp_path / "ref.pt"))
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    ids = torch.randint(0, 257, (2, 20))
    assert torch.equal(ref(ids), ref(ids))
    cfg.reference_free = True
    assert train.load_reference(cfg, run, str(tmp_path / "ref.pt")) is None


def test_objective_of_each_method_by_hand():
    """Two pairs (batch_size 2, 1 micro-step), beta 1. Summed log-probs: chosen (-2, -4) over (2, 4)
    tokens, rejected (-3, -3). Preferred-FT: NLL per chosen token = (2 + 4) / (2 + 4) = 1, a positive
    loss (minimising it raises log pi(y_w)); its gradient on each chosen log-prob is -1/6.
    Reference-free DPO: h = pc - pr = (1, -1) -> losses log(1 + e^-1) = 0.313262 and log(1 + e) =
    1.313262, summed over the step's 2 pairs / 2 = 0.813262. With a reference (-2.5, -3.5 | -3, -3):
    h = (0.5, -0.5), implicit rewards (0.5, -0.5) and (0, 0). Reward model: the same numbers read as
    scores, Bradley-Terry -log sigmoid(r_w - r_l) = the reference-free losses; accuracy 1/2."""
    pc = torch.tensor([-2.0, -4.0], requires_grad=True)
    pr, nc, nr = torch.tensor([-3.0, -3.0]), torch.tensor([2.0, 4.0]), torch.tensor([3.0, 3.0])
    cfg = train.parse_config(["--method=preferred_ft", "--batch_size=2"])
    loss, stats = train.objective(cfg, pc, pr, nc, nr, None, None, 1)
    assert loss.item() == pytest.approx(1.0) and stats[0].item() == pytest.approx(1.0)
    loss.backward()
    assert pc.grad.tolist() == pytest.approx([-1 / 6, -1 / 6])
    l1, l2 = math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))
    for method in ("dpo", "reward_model"):
        cfg = train.parse_config([f"--method={method}", "--batch_size=2"])
        loss, stats = train.objective(cfg, pc, pr, nc, nr, None, None, 1)
        assert loss.item() == pytest.approx((l1 + l2) / 2) and stats[0].item() == pytest.approx((l1 + l2) / 2)
        assert stats[3].item() == 0.5
    cfg = train.parse_config(["--batch_size=2"])
    loss, stats = train.objective(cfg, pc, pr, nc, nr, torch.tensor([-2.5, -3.5]), torch.tensor([-3.0, -3.0]), 1)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(0.5))) / 2)
    assert stats[1:3].tolist() == pytest.approx([0.0, 0.0])  # mean of (0.5, -0.5), mean of (0, 0)
    # Unlikelihood, alpha 0.5, penalised rejected tokens at p = 0.5 and 0.75: 1 + 0.5 * (log 2 + log 4) / 2
    cfg = train.parse_config(["--method=unlikelihood", "--alpha=0.5", "--batch_size=2"])
    ul = torch.log(torch.tensor([0.5, 0.75]))
    loss, stats = train.objective(cfg, pc, pr, nc, nr, None, None, 2, ul)  # 2 micro-steps: half of it
    assert loss.item() == pytest.approx((1 + 0.75 * math.log(2)) / 2) and stats[0].item() == pytest.approx(1 + 0.75 * math.log(2))


def prefer_shorter(prompt, a, b):
    """A toy judge for the tests: the shorter response wins; equal lengths tie."""
    return None if len(a) == len(b) else (0 if len(a) < len(b) else 1)


def test_online_batch_puts_the_judges_pick_first(tmp_path):
    """Online pairs: two samples per prompt, the judge's winner as 'chosen'. With a judge that
    prefers the shorter text, every chosen response is shorter than its rejected one; ties (equal
    lengths) are counted and dropped, so pairs + ties = the 8 prompts."""
    cfg, run, d = stage_inputs(tmp_path, "--judge=test_train:prefer_shorter")
    policy = tiny_model(vocab_size=257, n_embd=64, block_size=160)
    prompts = [d.train[i][0] for i in range(8)]
    stats = dict(pairs=0, ties=0)
    batch = train.online_batch(cfg, run, d, policy, prompts, stats, (0, 0, 0, 0))
    assert stats["pairs"] == len(batch) > 0 and stats["pairs"] + stats["ties"] == 8
    assert all(len(train.text(d, c)) < len(train.text(d, r)) for _, c, r in batch)


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
    val_ref = train.score_pairs(cfg, run, ref, d.val, d.eot)[:2]
    res = train.preference_eval(cfg, run, d, policy, val_ref)

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
    assert train.sample_eval(cfg, run, d, same, ref)["kl"] == 0.0
    other = tiny_model(seed=3, vocab_size=257, n_embd=64, block_size=160)
    with torch.no_grad():
        other.transformer.wte.weight.mul_(20)  # much sharper next-token distributions
    assert train.sample_eval(cfg, run, d, other, ref)["kl"] > 0.5


# ------------------------------------------------------------------------------------------------
# tiny end-to-end runs: smoke, resume, DDP, configuration errors, online DPO and judges, speed paths

def run_train(out, *args):
    return train.main(TINY + [f"--out_dir={out}", *args])


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run from scratch: SFT, DPO, evaluation. Its ref.pt serves the other tests."""
    out = str(tmp_path_factory.mktemp("tiny"))
    result = run_train(out, "--sft_iters=80", "--sft_lr=3e-3", "--dpo_iters=16", "--dpo_lr=5e-4", "--beta=0.5", "--eval_interval=8")
    return out, result


def test_train_smoke(tiny_run):
    """The files appear; at DPO step 1 the policy IS the reference, so every implicit reward is 0,
    the loss is exactly log 2 = 0.693147 and no pair is ranked right (accuracy 0, ties count as
    wrong). After 16 steps at a high learning rate the loss has fallen and the held-out accuracy
    is well above the 0.5 of a coin."""
    out, result = tiny_run
    for f in ("ref.pt", "ckpt.pt", "config.json", "metrics.jsonl", "eval.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    with open(os.path.join(out, "eval.json")) as f:
        ev = json.load(f)
    for k in ("policy_reward", "reference_reward", "win_rate", "kl", "valid_fraction", "pref_accuracy", "wall_seconds"):
        assert k in ev and math.isfinite(ev[k]), k
    dpo = [r for r in read_metrics(out) if r["stage"] == "dpo"]
    assert dpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)  # float32's log 2: policy and reference run
    assert dpo[0]["rewards/accuracies"] == 0.0 and dpo[0]["rewards/margins"] == 0.0  # the same kernels on one input
    assert sum(r["loss"] for r in dpo[-4:]) / 4 < math.log(2) - 0.1
    assert ev["pref_accuracy"] > 0.6
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["step"] == 16 and ck["config"]["dpo_iters"] == 16
    assert not any(k.startswith("_orig_mod.") for k in ck["model"])


def test_resume_matches_uninterrupted_run(tiny_run, tmp_path):
    """6 DPO steps in one go, and 3 steps + stop + resume for 3 more, give the same per-step
    losses (same weights, optimizer state, batches and RNG after the restart). Dropout 0.1 makes
    every step draw masks from torch's RNG, so the RNG state must be restored too: a resumed run
    that re-seeds instead draws other masks from step 4 on."""
    ref = os.path.join(tiny_run[0], "ref.pt")
    common = [f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=6", "--dpo_lr=1e-3", "--eval_samples=4", "--dropout=0.1"]
    run_train(tmp_path / "a", *common)
    run_train(tmp_path / "b", *common, "--stop_at=3")
    assert not os.path.exists(tmp_path / "b" / "eval.json")  # a stopped run does not evaluate
    run_train(tmp_path / "b", *common[1:], "--init_from=resume")
    la = [r["loss"] for r in read_metrics(tmp_path / "a") if r["stage"] == "dpo"]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b") if r["stage"] == "dpo"]
    assert len(la) == len(lb) == 6
    assert la == lb


def test_ddp_matches_single_process(tiny_run, small_file, tmp_path):
    """torchrun with 2 CPU processes (gloo), 4 pairs each, 1 micro-step, equals one process with
    4 pairs x 2 micro-steps: the same 8 pairs per step, gradients averaged the same way, so the
    updates after 3 steps agree to float tolerance: |w_ddp - w_single| / |w_single - w_0| < 1e-3.
    The first step's gradient norm (before clipping, logged) agrees to 64 u = 3.8e-6 relative (conftest's
    rule for one token, u = 2^-24: the two runs add the same per-pair terms in another order, over
    another thread count; measured 1-2 u): AdamW would hide a gradient off by a constant factor (a
    wrong division by processes), the norm does not.
    (Not elementwise: the key bias gets a gradient that is exactly 0 in exact arithmetic, since a
    constant added to every key's score cancels in the softmax; Adam divides the ~1e-10 rounding
    noise by its own tiny scale and turns it into updates of either sign.)"""
    ref = os.path.join(tiny_run[0], "ref.pt")
    common = [f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=3", "--dpo_lr=1e-3", "--batch_size=4",
              "--grad_accum=2", "--eval_samples=4", f"--data={small_file}"]
    run_train(tmp_path / "single", *common)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *TINY, *common, f"--out_dir={tmp_path / 'ddp'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    a = torch.load(tmp_path / "single" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["model"]
    start = torch.load(ref, weights_only=True)["model"]
    moved = sum(((a[k] - start[k]) ** 2).sum() for k in a).sqrt()
    apart = sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt()
    assert moved > 0.1 and apart / moved < 1e-3, (moved, apart)
    ga, gb = (read_metrics(tmp_path / d)[0]["grad_norm"] for d in ("single", "ddp"))
    assert gb == pytest.approx(ga, rel=TOKEN_ULPS * U32)


def test_grad_accum_equals_one_larger_batch(tiny_run, tmp_path):
    """2 micro-steps of 4 pairs take the same 8 pairs as 1 micro-step of 8 (Batches cuts one
    permutation), and each micro-step's loss is divided by 4 * 2, so the summed gradient is the
    gradient of the mean over 8 pairs: the same first-step loss (exactly float32's log 2: the policy is
    the reference) and gradient norm, to 64 u = 3.8e-6 relative (conftest's rule for one token; the
    sums run in another order and batch shape; measured 1-2 u on default, AVX2 and AVX-512 kernels).
    Without the division the norm would double."""
    ref = os.path.join(tiny_run[0], "ref.pt")
    common = [f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=1", "--eval_samples=4", "--beta=0.5"]
    run_train(tmp_path / "one", *common, "--batch_size=8")
    run_train(tmp_path / "two", *common, "--batch_size=4", "--grad_accum=2")
    a, b = (read_metrics(tmp_path / d)[0] for d in ("one", "two"))
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=TOKEN_ULPS * U32) and a["grad_norm"] > 0
    assert b["loss"] == a["loss"] == pytest.approx(math.log(2), abs=1e-7)


def test_bf16_live_reference_and_held_out_reference(tiny_run, tmp_path):
    """Under bf16 autocast the live reference runs in the policy's precision, so at step 1 (policy
    = reference) every log-ratio is exactly 0: loss log 2, margin 0. (Scored in fp32 instead, the
    reference's log-probs differ from the bf16 policy's by ~1e-2.) At a learning rate of 1e-12
    the policy after step 1 still equals the reference to float precision, so the held-out
    evaluation, which pairs the policy's log-probs of data.val with the reference's of the same
    pairs, gives val_loss log 2, margin 0 and accuracy 0 (ties count as wrong)."""
    ref = os.path.join(tiny_run[0], "ref.pt")
    run_train(tmp_path, f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=1", "--dpo_lr=1e-12",
              "--eval_samples=4", "--dtype=bfloat16")
    rec = read_metrics(tmp_path)
    assert rec[0]["loss"] == pytest.approx(math.log(2), abs=1e-7) and rec[0]["rewards/margins"] == 0.0
    ev = next(r for r in rec if r["stage"] == "eval")
    assert ev["val_loss"] == pytest.approx(math.log(2), abs=1e-6) and ev["pref_accuracy"] == 0.0
    assert ev["val_margin"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("arg, message", [
    ("--beta", "use --key=value"),
    ("--betta=0.1", "unknown setting 'betta'; valid settings: data, tokenizer"),
    ("--beta=abc", "bad value for --beta: 'abc' is not a float"),
    ("--beta=0", "bad setting: beta must be a number > 0, got 0.0"),
    ("--online=maybe", "bad value for --online"),
    ("--loss_type=kto", "bad setting: unknown loss_type 'kto'"),
    ("--optimizer=sgd", "bad value for --optimizer"),
    ("--judge=nocolon", "bad value for --judge"),
    ("--alpha=-0.1", "bad value for --alpha: -0.1 (must be >= 0)"),
    ("--best_of=0", "bad value for --best_of: 0 (must be > 0)"),
    ("--reward_model=rm.pt", "bad value for --reward_model: 'rm.pt' (must be empty unless --method=ppo or best_of_n)"),
])
def test_bad_config_values(arg, message):
    """Each bad command line stops before any work with one line naming the setting: the form, an
    unknown key, a wrong type, a value out of range (the loss's own checks, shared with dpo.py)."""
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.parse_config([arg])


def test_help_lists_every_setting(capsys):
    """--help prints every setting of CONFIG (each with its default and help line) and exits."""
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    shown = capsys.readouterr().out
    assert all(f"--{k}=" in shown for k in train.CONFIG)


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


def judge_that_raises(prompt, a, b):
    raise RuntimeError("reward model offline")


def test_online_dpo_with_a_pluggable_judge(tiny_run, tmp_path):
    """Online DPO: fresh pairs from the policy, labelled by a toy judge given as module:function
    that prefers the shorter response. Every step logs the pairs labelled and the ties skipped
    (together 8 prompts per step). 6 steps at lr 2e-3 teach the policy to stop early: measured
    here, its samples are 4 bytes long against the reference's 21 and the judge prefers them
    on 97% of held-out prompts; the test asks for a win rate above 0.8 and half the length."""
    ref = os.path.join(tiny_run[0], "ref.pt")
    res = run_train(tmp_path, f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=6", "--online=True",
                    "--judge=test_train:prefer_shorter", "--eval_samples=32", "--dpo_lr=2e-3")
    dpo = [r for r in read_metrics(tmp_path) if r["stage"] == "dpo"]
    assert len(dpo) == 6 and dpo[-1]["online_pairs"] + dpo[-1]["online_ties"] == 6 * 8
    assert dpo[-1]["online_pairs"] > 0 and res["win_rate"] > 0.8
    assert res["policy_mean_length"] < res["reference_mean_length"] / 2


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:judge", "--judge=no_such_module_xyz:judge: cannot load it"),
    ("test_train:no_such_function", "--judge=test_train:no_such_function: cannot load it"),
    ("test_train:judge_that_raises", "judge test_train:judge_that_raises raised RuntimeError: reward model offline"),
])
def test_bad_judges_name_themselves(tiny_run, tmp_path, spec, message):
    """A judge that cannot be imported, does not exist, or raises stops the run with its name."""
    ref = os.path.join(tiny_run[0], "ref.pt")
    with pytest.raises(SystemExit, match=re.escape(message)):
        run_train(tmp_path, f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=2", "--online=True", f"--judge={spec}")


def test_dpo_step_flops_match_a_flop_counter():
    """bench's FLOP count of a DPO step against torch's FlopCounterMode on a real step (2 layers,
    C = 64, V = 257, 4 pairs of 32 + 64 tokens, live reference), where the count is exact: the
    counter sees every matmul (linear layers: 2 FLOPs per weight and token; the output layer only at
    the 4*2*64 positions that predict a response token; backward 2x forward), but has no formula
    for the CPU attention kernel, so attention's 2 * 2*B*T*T*C per layer and forward is added by
    hand: x3 for the policy's forward and backward, x1 for the reference."""
    import bench
    from torch.utils.flop_counter import FlopCounterMode
    L, C, V, B, P, R = 2, 64, 257, 4, 32, 64
    pol, ref = tiny_model(n_layer=L, n_embd=C, vocab_size=V, block_size=P + R), tiny_model(n_layer=L, n_embd=C, vocab_size=V, block_size=P + R)
    ref.requires_grad_(False)
    ids = torch.randint(0, V, (2 * B, P + R))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, P:] = True
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            rc, rr, _, _ = train.concatenated_logps(ref, ids, mask)
        pc, pr, _, _ = train.concatenated_logps(pol, ids, mask)
        train.dpo_loss(pc, pr, rc, rr)[0].mean().backward()
    attention = L * 2 * 2 * (2 * B) * (P + R) ** 2 * C
    assert bench.dpo_step_flops(pol, ids, mask, precomputed=False) == counter.get_total_flops() + 4 * attention
    assert bench.dpo_step_flops(pol, ids, mask, precomputed=True) == 3 * (bench.dpo_step_flops(pol, ids, mask, False) // 4)


def test_bench_quick(capsys):
    """bench.py --quick runs and ends with one JSON line holding every figure; each MFU is the
    step's FLOPs over its time and the dtype's measured ceiling."""
    import bench
    bench.main(["--quick"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    assert res["ceiling_gflops"]["fp32"] > 0 and len(res["dpo_step"]) == 2
    for r in res["dpo_step"]:
        assert r["mfu"] == pytest.approx(r["tflop_per_step"] * 1e3 / r["sec_per_step"] / res["ceiling_gflops"][r["dtype"]])
    assert [s["cache"] for s in res["sampling"]] == [True, False]
    p = res["ppo"][0]  # the PPO iteration's parts add up to its total
    assert p["sample_s"] + p["score_s"] + p["update_s"] == pytest.approx(p["total_s"])
    assert p["sample_share"] == pytest.approx(p["sample_s"] / p["total_s"])


@pytest.mark.parametrize("args, first_loss, tol", [
    (["--loss_type=sigmoid", "--label_smoothing=0.2", "--optimizer=rmsprop", "--precompute_ref=True"], math.log(2), 5e-3),
    (["--loss_type=ipo", "--beta=0.5"], 1.0, 1e-7),
    (["--loss_type=hinge"], 1.0, 1e-7),
])
def test_every_loss_type_trains(tiny_run, small_file, tmp_path, args, first_loss, tol):
    """At DPO step 1 the policy is the reference, so h = 0 and the first loss is known by hand:
    conservative DPO -(1-eps) log sigmoid(0) - eps log sigmoid(0) = log 2 whatever eps;
    IPO (0 - 1/(2*0.5))^2 = 1; hinge relu(1 - 0) = 1. With a live reference h is exactly 0 (the
    same kernels on the same batch), so the loss is float32's rounding of the number (1e-7). The
    precomputed reference was scored in batches of another shape, so h is 0 only to conftest's
    rule: at most ~0.013 for four sums of up to 100 tokens with |log p| <= 5, and cDPO's loss moves
    by at most (1 - 2 eps)/2 = 0.3 of it: 5e-3 (a misaligned precomputed reference puts h at tens
    of nats). (The precomputed case scores every training pair first: a 400-pair file.)"""
    ref = os.path.join(tiny_run[0], "ref.pt")
    small = [f"--data={small_file}"] if "--precompute_ref=True" in args else []
    res = run_train(tmp_path, f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=3", "--eval_samples=4", *small, *args)
    dpo = [r for r in read_metrics(tmp_path) if r["stage"] == "dpo"]
    assert dpo[0]["loss"] == pytest.approx(first_loss, abs=tol)
    assert all(math.isfinite(r["loss"]) for r in dpo) and math.isfinite(res["val_loss"])


def test_train_from_a_gpt2_folder(tmp_path):
    """--init_from=<Hugging Face GPT-2 folder> runs SFT, DPO and evaluation on the loaded weights,
    and a tokenizer whose vocabulary does not match the checkpoint's stops with a message."""
    m = tiny_model(seed=10, vocab_size=257, n_embd=64, block_size=160)
    folder = tmp_path / "gpt2-tiny"
    folder.mkdir()
    write_config(folder, m.config)
    write_safetensors(folder / "model.safetensors", hf_state_dict(m, True))
    res = run_train(tmp_path / "run", f"--init_from={folder}", "--sft_iters=3", "--dpo_iters=2", "--eval_samples=4")
    assert math.isfinite(res["kl"]) and 0 <= res["win_rate"] <= 1
    toy = tmp_path / "toy.tiktoken"  # tiktoken's format: base64 token, rank; 256 bytes + 2 merges -> 259 ids
    toy.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(
        [bytes([i]) for i in range(256)] + [b"th", b"the"])))
    with pytest.raises(SystemExit, match=r"vocabulary \(257\) does not match tokenizer .*toy.tiktoken.* \(259 tokens\)"):
        run_train(tmp_path / "run2", f"--init_from={folder}", f"--tokenizer={toy}")
    with pytest.raises(SystemExit, match="error: .*missing.tiktoken: no such .tiktoken file"):
        run_train(tmp_path / "run3", f"--tokenizer={tmp_path / 'missing.tiktoken'}")
    with pytest.raises(SystemExit, match="error: .*nope.jsonl"):
        run_train(tmp_path / "run4", f"--data={tmp_path / 'nope.jsonl'}")


@pytest.mark.parametrize("method", ["reference_free", "preferred_ft", "unlikelihood"])
def test_first_loss_of_reference_free_preferred_ft_and_unlikelihood(tiny_run, tmp_path, method):
    """Their first loss, computed independently in float64 on the first batch (Batches with the
    run's seed; the policy at step 1 is ref.pt; log-probs by the literal definition on full logits,
    conftest.float64_logps): reference-free DPO, beta 1: mean over pairs of -log sigmoid(log pi(y_w) -
    log pi(y_l)) (not log 2: no reference is loaded); Preferred-FT: -sum log pi(y_w) / sum |y_w|, a
    positive NLL per token; Unlikelihood, alpha 0.5: that NLL + 0.5 * the mean of -log(1 - p) over each
    rejected response's tokens from the first one that differs from its chosen response (found here by
    a plain loop). Tolerance: conftest's rule passed through each formula: -log sigmoid is
    1-Lipschitz (the mean of the pairs' bounds), the NLL divides the summed bounds by the token count,
    and -log(1 - e^l) has slope p/(1 - p), which scales each penalised token's bound."""
    from conftest import token_bound
    ref = os.path.join(tiny_run[0], "ref.pt")
    arg = dict(reference_free=["--reference_free=True"], preferred_ft=["--method=preferred_ft"],
               unlikelihood=["--method=unlikelihood", "--alpha=0.5"])[method]
    run_train(tmp_path / "run", f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=1", "--eval_samples=4", *arg)
    _, _, d = stage_inputs(tmp_path / "inputs")
    batch = [d.train[i] for i in data.Batches(list(range(len(d.train))), 8, 1337).next()]
    ids, mask = data.collate(batch, d.eot)
    lp, bound, zmax, token_lp = float64_logps(load_model(ref, "cpu"), ids, mask)  # token_lp (2B, T-1): token t+1
    n = mask[:, 1:].sum(1)
    pc, pr = lp[:8], lp[8:]
    if method == "reference_free":
        expected, tol = -torch.nn.functional.logsigmoid(pc - pr).mean(), (bound[:8] + bound[8:]).mean()
    else:
        expected, tol = -pc.sum() / n[:8].sum(), bound[:8].sum() / n[:8].sum()
    if method == "unlikelihood":
        terms, slopes = [], []
        for (p, c, r), row in zip(batch, token_lp[8:]):
            k = next((i for i in range(len(r)) if i >= len(c) or c[i] != r[i]), len(r))  # first differing token
            probs = [math.exp(row[len(p) + i - 1].item()) for i in range(k, len(r))]
            terms += [-math.log(1 - q) for q in probs]
            slopes += [q / (1 - q) for q in probs]
        expected = expected + 0.5 * sum(terms) / len(terms)
        tol = tol + 0.5 * (token_bound(zmax) * sum(slopes) + len(terms) * U32 * sum(terms)) / len(terms)
    assert abs(read_metrics(tmp_path / "run")[0]["loss"] - expected.item()) <= tol.item()


def independent_best_of(cfg, run, d, ref, score_fn):
    """Best-of-N outside train.best_of_n: the same cfg.best_of samples per held-out prompt drawn
    again (the reference's own distribution, the policy's evaluation seed), scored by
    score_fn(prompts, outs) minus 1 (no_eos_penalty) where cut without an end token; each prompt's
    first highest. -> (the samples, the picks)."""
    n = cfg.best_of
    prompts = [p for p in d.eval_ids for _ in range(n)]
    outs = train.sample(cfg, run, ref, prompts, cfg.policy_seed + 1, d.eot, exact=True)
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
    picks = train.best_of_n(cfg, run, d, ref)
    outs, expected = independent_best_of(cfg, run, d, ref, lambda prompts, outs: torch.tensor(
        [d.task["reward"](d.enc.decode(p), train.text(d, r)) for p, r in zip(prompts, outs)], dtype=torch.float))
    assert any(r[-1] != d.eot for r in outs) and any(r[-1] == d.eot for r in outs)  # the penalty matters here
    assert picks == expected
    res = run_train(tmp_path / "run", f"--init_from={tiny_run[0]}/ref.pt", "--sft_iters=0", "--method=best_of_n", "--best_of=4")
    assert res["kl_bound"] == pytest.approx(math.log(4) - 0.75) and "kl" not in res
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt") and os.path.exists(tmp_path / "run" / "eval.json")


def test_policy_seed_changes_the_policy_not_the_reference(tiny_run, tmp_path):
    """--policy_seed reseeds what follows the reference only. Default -1 means --seed: a run with
    --policy_seed=1337 repeats the default run exactly (losses and every evaluation figure but the
    timings). Another policy seed draws other batches (another mean chosen log-prob at step 1, where
    every loss is log 2) and other losses at step 2, but evaluates on the same
    held-out pairs and the same reference samples (equal reference reward, length and validity)."""
    common = [f"--init_from={tiny_run[0]}/ref.pt", "--sft_iters=0", "--dpo_iters=2", "--eval_samples=16"]
    runs = {name: run_train(tmp_path / name, *common, *args) for name, args in
            (("default", []), ("same", ["--policy_seed=1337"]), ("other", ["--policy_seed=7"]))}
    loss = {name: [(r["loss"], r["logps/chosen"]) for r in read_metrics(tmp_path / name) if r["stage"] == "dpo"] for name in runs}
    timing = ("sample_seconds", "wall_seconds")
    assert loss["default"] == loss["same"] and {k: v for k, v in runs["default"].items() if k not in timing} == \
        {k: v for k, v in runs["same"].items() if k not in timing}
    assert loss["other"][0][1] != loss["default"][0][1] and loss["other"][1][0] != loss["default"][1][0]
    for k in ("reference_reward", "reference_mean_length", "reference_valid_fraction"):
        assert runs["other"][k] == runs["default"][k], k


# ------------------------------------------------------------------------------------------------
# RLHF: the reward model and PPO, on the same stages

RLHF = ["--sft_iters=0", "--eval_samples=4", "--max_new_tokens=16", "--rollout_batch=8", "--ppo_minibatch=4",
        "--ppo_epochs=2", "--eval_interval=2", "--show_samples=0"]


@pytest.fixture(scope="module")
def tiny_rm(tiny_run, tmp_path_factory):
    """A reward model trained for 4 steps from the tiny run's reference."""
    out = tmp_path_factory.mktemp("rm")
    result = run_train(out, f"--init_from={tiny_run[0]}/ref.pt", "--method=reward_model", "--rm_iters=4", *RLHF)
    return out, result


def test_reward_model_starts_at_log2_and_is_saved_as_one(tiny_rm):
    """The reward model is the SFT model with a zero score head, so at step 1 every score is 0: the
    Bradley-Terry loss is -log sigmoid(0) = log 2 and no pair is ranked right (ties count as wrong).
    Its checkpoint is marked as a ScalarGPT, and the final evaluation reports its held-out accuracy
    and its correlation with the task's exact reward (a number in [-1, 1])."""
    out, result = tiny_rm
    rec = read_metrics(out)
    assert rec[0]["stage"] == "rm" and rec[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert rec[0]["rewards/accuracies"] == 0.0 and "logps/chosen" not in rec[0]
    assert set(result) == {"rm_val_loss", "rm_accuracy", "rm_margin", "reward_correlation", "wall_seconds"}
    assert -1 <= result["reward_correlation"] <= 1
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["kind"] == "ScalarGPT" and ck["step"] == 4


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


def test_rollout_scores_truncated_responses_with_a_penalty(tiny_run, tmp_path):
    """With max_new_tokens = 4 every sample of the barely trained reference is cut before its end
    token, so each score is the task's exact reward of the text minus no_eos_penalty = 1.5; the
    per-token KL against itself is 0, so the GAE returns at the first token (gamma = lambda = 1)
    equal the scores."""
    cfg, run, d = stage_inputs(tmp_path, "--max_new_tokens=4", "--no_eos_penalty=1.5", "--lam=1.0")
    policy = load_model(f"{tiny_run[0]}/ref.pt", "cpu")
    value = ScalarGPT.from_model(policy)
    prompts = [d.train[i][0] for i in range(6)]
    ep = train.rollout(cfg, run, d, policy, policy, value, None, prompts, 0, 1.0)
    assert ep.truncated.tolist() == [1.0] * 6
    texts = [d.enc.decode(ids[m].tolist()) for ids, m in zip(ep.ids, ep.mask)]
    expected = [data.reward(None, t) - 1.5 for t in texts]
    assert ep.scores.tolist() == pytest.approx(expected) and ep.returns[:, 0].tolist() == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------
# runs that stop, resume and refuse bad input safely

FAST = ["--sft_iters=0", "--eval_samples=4", "--eval_pairs=8"]


def test_a_new_run_never_clobbers_another(tiny_run, tmp_path):
    """A second run into the same out_dir stops and names the flag to add; with --overwrite=True the
    old files are deleted first, so metrics.jsonl holds one run: one 'final' record, not two. A
    folder with only the settings and log of a run that wrote no checkpoint is cleared silently."""
    args = [f"--init_from={tiny_run[0]}/ref.pt", *FAST, "--dpo_iters=1"]
    run_train(tmp_path, *args)
    with pytest.raises(SystemExit, match=r"holds another run's files \(ref.pt, ckpt.pt, config.json, metrics.jsonl, "
                                         r"eval.json\): add --overwrite=True to replace them"):
        run_train(tmp_path, *args)
    run_train(tmp_path, *args, "--overwrite=True")
    assert [r["stage"] for r in read_metrics(tmp_path)].count("final") == 1
    stale = tmp_path / "stale"  # settings and log of a run stopped before any checkpoint: cleared
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    (stale / "metrics.jsonl").write_text('{"stage": "sft", "step": 1}\n')
    run_train(stale, *args)
    assert read_metrics(stale)[0]["stage"] == "dpo"


def test_guard_rules_by_hand(tmp_path):
    """The divergence rule with --diverge=100: the first loss 0.5 sets the scale max(0.5, 1) = 1, so a
    loss of 99 passes and 101 stops the run; a NaN loss stops it. One weight w = 3 has norm 3: a step
    to 5.9 (< 2 x 3) passes, then a step from 5.9 to 12 (> 11.8) stops it, as does a non-finite
    gradient norm. Every stop names the last good checkpoint it was given."""
    cfg = train.parse_config([f"--out_dir={tmp_path}", "--diverge=100"])
    w = torch.nn.Parameter(torch.tensor([3.0]))
    guard = train.Guard(cfg, SimpleNamespace(ddp=False), "dpo", [torch.nn.ParameterList([w])], "out/ckpt.pt (dpo step 7)")
    guard.before_step(1, torch.tensor(0.5))
    guard.before_step(2, torch.tensor(99.0))
    with pytest.raises(SystemExit, match=r"dpo step 3: loss 101 is over --diverge=100 x max\(first loss 0.5, 1\).*"
                                         r"The last good checkpoint is out/ckpt.pt \(dpo step 7\)"):
        guard.before_step(3, torch.tensor(101.0))
    with pytest.raises(SystemExit, match="dpo step 4: non-finite loss"):
        guard.before_step(4, torch.tensor(float("nan")))
    with torch.no_grad():
        w.fill_(5.9)
    guard.after_step(5, torch.tensor(1.0))
    with torch.no_grad():
        w.fill_(12.0)
    with pytest.raises(SystemExit, match="dpo step 6: the weights' norm went from 5.9 to 12 in one step"):
        guard.after_step(6, torch.tensor(1.0))
    with pytest.raises(SystemExit, match=r"dpo step 7: non-finite gradient norm \[inf\]"):
        guard.after_step(7, torch.tensor(float("inf")))


def test_divergence_stops_before_a_bad_checkpoint(tiny_run, tmp_path):
    """--dpo_lr=1e3 with a checkpoint every step: AdamW's first step moves every weight by about
    1e3, so the weights' norm grows far more than 2x at step 1 and the run stops there, naming ref.pt
    (nothing of the diverged step is written: no ckpt.pt). With the rule off (--diverge=0) the step-1
    weights are large but finite and are saved; step 2's gradient is not finite, and the stop names
    ckpt.pt at step 1, whose weights really are finite."""
    args = [f"--init_from={tiny_run[0]}/ref.pt", *FAST, "--dpo_iters=3", "--dpo_lr=1e3", "--ckpt_interval=1"]
    with pytest.raises(SystemExit, match=r"dpo step 1: the weights' norm went from .* The last good checkpoint is "
                                         r".*/a/ref.pt \(the SFT model"):
        run_train(tmp_path / "a", *args)
    assert not os.path.exists(tmp_path / "a" / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"dpo step 2: non-finite .* The last good checkpoint is .*/b/ckpt.pt \(dpo step 1\)"):
        run_train(tmp_path / "b", *args, "--diverge=0")
    ck = load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))
    assert ck["step"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_resume_refuses_another_run(tiny_run, small_file, tmp_path):
    """A run stopped at step 2 of 4 (dpo_iters 4) is continued only with its own settings, data,
    reference and step count; each mismatch stops with a line saying what differs. Settings not
    given on the command line come from the run's config.json, so a bare resume continues it."""
    args = [f"--init_from={tiny_run[0]}/ref.pt", *FAST, "--dpo_iters=4", f"--data={small_file}"]
    out = tmp_path / "run"
    run_train(out, *args, "--stop_at=2")
    cases = [(["--n_layer=3"], r"what differs: --n_layer=3 \(the run has 2\)"),
             (["--seed=7"], r"--seed=7 \(the run has 1337\)"),
             (["--batch_size=4"], r"--batch_size=4 \(the run has 8\)"),
             (["--dpo_iters=1"], r"ckpt.pt is at dpo step 2, past the 1 asked for: pass a larger --dpo_iters")]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            train.main(["--init_from=resume", f"--out_dir={out}", *extra])
    other = tmp_path / "other"  # another run's reference copied over this one's
    run_train(other, *args, "--dpo_iters=1", "--seed=5")
    ref = (out / "ref.pt").read_bytes()
    (out / "ref.pt").write_bytes((other / "ref.pt").read_bytes())
    with pytest.raises(SystemExit, match=r"ref.pt, not the reference the run trained against"):
        train.main(["--init_from=resume", f"--out_dir={out}"])
    (out / "ref.pt").write_bytes(ref)
    pairs = open(small_file).read()
    with open(small_file, "w") as f:  # the same path, other content
        f.write(pairs.replace("superb", "splendid"))
    try:
        with pytest.raises(SystemExit, match=r"the data file's content"):
            train.main(["--init_from=resume", f"--out_dir={out}"])
    finally:
        with open(small_file, "w") as f:
            f.write(pairs)
    assert train.main(["--init_from=resume", f"--out_dir={out}"]) is not None  # its own: runs to the end
    assert [r["step"] for r in read_metrics(out) if r["stage"] == "dpo"] == [1, 2, 3, 4]


def test_resume_before_the_first_checkpoint_and_with_nothing(tiny_run, tmp_path):
    """Killed after ref.pt but before DPO's first ckpt.pt: resume starts DPO at step 1 from ref.pt
    (no traceback) and, with dropout 0.1, repeats the first run's losses exactly: both start DPO by
    seeding torch with --policy_seed, whatever SFT left. An out_dir with no run in it: a one-line refusal."""
    out = tmp_path / "run"
    run_train(out, f"--init_from={tiny_run[0]}/ref.pt", "--sft_iters=2", *FAST[1:], "--dpo_iters=2", "--dropout=0.1")
    os.remove(out / "ckpt.pt")
    run_train(out, "--init_from=resume")
    dpo = [r for r in read_metrics(out) if r["stage"] == "dpo"]
    assert [r["step"] for r in dpo] == [1, 2, 1, 2] and [r["loss"] for r in dpo[:2]] == [r["loss"] for r in dpo[2:]]
    with pytest.raises(SystemExit, match=r"holds no run to continue \(no ref.pt or sft.pt\)"):
        run_train(tmp_path / "empty", "--init_from=resume")


def test_sft_stops_and_resumes_exactly(small_file, tmp_path, monkeypatch):
    """SFT checkpoints too: a stop request seen after SFT step 5 (of 12) writes sft.pt and exits with
    128 + SIGTERM = 143; resuming finishes SFT from sft.pt, and the reference it saves equals, weight
    for weight, the one of an uninterrupted run (same optimizer state, length-grouped batches of a
    preference file, dropout RNG). sft.pt is removed once ref.pt is written."""
    args = ["--sft_iters=12", "--dpo_iters=1", "--dropout=0.1", *FAST[1:], f"--data={small_file}"]
    run_train(tmp_path / "a", *args)
    calls = iter(range(100))
    monkeypatch.setattr(train, "stop_requested", lambda run: next(calls) == 4)  # the 5th step's check
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "b", *args)
    assert e.value.code == 128 + signal.SIGTERM and load_checkpoint(str(tmp_path / "b" / "sft.pt"))["step"] == 5
    monkeypatch.setattr(train, "stop_requested", lambda run: False)
    run_train(tmp_path / "b", "--init_from=resume")
    a, b = (load_checkpoint(str(tmp_path / d / "ref.pt"))["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a) and not os.path.exists(tmp_path / "b" / "sft.pt")


def test_sigterm_then_resume_equals_an_uninterrupted_run(tiny_run, small_file, tmp_path):
    """A real SIGTERM to `python train.py` during DPO: the step in progress finishes, ckpt.pt is
    written, the process prints how to resume and exits 143. Resumed for 3 more steps (dpo_iters may
    change on resume: the learning rate is constant after warm-up), it logs the same per-step losses
    as a run that was never stopped."""
    args = [f"--init_from={tiny_run[0]}/ref.pt", *FAST, "--dpo_lr=1e-3", "--eval_interval=1000", f"--data={small_file}"]
    p = subprocess.Popen([sys.executable, "train.py", *TINY, *args, "--dpo_iters=1000", f"--out_dir={tmp_path / 'b'}"],
                         cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "b" / "metrics.jsonl"
    for _ in range(1200):  # until a few DPO steps are logged
        if metrics.exists() and sum(1 for line in open(metrics) if '"dpo"' in line) >= 3:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 143, out[-2000:]
    stopped = int(re.search(r"stopped by SIGTERM at dpo step (\d+), checkpoint written", out).group(1))
    assert 3 <= stopped < 1000 and f"--init_from=resume --out_dir={tmp_path / 'b'}" in out
    train.main(["--init_from=resume", f"--out_dir={tmp_path / 'b'}", f"--dpo_iters={stopped + 3}"])
    run_train(tmp_path / "a", *args, f"--dpo_iters={stopped + 3}")
    la, lb = ([r["loss"] for r in read_metrics(tmp_path / d) if r["stage"] == "dpo"] for d in "ab")
    assert len(la) == stopped + 3 and lb[:stopped] + lb[-3:] == la


def test_tokenizer_file_is_read_each_time(tmp_path):
    """A .tiktoken file is 'base64(token) rank' per line: 256 byte tokens + 1 merge -> 257 ranks,
    eot 257, 258 ids. Rewritten at the same path with 2 merges: 259 ids (no stale cache). An empty
    file and a bad line are refused naming the file (and the line)."""
    path = tmp_path / "toy.tiktoken"
    write = lambda toks: path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(toks)))
    byte_tokens = [bytes([i]) for i in range(256)]
    write(byte_tokens + [b"th"])
    assert data.get_tokenizer(str(path)).n_vocab == 258
    write(byte_tokens + [b"th", b"the"])
    assert data.get_tokenizer(str(path)).n_vocab == 259
    path.write_text("")
    with pytest.raises(ValueError, match="toy.tiktoken: empty .tiktoken file"):
        data.get_tokenizer(str(path))
    path.write_text("YQ== 0\nnot-base64! 1\n")
    with pytest.raises(ValueError, match="toy.tiktoken: line 2: expected 'base64-token rank'"):
        data.get_tokenizer(str(path))


def bad_inputs(tmp_path, tiny_run):
    """The table of bad inputs: (arguments, the one line expected). Files are made here."""
    t = tmp_path
    corrupt = gzip.compress(b'{"prompt": "a", "chosen": " b", "rejected": " c"}\n' * 500)
    (t / "corrupt.jsonl.gz").write_bytes(corrupt[:40] + bytes(64) + corrupt[104:])
    one = {"prompt": "Q", "chosen": " yes", "rejected": " no"}
    (t / "one.jsonl").write_text(json.dumps(one) + "\n")
    (t / "few.jsonl").write_text("".join(json.dumps(dict(one, prompt=f"Q{i}")) + "\n" for i in range(10)))
    good = (t / "few.jsonl").as_posix()
    (t / "long.jsonl").write_text("".join(json.dumps(dict(one, prompt=f"A long question, number {i}")) + "\n" for i in range(40)))
    ref = open(f"{tiny_run[0]}/ref.pt", "rb").read()
    (t / "short.pt").write_bytes(ref[:len(ref) // 2])
    torch.save(torch.zeros(3), t / "tensor.pt")
    torch.save({"model": {}, "x": Payload()}, t / "evil.pt")
    (t / "hf").mkdir()
    write_config(t / "hf", tiny_model(vocab_size=257).config)
    (t / "hf" / "pytorch_model.bin").write_bytes(b"\x00garbage")
    (t / "afile").write_text("x")
    (t / "empty.tiktoken").write_text("")
    return [
        ([f"--data={t}/corrupt.jsonl.gz"], r"corrupt.jsonl.gz: cannot read as UTF-8 text \((BadGzipFile|error|EOFError)"),
        ([f"--data={t}/one.jsonl"], r"one.jsonl: its 1 pairs share one prompt"),
        ([f"--data={good}", "--batch_size=32"], r"few.jsonl: 9 training and 1 held-out pairs fit block_size 160: too few"),
        ([f"--data={good}"], r"few.jsonl: 9 SFT sequences fit block_size 160: too few for one batch of --sft_batch_size=16"),
        ([f"--data={t}/long.jsonl", "--block_size=8", "--max_new_tokens=4"], r"0 training and 0 held-out pairs fit block_size 8"),
        ([f"--init_from={t}/short.pt"], r"short.pt: not a checkpoint of this project \(unreadable"),
        ([f"--init_from={t}/tensor.pt"], r"tensor.pt: not a checkpoint of this project \(no weights"),
        ([f"--init_from={t}/evil.pt"], r"evil.pt: not a checkpoint of this project"),
        ([f"--init_from={t}/hf"], r"pytorch_model.bin: not a readable PyTorch weights file"),
        ([f"--init_from={t}/missing.pt"], r"missing.pt: no such checkpoint"),
        (["--out_dir=" + str(t / "afile")], r"--out_dir=.*afile is a file, not a folder"),
        (["--out_dir=" + str(t / "afile" / "sub")], r"--out_dir=.*afile/sub: cannot write there"),
        (["--out_dir="], r"bad value for --out_dir: '' \(must be a folder\)"),
        (["--n_head=3"], r"bad value for --n_head: 3 \(must be a divisor of --n_embd\)"),
        (["--n_embd=0"], r"bad value for --n_embd: 0 \(must be > 0\)"),
        (["--threads=-1"], r"bad value for --threads: -1 \(must be >= 0\)"),
        (["--device=cuda"], r"--device=cuda: not available on this machine"),
        (["--device=banana"], r"bad value for --device: 'banana'"),
        ([f"--tokenizer={t}/empty.tiktoken"], r"empty.tiktoken: empty .tiktoken file"),
        (["--judge=no_colon"], r"bad value for --judge: 'no_colon'"),
        (["--dpo_iters=ten"], r"bad value for --dpo_iters: 'ten' is not a int"),
    ]


def test_bad_inputs_stop_with_one_line(tiny_run, tmp_path, capsys):
    """Each bad input of the table stops with a one-line message naming the file or setting, never a
    traceback, and never suggests unpickling (weights_only=False)."""
    for i, (args, message) in enumerate(bad_inputs(tmp_path, tiny_run)):
        out = [a for a in args if a.startswith("--out_dir=")] or [f"--out_dir={tmp_path / f'run{i}'}"]
        with pytest.raises(SystemExit) as e:
            train.main(TINY + [a for a in args if not a.startswith("--out_dir=")] + out)
        msg = str(e.value.code)
        assert re.search(message, msg) and "\n" not in msg and "weights_only" not in msg, (args, msg)


# ------------------------------------------------------------------------------------------------
# real data: a shorter context for a loaded GPT-2, export, length-aware scoring

def test_block_size_crops_a_loaded_gpt2_and_export_round_trips(tmp_path):
    """--block_size=100 on a GPT-2 folder of block 160 crops its position table: the run's ref.pt
    and ckpt.pt hold block 100 (never silently 160); 200 is refused. --eval_only with --export
    writes the trained policy as a GPT-2 folder that loads back to the same logits."""
    m = tiny_model(seed=10, vocab_size=257, n_embd=64, block_size=160)
    folder = tmp_path / "gpt2-tiny"
    m.save_pretrained(str(folder))
    run_train(tmp_path / "run", f"--init_from={folder}", "--block_size=100", "--sft_iters=2", *FAST, "--dpo_iters=1")
    for f in ("ref.pt", "ckpt.pt"):
        assert load_checkpoint(str(tmp_path / "run" / f))["model_args"]["block_size"] == 100
    with pytest.raises(SystemExit, match="block_size 200 is longer than the model's 160"):
        run_train(tmp_path / "run2", f"--init_from={folder}", "--block_size=200")
    train.main(TINY + ["--eval_only=True", f"--init_from={tmp_path / 'run' / 'ckpt.pt'}", f"--export={tmp_path / 'hf'}",
                       "--eval_samples=2", f"--out_dir={tmp_path / 'ev'}", "--block_size=100"])
    policy, exported = load_model(str(tmp_path / "run" / "ckpt.pt")), GPT.from_pretrained(str(tmp_path / "hf"))
    ids = torch.randint(0, 257, (2, 100), generator=torch.Generator().manual_seed(0))
    assert torch.equal(policy(ids), exported(ids)) and (tmp_path / "hf" / "TOKENIZER.txt").exists()


def test_score_puts_sorted_batches_back_in_order(tiny_run, tmp_path):
    """score() batches sequences sorted by length; its outputs must come back in the input order:
    for 37 sequences of mixed lengths, batches of 8, each summed log-prob equals the float64 value
    of that very sequence, to conftest's rule (a neighbour's value is off by whole nats), and each
    count is the sequence's response length."""
    cfg, run, d = stage_inputs(tmp_path, "--score_batch_size=8")
    m = load_model(f"{tiny_run[0]}/ref.pt")
    rng = random.Random(0)
    seqs = [(p, c[:rng.randint(1, len(c))]) for p, c, _ in d.train[:37]]
    lp, n = train.score(cfg, run, m, seqs, d.eot)
    expected, bound, _, _ = float64_logps(m, *data.collate_sft(seqs, d.eot))
    assert n.tolist() == [len(c) for _, c in seqs]
    assert ((lp.double() - expected).abs() <= bound).all()


# ------------------------------------------------------------------------------------------------
# the Figure-2 sweep: its report, and a tiny dry run of the whole command

def write_eval(path, **figures):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(figures, f)


def test_frontier_report_means_spreads_and_bounds(tmp_path, capsys, monkeypatch):
    """Two seeds of dpo-beta1 with KL 1 and 3, reward 2 and 4: mean 2.00 and 3.00, sample standard
    deviation sqrt(((1-2)^2 + (3-2)^2) / (2-1)) = 1.41 for both. Best-of-4 shows its KL as the bound
    log 4 - 3/4 = 0.64, without spread; the reference (all implicit rewards 0) has no held-out
    accuracy. Rows in method order (reference, DPO, ..., Best-of-N). Without matplotlib the picture
    is skipped with a message; with it, a PNG is written."""
    monkeypatch.syspath_prepend(os.path.join(HERE, "scripts"))
    import frontier_report
    base = dict(win_rate=0.5, valid_fraction=1.0, pref_accuracy=0.75, val_margin=1.0, wall_seconds=10.0)
    write_eval(tmp_path / "dpo-beta1" / "s1" / "eval.json", **{**base, "kl": 1.0, "policy_reward": 2.0})
    write_eval(tmp_path / "dpo-beta1" / "s2" / "eval.json", **{**base, "kl": 3.0, "policy_reward": 4.0})
    write_eval(tmp_path / "best_of-4" / "s1" / "eval.json", **{**base, "kl_bound": math.log(4) - 0.75, "policy_reward": 1.0,
                                                              "val_margin": 0.0})
    write_eval(tmp_path / "reference" / "eval.json", **{**base, "kl": 0.0, "policy_reward": 0.1, "val_margin": 0.0})
    frontier_report.main([str(tmp_path)])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and not r.startswith("| point")]
    assert [r.split(" | ")[0] for r in rows] == ["| reference", "| dpo-beta1", "| best_of-4"]
    assert rows[1].startswith("| dpo-beta1 | 2 | 2.00 ± 1.41 | 3.00 ± 1.41 | 0.500 ± 0.000 |")
    assert "| ≤ 0.64 (bound) |" in rows[2] and rows[0].split(" | ")[6] == "-"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert frontier_report.plot(*frontier_report.collect(str(tmp_path))[:1], str(tmp_path / "f.png")) is False
    assert "matplotlib is not installed" in capsys.readouterr().out
    monkeypatch.delitem(sys.modules, "matplotlib")
    if importlib.util.find_spec("matplotlib") is None:  # optional: the picture is checked where it is installed
        return
    assert frontier_report.plot(frontier_report.collect(str(tmp_path))[0], str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_frontier_sweep_dry_run_resumes_and_skips_finished_runs(tmp_path):
    """scripts/frontier.sh at toy size, two runs at a time: a reference, then DPO, PPO-GT and
    Best-of-2 for two policy seeds, and the table. EXTRA's settings reach every run but yield to the
    run's own: the reference trains 20 SFT steps and no DPO (its row: KL 0), every policy run
    starts from its weights (sft_iters=0: the ref.pt each writes holds the same weights), and PPO
    takes PPO_ITERS = 2 steps, not EXTRA's 5. Every point has both seeds, and Best-of-2's KL is the
    bound log 2 - 1/2 = 0.19. Run again, it starts nothing (every run has its eval.json) and prints
    the same table."""
    env = dict(os.environ, SEEDS="1 2", BETAS="1", ONLINE_BETAS="", KLS="1", RM_KLS="", ALPHAS="", PFT_LRS="", JOBS="2",
               BEST_OF="2", PPO_ITERS="2", EXTRA=" ".join(TINY + ["--sft_iters=20", "--dpo_iters=2", "--eval_samples=8",
                                                                  "--ppo_iters=5", "--rollout_batch=8", "--ppo_minibatch=4"]))
    cmd = ["bash", os.path.join(HERE, "scripts", "frontier.sh"), str(tmp_path)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    started = [line for line in first.stdout.splitlines() if re.match(r"[\w.-]+( s\d+)?: \d+ s$", line)]
    assert len(started) == 1 + 3 * 2  # the reference, then 3 points x 2 seeds
    ref = torch.load(tmp_path / "reference" / "ref.pt", weights_only=True)["model"]
    for run_dir in (tmp_path / p / s for p in ("dpo-beta1", "ppo_gt-kl1", "best_of-2") for s in ("s1", "s2")):
        weights = torch.load(run_dir / "ref.pt", weights_only=True)["model"]
        assert all(torch.equal(weights[k], v) for k, v in ref.items()), run_dir
    assert [r["stage"] for r in read_metrics(tmp_path / "reference")].count("dpo") == 0
    assert [r["step"] for r in read_metrics(tmp_path / "dpo-beta1" / "s1") if r["stage"] == "dpo"] == [1, 2]
    assert [r["step"] for r in read_metrics(tmp_path / "ppo_gt-kl1" / "s2") if r["stage"] == "ppo"] == [1, 2]
    table = [line for line in first.stdout.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[:2] for r in table[1:]] == [["| reference", "1"], ["| dpo-beta1", "2"], ["| ppo_gt-kl1", "2"],
                                                 ["| best_of-2", "2"]]
    assert table[1].split(" | ")[2] == "0.00"  # the reference against itself
    assert "| ≤ 0.19 (bound) |" in table[-1]
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and not [line for line in again.stdout.splitlines() if re.match(r".*: \d+ s$", line)]
    assert [line for line in again.stdout.splitlines() if line.startswith("| ")] == table


def test_best_of_n_ranks_by_a_reward_model(tiny_run, tiny_rm, tmp_path):
    """Best-of-N with --reward_model ranks by the reward model's score: its picks are the samples
    whose score, read independently with score() and minus the no-eos penalty, is highest of their
    prompt's N = 2; the bound log 2 - 1/2 is reported."""
    rm = str(tiny_rm[0] / "ckpt.pt")
    cfg, run, d = stage_inputs(tmp_path / "unit", "--method=best_of_n", "--best_of=2", f"--reward_model={rm}")
    ref = load_model(os.path.join(tiny_run[0], "ref.pt"), "cpu").eval()
    picks = train.best_of_n(cfg, run, d, ref)
    scorer = load_model(rm, "cpu", kind="ScalarGPT").eval()
    _, expected = independent_best_of(cfg, run, d, ref, lambda prompts, outs: train.score(
        cfg, run, scorer, list(zip(prompts, outs)), d.eot)[0])
    assert picks == expected
    res = run_train(tmp_path / "run", f"--init_from={tiny_run[0]}/ref.pt", "--sft_iters=0", "--method=best_of_n",
                    "--best_of=2", f"--reward_model={rm}")
    assert res["kl_bound"] == pytest.approx(math.log(2) - 0.5)
