"""
Tests of train.py (and bench.py): the stages as units, then tiny end-to-end runs: smoke, resume,
DDP, configuration errors, online DPO and judges, every loss type, a GPT-2 folder.
"""
import base64
import gzip
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
import tiktoken
import torch

import data
import train
from test_model import hf_state_dict, tiny_model, write_config, write_safetensors


HERE = os.path.dirname(os.path.abspath(__file__))


# ================================================================================================
# train.py: a tiny end-to-end run, resume, DDP, configuration errors, online DPO and judges

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=160", "--batch_size=8", "--sft_batch_size=16",
        "--eval_pairs=32", "--eval_samples=8", "--max_new_tokens=24", "--show_samples=1", "--log_interval=1",
        "--dtype=float32", "--warmup_iters=2"]


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
    assert dpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert dpo[0]["rewards/accuracies"] == 0.0 and dpo[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert sum(r["loss"] for r in dpo[-4:]) / 4 < math.log(2) - 0.1
    assert ev["pref_accuracy"] > 0.6
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["step"] == 16 and ck["config"]["dpo_iters"] == 16
    assert not any(k.startswith("_orig_mod.") for k in ck["model"])


def test_resume_matches_uninterrupted_run(tiny_run, tmp_path):
    """6 DPO steps in one go, and 3 steps + stop + resume for 3 more, give the same per-step
    losses (same weights, optimizer state, batches and RNG after the restart)."""
    ref = os.path.join(tiny_run[0], "ref.pt")
    common = [f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=6", "--dpo_lr=1e-3", "--eval_samples=4"]
    run_train(tmp_path / "a", *common)
    run_train(tmp_path / "b", *common, "--stop_at=3")
    assert not os.path.exists(tmp_path / "b" / "eval.json")  # a stopped run does not evaluate
    run_train(tmp_path / "b", *common[1:], "--init_from=resume")
    la = [r["loss"] for r in read_metrics(tmp_path / "a") if r["stage"] == "dpo"]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b") if r["stage"] == "dpo"]
    assert len(la) == len(lb) == 6
    assert la == pytest.approx(lb, abs=1e-6)


def test_ddp_matches_single_process(tiny_run, tmp_path):
    """torchrun with 2 CPU processes (gloo), 4 pairs each, 1 micro-step, equals one process with
    4 pairs x 2 micro-steps: the same 8 pairs per step, gradients averaged the same way, so the
    updates after 3 steps agree to float tolerance: |w_ddp - w_single| / |w_single - w_0| < 1e-3.
    (Not elementwise: the key bias gets a gradient that is exactly 0 in exact arithmetic, since a
    constant added to every key's score cancels in the softmax; Adam divides the ~1e-10 rounding
    noise by its own tiny scale and turns it into updates of either sign.)"""
    ref = os.path.join(tiny_run[0], "ref.pt")
    common = [f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=3", "--dpo_lr=1e-3", "--batch_size=4",
              "--grad_accum=2", "--eval_samples=4"]
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


@pytest.mark.parametrize("arg, message", [
    ("--beta", "use --key=value"),
    ("--betta=0.1", "unknown setting 'betta'; valid settings: data, tokenizer"),
    ("--beta=abc", "bad value for --beta: 'abc' is not a float"),
    ("--beta=0", "bad value for --beta: 0.0 (must be > 0)"),
    ("--online=maybe", "bad value for --online"),
    ("--loss_type=kto", "bad value for --loss_type"),
    ("--optimizer=sgd", "bad value for --optimizer"),
    ("--judge=nocolon", "bad value for --judge"),
])
def test_bad_config_values(arg, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.parse_config([arg])


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    shown = capsys.readouterr().out
    assert all(f"--{k}=" in shown for k in train.CONFIG)


def test_eval_only_samples_a_checkpoint(tiny_run, capsys):
    out = tiny_run[0]
    res = train.main(TINY + [f"--init_from={out}/ckpt.pt", "--eval_only=True", f"--out_dir={out}",
                             "--prompt=Honestly, the comedy felt"])
    shown = capsys.readouterr().out
    assert "policy: 'Honestly, the comedy felt' ->" in shown and "reference: " in shown
    assert 0 <= res["win_rate"] <= 1 and "kl" in res


def prefer_shorter(prompt, a, b):
    """A toy judge for the tests: the shorter response wins; equal lengths tie."""
    return None if len(a) == len(b) else (0 if len(a) < len(b) else 1)


def judge_that_raises(prompt, a, b):
    raise RuntimeError("reward model offline")


def test_online_dpo_with_a_pluggable_judge(tiny_run, tmp_path):
    """Online DPO: fresh pairs from the policy, labelled by a toy judge given as module:function.
    Every step logs how many pairs the judge labelled and how many ties it skipped; the run ends
    with the usual evaluation (win rate under that judge)."""
    ref = os.path.join(tiny_run[0], "ref.pt")
    res = run_train(tmp_path, f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=4", "--online=True",
                    "--judge=test_train:prefer_shorter", "--eval_samples=8")
    dpo = [r for r in read_metrics(tmp_path) if r["stage"] == "dpo"]
    assert len(dpo) == 4 and dpo[-1]["online_pairs"] + dpo[-1]["online_ties"] == 4 * 8
    assert dpo[-1]["online_pairs"] > 0 and 0 <= res["win_rate"] <= 1


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:judge", "--judge=no_such_module_xyz:judge: cannot load it"),
    ("test_train:no_such_function", "--judge=test_train:no_such_function: cannot load it"),
    ("test_train:judge_that_raises", "judge test_train:judge_that_raises raised RuntimeError: reward model offline"),
])
def test_bad_judges_name_themselves(tiny_run, tmp_path, spec, message):
    ref = os.path.join(tiny_run[0], "ref.pt")
    with pytest.raises(SystemExit, match=re.escape(message)):
        run_train(tmp_path, f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=2", "--online=True", f"--judge={spec}")


def test_bench_quick(capsys):
    """bench.py --quick runs and ends with one JSON line holding every figure."""
    import bench
    bench.main(["--quick"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    assert res["ceiling_gflops"]["fp32"] > 0 and len(res["dpo_step"]) == 2
    assert all(r["sec_per_step"] > 0 and 0 < r["mfu"] < 1.5 for r in res["dpo_step"])
    assert [s["cache"] for s in res["sampling"]] == [True, False]


@pytest.mark.parametrize("args, first_loss", [
    (["--loss_type=sigmoid", "--label_smoothing=0.2", "--optimizer=rmsprop", "--precompute_ref=True"], math.log(2)),
    (["--loss_type=ipo", "--beta=0.5"], 1.0),
    (["--loss_type=hinge"], 1.0),
    (["--reference_free=True"], None),
    (["--method=preferred_ft"], None),
])
def test_every_loss_type_trains(tiny_run, tmp_path, args, first_loss):
    """At DPO step 1 the policy is the reference, so h = 0 and the first loss is known by hand:
    conservative DPO -(1-eps) log sigmoid(0) - eps log sigmoid(0) = log 2 whatever eps;
    IPO (0 - 1/(2*0.5))^2 = 1; hinge relu(1 - 0) = 1. Reference-free DPO and Preferred-FT start
    elsewhere (the policy's own log-likelihoods); for them the run must simply stay finite."""
    ref = os.path.join(tiny_run[0], "ref.pt")
    res = run_train(tmp_path, f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=3", "--eval_samples=4", *args)
    dpo = [r for r in read_metrics(tmp_path) if r["stage"] == "dpo"]
    if first_loss is not None:
        assert dpo[0]["loss"] == pytest.approx(first_loss, abs=1e-5)
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
