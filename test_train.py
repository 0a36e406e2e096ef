"""
Tests of train.py: the methods' objectives by hand, online pairs, the frozen reference, then tiny
end-to-end runs: smoke, DDP, gradient accumulation, bf16, every loss type, a GPT-2 folder, first
losses computed independently, policy seeds, the reward model, bad inputs, export.
"""
import base64
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import data
import train
from checkpoint import load_checkpoint, load_model, save_checkpoint
from conftest import FAST, HERE, TINY, TOKEN_ULPS, U32, float64_logps, read_metrics, run_train, stage_inputs, tiny_model
from model import GPT
from runtime import setup
from task import text
from test_checkpoint import Payload
from test_model import hf_state_dict, write_config, write_safetensors


# ------------------------------------------------------------------------------------------------
# the stages as units: the reference, the objectives, online pairs

def test_reference_is_frozen_and_in_eval_mode(tmp_path):
    """With --dropout=0.5 the policy drops units, but the reference is loaded in eval mode with no
    parameter requiring a gradient, so two forwards of it agree exactly; reference-free: None."""
    cfg = train.parse_config(TINY + [f"--out_dir={tmp_path}", "--dropout=0.5"])
    with setup(cfg) as run:
        pass
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
    pol = train.PairScores(pc, pr, nc, nr)
    objective = lambda *args: train.OBJECTIVES[args[0].method](*args)  # -> (loss, logged loss, r_w, r_l)
    cfg = train.parse_config(["--method=preferred_ft", "--batch_size=2"])
    loss, shown, _, _ = objective(cfg, pol, None, 1)
    assert loss.item() == pytest.approx(1.0) and shown.item() == pytest.approx(1.0)
    loss.backward()
    assert pc.grad.tolist() == pytest.approx([-1 / 6, -1 / 6])
    l1, l2 = math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))
    for method in ("dpo", "reward_model"):
        cfg = train.parse_config([f"--method={method}", "--batch_size=2"])
        loss, shown, rw, rl = objective(cfg, pol, None, 1)
        assert loss.item() == pytest.approx((l1 + l2) / 2) and shown.item() == pytest.approx((l1 + l2) / 2)
        assert (rw > rl).float().mean().item() == 0.5
    cfg = train.parse_config(["--batch_size=2"])
    loss, _, rw, rl = objective(cfg, pol, (torch.tensor([-2.5, -3.5]), torch.tensor([-3.0, -3.0])), 1)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(0.5))) / 2)
    assert [rw.mean().item(), rl.mean().item()] == pytest.approx([0.0, 0.0])  # mean of (0.5, -0.5), mean of (0, 0)
    # Unlikelihood, alpha 0.5, penalised rejected tokens at p = 0.5 and 0.75: 1 + 0.5 * (log 2 + log 4) / 2
    cfg = train.parse_config(["--method=unlikelihood", "--alpha=0.5", "--batch_size=2"])
    ul = torch.log(torch.tensor([0.5, 0.75]))
    loss, shown, _, _ = objective(cfg, pol._replace(pushed_down=ul), None, 2)  # 2 micro-steps: half of it
    assert loss.item() == pytest.approx((1 + 0.75 * math.log(2)) / 2) and shown.item() == pytest.approx(1 + 0.75 * math.log(2))


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
    assert all(len(text(d, c)) < len(text(d, r)) for _, c, r in batch)


# ------------------------------------------------------------------------------------------------
# tiny end-to-end runs

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


# ------------------------------------------------------------------------------------------------
# bad inputs; a shorter context for a loaded GPT-2, and export

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
    (t / "hf_evil").mkdir()
    write_config(t / "hf_evil", tiny_model(vocab_size=257).config)
    torch.save({"transformer.wte.weight": torch.zeros(1), "x": Payload()}, t / "hf_evil" / "pytorch_model.bin")
    (t / "afile").write_text("x")
    (t / "empty.tiktoken").write_text("")
    (t / "garbage.tiktoken").write_bytes(bytes(range(256)) * 4)
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
        ([f"--init_from={t}/hf_evil"], r"hf_evil/pytorch_model.bin: not a readable PyTorch weights file"),
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
        ([f"--tokenizer={t}/garbage.tiktoken"], r"garbage.tiktoken: line 1: expected 'base64-token rank'"),
        (["--dtype=float16"], r"bad value for --dtype: 'float16' \(must be 'auto', 'float32' or 'bfloat16'\)"),
        ([f"--judge={t}/missing-rm.pt"], r"missing-rm.pt: no such checkpoint"),
        (["--judge=no_colon"], r"bad value for --judge: 'no_colon'"),
        (["--dpo_iters=ten"], r"bad value for --dpo_iters: 'ten' is not a int"),
    ]


