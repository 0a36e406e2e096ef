"""
Tests of runtime.py: the learning-rate schedule, clipping, the divergence guard (by hand, then in a
run), one run per output folder, and stopping on a signal.
"""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import runtime
import train
from checkpoint import load_checkpoint
from conftest import FAST, HERE, TINY, full_disk, read_metrics, run_train


# ------------------------------------------------------------------------------------------------
# the optimizer's schedule and clipping

def test_lr_schedule_warmup_constant_and_cosine():
    """lr_at(step, peak=1e-3, warmup=10, ...): step 0 gets peak*1/10 = 1e-4 (never 0), step 4 gets
    peak*5/10 = 5e-4, step 9 the peak; constant after that. Cosine over total=110 steps: at step 10
    frac = 0 -> peak*(0.1 + 0.9*0.5*(1+cos 0)) = peak; at step 60 frac = 0.5 -> peak*(0.1 + 0.45)
    = 5.5e-4; at step 110 frac = 1 -> 0.1*peak = 1e-4. No warm-up: step 0 already has the peak."""
    lr = lambda s, cosine=False, warmup=10: runtime.lr_at(s, 1e-3, warmup, 110, cosine)
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
        assert runtime.clip_and_step([w], opt, clip).item() == pytest.approx(5.0)
        assert w.detach().tolist() == pytest.approx(expected) and w.grad is None
    w.grad = torch.tensor([float("nan"), 1.0])
    assert not torch.isfinite(runtime.clip_and_step([w], opt, 1.0))
    assert w.detach().tolist() == pytest.approx([-3.0, -4.0])


# ------------------------------------------------------------------------------------------------
# the divergence guard

def test_guard_rules_by_hand(tmp_path):
    """The divergence rule with --diverge=100: the first loss 0.5 sets the scale max(0.5, 1) = 1, so a
    loss of 99 passes and 101 stops the run; a NaN loss stops it. One weight w = 3 has norm 3: a step
    to 5.9 (< 2 x 3) passes, then a step from 5.9 to 12 (> 11.8) stops it, as does a non-finite
    gradient norm. Every stop names the last good checkpoint it was given."""
    cfg = train.parse_config([f"--out_dir={tmp_path}", "--diverge=100"])
    w = torch.nn.Parameter(torch.tensor([3.0]))
    guard = runtime.Guard(cfg, SimpleNamespace(ddp=False), "dpo", [torch.nn.ParameterList([w])], "out/ckpt.pt (dpo step 7)")
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


# ------------------------------------------------------------------------------------------------
# one run per folder; stopping on a signal

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


def test_an_out_dir_that_cannot_be_written(tmp_path, monkeypatch):
    """An out_dir on a read-only file system stops the run before any work, with one line naming the
    folder and the cause. Simulated: the folder's write probe fails with EROFS (as root, which these
    tests may run as, a chmod'ed folder stays writable). Where the tests do not run as root, a real
    folder with mode 0o500 is refused the same way (EACCES)."""
    real_open = open

    def read_only(path, mode="r", *args, **kw):
        if ".write-test-" in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, mode, *args, **kw)
    monkeypatch.setattr(runtime, "open", read_only, raising=False)
    with pytest.raises(SystemExit, match=r"--out_dir=.*/ro: cannot write there \(Read-only file system\)"):
        run_train(tmp_path / "ro", *FAST)
    monkeypatch.undo()
    if os.geteuid() != 0:
        (tmp_path / "locked").mkdir(mode=0o500)
        with pytest.raises(SystemExit, match=r"--out_dir=.*/locked: cannot write there \(Permission denied\)"):
            run_train(tmp_path / "locked", *FAST)


@pytest.mark.parametrize("name", ["config.json.tmp", "metrics.jsonl", "ref.pt.tmp", "eval.json.tmp", "model.safetensors.tmp"])
def test_a_full_disk_at_every_write(tiny_run, tmp_path, monkeypatch, name):
    """Every file a run writes, on a disk that fills while it is written (ENOSPC after 64 bytes; the
    log's after 400, so that its first line fits): the
    run stops with one line naming the file and 'No space left on device', and leaves no torn file:
    no config.json, ref.pt or eval.json at all (never a 0-byte one), no NAME.tmp; a metrics log that
    holds only whole lines; an export folder that is not there (rather than half written). (The
    checkpoint's own case, resumed afterwards, is in test_checkpoint.py.)"""
    full_disk(monkeypatch, runtime, {name}, room=400 if name == "metrics.jsonl" else 64)  # the log: a line fits, then not
    base = [f"--init_from={tiny_run[0]}/ref.pt", *FAST, "--dpo_iters=1"]
    out = tmp_path / "run"
    argv = {"config.json.tmp": base, "metrics.jsonl": base, "eval.json.tmp": base,
            "ref.pt.tmp": [*FAST, "--sft_iters=2", "--dpo_iters=1"],
            "model.safetensors.tmp": [f"--init_from={tiny_run[0]}/ckpt.pt", "--eval_only=True", "--eval_samples=2",
                                      f"--export={tmp_path / 'hf'}"]}[name]
    with pytest.raises(SystemExit) as e:
        run_train(out, *argv)
    file = name.removesuffix(".tmp")
    assert re.search(rf"{file}: cannot write it \(No space left on device\)", str(e.value.code)), e.value.code
    assert "\n" not in str(e.value.code)
    left = [p.name for p in tmp_path.rglob("*")]
    assert not [f for f in left if f.endswith(".tmp")] and "hf" not in left
    if file == "metrics.jsonl":
        lines = (out / file).read_text().splitlines()
        assert len(lines) >= 1 and all(json.loads(line) for line in lines)
    elif file != "model.safetensors":
        assert file not in left


def test_one_run_per_folder_at_a_time(tiny_run, small_file, tmp_path):
    """A run holds a lock on its out_dir for its whole life. A second run into the folder while the
    first trains stops at once, with or without --overwrite=True, naming the first's process id
    and command line. After the first is killed with kill -9 the
    operating system has dropped its lock: the folder resumes at once."""
    args = [f"--init_from={tiny_run[0]}/ref.pt", *FAST, "--eval_interval=1000", "--ckpt_interval=2", f"--data={small_file}"]
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "train.py", *TINY, *args, "--dpo_iters=1000", f"--out_dir={out}"],
                         cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(2400):  # until it has trained a step past its first checkpoint
            if (out / "ckpt.pt").exists():
                break
            time.sleep(0.05)
        for extra in ([], ["--overwrite=True"], ["--init_from=resume"]):
            with pytest.raises(SystemExit, match=rf"--out_dir={out} is in use by another run \(process {p.pid}: .*train.py"):
                run_train(out, *args, *extra) if extra != ["--init_from=resume"] else train.main([*extra, f"--out_dir={out}"])
    finally:
        p.kill()
        p.wait()
    assert (out / "ref.pt").exists()
    train.main(["--init_from=resume", f"--out_dir={out}", f"--dpo_iters={load_checkpoint(str(out / 'ckpt.pt'))['step'] + 1}"])