def test_bad_inputs_stop_with_one_line(tiny_run, tmp_path, capsys):
    """Each bad input of the table stops with a one-line message naming the file or setting, never a
    traceback, and never suggests unpickling (weights_only=False); the pickled objects in the table
    (a checkpoint's, a Hugging Face folder's) never run (they would print UNPICKLED)."""
    for i, (args, message) in enumerate(bad_inputs(tmp_path, tiny_run)):
        out = [a for a in args if a.startswith("--out_dir=")] or [f"--out_dir={tmp_path / f'run{i}'}"]
        with pytest.raises(SystemExit) as e:
            train.main(TINY + [a for a in args if not a.startswith("--out_dir=")] + out)
        msg = str(e.value.code)
        assert re.search(message, msg) and "\n" not in msg and "weights_only" not in msg, (args, msg)
    assert "UNPICKLED" not in capsys.readouterr().out


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


# ------------------------------------------------------------------------------------------------
# every file the project reads, fuzzed: one line per case

def cut(b):
    """Truncate: the first half of the file."""
    return b[:len(b) // 2]


def flip(at):
    """Flip 4 bytes (XOR 0xFF) at relative position `at` of the file."""
    return lambda b: b[:int(len(b) * at)] + bytes(x ^ 0xFF for x in b[int(len(b) * at):int(len(b) * at) + 4]) + b[int(len(b) * at) + 4:]


def json_edit(fn):
    """Edit a JSON file as an object: fn(obj) changes it in place."""
    def mutate(b):
        obj = json.loads(b)
        fn(obj)
        return json.dumps(obj).encode()
    return mutate


def lines_edit(fn):
    """Edit a JSON-lines file's first record in place."""
    def mutate(b):
        first, rest = b.split(b"\n", 1)
        record = json.loads(first)
        fn(record)
        return json.dumps(record).encode() + b"\n" + rest
    return mutate


def ck_edit(fn):
    """Edit a checkpoint's content in place, then write it back whole and with a valid digest: a file
    that is not corrupt, only wrong inside (edited, or from another version)."""
    def mutate(b):
        import io
        from checkpoint import digest
        ck = torch.load(io.BytesIO(b), weights_only=True)
        fn(ck)
        ck["sha256"] = digest({k: v for k, v in ck.items() if k != "sha256"})
        out = io.BytesIO()
        torch.save(ck, out)
        return out.getvalue()
    return mutate


def st_edit(fn):
    """Edit a safetensors file's JSON header in place (the data bytes stay)."""
    def mutate(b):
        n = int.from_bytes(b[:8], "little")
        header = json.loads(b[8:8 + n])
        fn(header)
        head = json.dumps(header).encode()
        return len(head).to_bytes(8, "little") + head + b[8 + n:]
    return mutate


def code(text):
    """A judge's or task's module source."""
    return lambda b: text.encode()


WTE = "transformer.wte.weight"
TASK_HEAD = "from task import Task\n"
FUZZ = [  # (file, mutation, the one line expected: it names the file, and the field where there is one)
    ("config.json", cut, r"config.json: not valid JSON"),
    ("config.json", flip(0), r"config.json: not valid JSON"),
    ("config.json", json_edit(lambda c: c.update(beta="abc")), r"config.json: setting 'beta' is 'abc', not a float"),
    ("config.json", json_edit(lambda c: c.update(n_layer=2.5)), r"config.json: setting 'n_layer' is 2.5, not a int"),
    ("config.json", code("[1, 2]"), r"config.json: holds a list, not the run's settings"),
    ("ckpt.pt", cut, r"ckpt.pt: not a checkpoint of this project \(unreadable"),
    ("ckpt.pt", flip(0.7), r"ckpt.pt: (corrupted|not a checkpoint of this project)"),
    ("ckpt.pt", ck_edit(lambda c: c.update(step="two")), r"ckpt.pt: field 'step' is 'two', not a step"),
    ("ckpt.pt", ck_edit(lambda c: c.pop("optimizer")), r"ckpt.pt: no field 'optimizer'"),
    ("ckpt.pt", ck_edit(lambda c: c.update(stage="banana")), r"ckpt.pt: field 'stage' is 'banana', not one of"),
    ("ckpt.pt", ck_edit(lambda c: c.update(rng="x")), r"ckpt.pt: field 'rng' is 'x', not RNG states"),
    ("ckpt.pt", ck_edit(lambda c: c["model_args"].update(n_embd=32)), r"ckpt.pt: field 'model': its weights do not fit 'model_args'"),
    ("ckpt.pt", ck_edit(lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(3))),
     r"ckpt.pt: field 'optimizer': 'exp_avg' of parameter 0 has shape \(3,\)"),
    ("ref.pt", cut, r"ref.pt: not a checkpoint of this project \(unreadable"),
    ("ref.pt", flip(0.7), r"ref.pt: (corrupted|not a checkpoint of this project)"),
    ("ref.pt", ck_edit(lambda c: c["model_args"].update(n_head=3)), r"ref.pt: its weights do not fit its model shape"),
    ("ref.pt", ck_edit(lambda c: c.update(kind="ScalarGPT")), r"ref.pt: holds a reward model, where a language model"),
    ("ref.pt", ck_edit(lambda c: c.pop("model_args")), r"ref.pt: not a checkpoint of this project \(no weights, shape"),
    ("model.safetensors", cut, r"model.safetensors: tensor '[\w.]+': field 'data_offsets' .* is not a range"),
    ("model.safetensors", flip(0), r"model.safetensors: unreadable safetensors header"),
    ("model.safetensors", st_edit(lambda h: h[WTE].update(shape="big")), rf"model.safetensors: tensor '{WTE}': field 'shape' is 'big'"),
    ("model.safetensors", st_edit(lambda h: h[WTE].pop("dtype")), rf"model.safetensors: tensor '{WTE}': its header entry needs dtype"),
    ("model.safetensors", st_edit(lambda h: h[WTE].update(shape=[257, 32])), rf"model.safetensors: tensor '{WTE}' has \d+ bytes for shape \[257, 32\]"),
    ("hf/config.json", cut, r"hf/config.json: not valid JSON"),
    ("hf/config.json", json_edit(lambda c: c.update(n_embd="64")), r"hf/config.json: field 'n_embd' is '64', not a whole number"),
    ("hf/config.json", json_edit(lambda c: c.pop("n_layer")), r"hf/config.json: missing field 'n_layer'"),
    ("hf/config.json", json_edit(lambda c: c.update(n_head=3)), r"hf/config.json: field 'n_head' \(3\) does not divide 'n_embd' \(64\)"),
    ("hf/config.json", json_edit(lambda c: c.update(n_layer=3)), r"model.safetensors: no weights for \['transformer.h.2"),
    ("toy.tiktoken", cut, r"toy.tiktoken: line \d+: expected 'base64-token rank'"),
    ("toy.tiktoken", flip(0), r"toy.tiktoken: line 1: expected 'base64-token rank'"),
    ("toy.tiktoken", lambda b: b.replace(b" 5\n", b" five\n"), r"toy.tiktoken: line 6: expected 'base64-token rank'"),
    ("toy.tiktoken", lambda b: b"".join(b.splitlines(keepends=True)[:100] + b.splitlines(keepends=True)[101:]),
     r"toy.tiktoken: ranks are not 0..256, each once"),
    ("toy.tiktoken", lambda b: b.replace(b"ZA== 100\n", b"eHl6 100\n", 1), r"toy.tiktoken: 1 of the 256 single bytes have no rank \(byte 100"),
    ("pairs.jsonl", cut, r"pairs.jsonl: line \d+: invalid JSON"),
    ("pairs.jsonl", flip(0.5), r"pairs.jsonl: (cannot read as UTF-8|line \d+: invalid JSON)"),
    ("pairs.jsonl", lines_edit(lambda r: r.update(chosen=5)), r"pairs.jsonl: line 1: field 'chosen': expected a string"),
    ("pairs.jsonl", lines_edit(lambda r: r.pop("rejected")), r"pairs.jsonl: line 1: missing field 'rejected'"),
    ("pairs.jsonl", lines_edit(lambda r: r.update(prompt=["x"])), r"pairs.jsonl: line 1: field 'prompt': expected a string"),
    ("judge.py", code("def judge(p, a, b):\n    return 0 if len(a) <\n"), r"--judge=\w+:judge: cannot load it \(SyntaxError: .*, line 2\)"),
    ("judge.py", code("raise RuntimeError('no GPU here')\n"), r"--judge=\w+:judge: cannot load it \(RuntimeError: no GPU here\)"),
    ("judge.py", code("judge = 5\n"), r"--judge=\w+:judge: not callable"),
    ("task.py", code("def make(seed)\n    pass\n"), r"--task=\w+:make: cannot load it \(SyntaxError: .*, line 1\)"),
    ("task.py", code("def make(seed):\n    return {}['pairs']\n"), r"--task=\w+:make: raised KeyError: 'pairs'"),
    ("task.py", code("def make(seed):\n    return {'pairs': []}\n"), r"--task=\w+:make: returned dict, not a task.Task"),
    ("task.py", code(TASK_HEAD + "def make(seed):\n    return Task('t', pairs='abc')\n"), r"--task=\w+:make: field 'pairs': expected a list"),
    ("task.py", code(TASK_HEAD + "def make(seed):\n    return Task('t', pairs=[dict(prompt='p', chosen=5, rejected='b')])\n"),
     r"--task=\w+:make: pairs\[0\]: field 'chosen': expected a string"),
    ("task.py", code(TASK_HEAD + "def make(seed):\n    return Task('t', pairs=[], reward=5)\n"), r"--task=\w+:make: field 'reward': not a function"),
]


@pytest.fixture(scope="module")
def fuzz_sources(tiny_run, small_file, tmp_path_factory):
    """What the cases mutate, made once: a run stopped at DPO step 2 (config.json, ckpt.pt), a
    reference, a Hugging Face folder, a .tiktoken file (256 bytes + 2 merges), a preference file."""
    src = tmp_path_factory.mktemp("fuzz")
    run_train(src / "stopped", f"--init_from={tiny_run[0]}/ref.pt", *FAST, "--dpo_iters=4", f"--data={small_file}", "--stop_at=2")
    tiny_model(seed=10, vocab_size=257, n_embd=64, block_size=160).save_pretrained(str(src / "hf"))
    (src / "toy.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(
        [bytes([i]) for i in range(256)] + [b"th", b"the"])))
    return src


@pytest.mark.parametrize("i", range(len(FUZZ)), ids=[f"{i}-{f[0]}" for i, f in enumerate(FUZZ)])
def test_every_file_read_is_fuzzed(tiny_run, small_file, fuzz_sources, tmp_path, monkeypatch, capsys, i):
    """Each file the project reads, by kind (a run's config.json and checkpoint on --init_from=resume;
    a reference checkpoint, a Hugging Face folder's config.json and safetensors, a .tiktoken file, a
    preference file, a judge's and a task's module, each given to a new run with --overwrite=True into
    a finished run's folder), truncated, with bytes flipped, a value of the wrong type, a field
    dropped or an inconsistent shape: the run stops with one line naming the file (and the field),
    a non-zero exit, and nothing in out_dir changed: --overwrite=True deletes nothing before every
    input is known to be good. (A field dropped from config.json is not an error: the checkpoint's
    value is taken, test_checkpoint.py.)"""
    name, mutate, message = FUZZ[i]
    src, args = fuzz_sources, []
    if name in ("config.json", "ckpt.pt"):  # the run's own files, on resume
        out = tmp_path / "run"
        shutil.copytree(src / "stopped", out)
        target, argv = out / name, ["--init_from=resume", f"--out_dir={out}"]
    else:  # a new run's input, into a finished run's folder with --overwrite=True
        out = tmp_path / "finished"
        shutil.copytree(tiny_run[0], out)
        if name in ("model.safetensors", "hf/config.json"):
            shutil.copytree(src / "hf", tmp_path / "hf")
            target, args = tmp_path / "hf" / name.removeprefix("hf/"), [f"--init_from={tmp_path / 'hf'}", "--sft_iters=0"]
        elif name == "ref.pt":
            target, args = tmp_path / "ref.pt", [f"--init_from={tmp_path / 'ref.pt'}", "--sft_iters=0"]
            shutil.copy(f"{tiny_run[0]}/ref.pt", target)
        elif name in ("toy.tiktoken", "pairs.jsonl"):
            target = tmp_path / name
            shutil.copy(src / "toy.tiktoken" if name == "toy.tiktoken" else small_file, target)
            args = [f"--tokenizer={target}" if name == "toy.tiktoken" else f"--data={target}"]
        else:  # a module of one's own, under a name no earlier case imported
            module = f"fuzz_{name[:-3]}_{i}"
            target = tmp_path / f"{module}.py"
            target.write_text("")
            monkeypatch.syspath_prepend(str(tmp_path))
            args = [f"--judge={module}:judge" if name == "judge.py" else f"--task={module}:make"]
        argv = TINY + FAST + args + [f"--out_dir={out}", "--overwrite=True"]
    target.write_bytes(mutate(target.read_bytes()))
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(out.rglob("*"))}
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    msg = str(e.value.code)
    assert re.search(message, msg) and "\n" not in msg and "Traceback" not in msg, msg
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(out.rglob("*"))} == before
