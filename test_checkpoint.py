"""
Tests of checkpoint.py: the file format (atomic, finite, verified by its digest, never unpickling
code), then resuming runs: exactly, before the first checkpoint, during SFT, and never another run.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import runtime
import train
from checkpoint import digest, load_checkpoint, load_model, save_checkpoint
from conftest import FAST, HERE, TINY, full_disk, read_metrics, run_train, tiny_model
from model import ScalarGPT


# ------------------------------------------------------------------------------------------------
# the file format

class Payload:
    """An object that would run code if unpickled."""
    def __reduce__(self):
        return (print, ("UNPICKLED",))


def test_checkpoint_round_trip_and_kinds(tmp_path):
    """save_checkpoint then load_model gives the same weights; the stored sha256 is the digest of
    everything else in the file. A reward model (ScalarGPT) is refused where a policy is asked for,
    and the other way round, each message naming what the file holds."""
    m, path = tiny_model(), str(tmp_path / "a.pt")
    sha = save_checkpoint(path, m, step=3)
    ck = load_checkpoint(path)
    assert ck["sha256"] == sha == digest({k: v for k, v in ck.items() if k != "sha256"}) and ck["step"] == 3
    assert torch.equal(load_model(path).transformer.wte.weight, m.transformer.wte.weight)
    with pytest.raises(ValueError, match="a.pt: holds a language model \\(policy\\), where a reward model is needed"):
        load_model(path, kind="ScalarGPT")
    save_checkpoint(str(tmp_path / "rm.pt"), ScalarGPT.from_model(m))
    with pytest.raises(ValueError, match="rm.pt: holds a reward model, where a language model"):
        load_model(str(tmp_path / "rm.pt"))


def test_digest_sees_every_byte_and_shape():
    """The digest changes when one bit of one float changes (1.0 -> nextafter(1.0)), when the same
    bytes take another shape, or when a non-tensor value changes; equal content gives equal digests
    whatever the dict order."""
    x = torch.ones(4)
    base = digest({"a": x, "b": [1, "s"]})
    assert digest({"b": [1, "s"], "a": x.clone()}) == base
    y = x.clone()
    y[2] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    assert digest({"a": y, "b": [1, "s"]}) != base
    assert digest({"a": x.reshape(2, 2), "b": [1, "s"]}) != base
    assert digest({"a": x, "b": [2, "s"]}) != base


def test_corrupt_truncated_and_foreign_files_are_refused(tmp_path, capsys):
    """Bytes flipped in the middle of a checkpoint (inside a weight tensor's data: torch.load still
    reads it) are caught by the checksum; a truncated file, a file of something else, a checkpoint
    without a checksum and a file carrying a pickled object are each 'not a checkpoint of this
    project', and the pickled object's code never runs (nothing printed) and is never suggested."""
    m, path = tiny_model(), tmp_path / "ckpt.pt"
    save_checkpoint(str(path), m)
    raw = bytearray(path.read_bytes())
    mid = raw.find(m.transformer.wte.weight.detach().numpy().tobytes()[:64]) + 32  # inside wte's bytes
    assert mid > 32
    flipped = raw[:mid] + bytes(b ^ 0xFF for b in raw[mid:mid + 4]) + raw[mid + 4:]
    (tmp_path / "flipped.pt").write_bytes(flipped)
    torch.load(tmp_path / "flipped.pt", weights_only=True)  # torch itself does not notice
    with pytest.raises(ValueError, match="flipped.pt: corrupted: its content does not match the checksum"):
        load_checkpoint(str(tmp_path / "flipped.pt"))
    (tmp_path / "short.pt").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "text.pt").write_text("hello")
    torch.save(dict(model=m.state_dict(), model_args={}), tmp_path / "nosum.pt")
    torch.save(dict(model=m.state_dict(), extra=Payload()), tmp_path / "evil.pt")
    for name in ("short.pt", "text.pt", "nosum.pt", "evil.pt"):
        with pytest.raises(ValueError, match=f"{name}: not a checkpoint of this project") as e:
            load_checkpoint(str(tmp_path / name))
        assert "weights_only" not in str(e.value)
    assert "UNPICKLED" not in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="missing.pt: no such checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_save_is_atomic_and_refuses_non_finite_weights(tmp_path):
    """A write that fails half-way (a lambda cannot be pickled) leaves the previous file whole, and
    no .tmp behind a failed OS write; weights holding a NaN or an inf are never written."""
    m, path = tiny_model(), str(tmp_path / "ckpt.pt")
    save_checkpoint(path, m, step=1)
    with pytest.raises(Exception):
        save_checkpoint(path, m, step=2, bad=lambda: 0)
    assert load_checkpoint(path)["step"] == 1
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="ckpt.pt: not written: non-finite weights in transformer.h.0.mlp.c_fc.weight"):
        save_checkpoint(path, m, step=3)
    assert load_checkpoint(path)["step"] == 1
    with pytest.raises(OSError, match="nodir/x.pt: cannot write it"):
        save_checkpoint(str(tmp_path / "nodir" / "x.pt"), tiny_model())


# ------------------------------------------------------------------------------------------------
# resuming a run

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
    seeding torch with --policy_seed, whatever SFT left. The log is cut back to where ref.pt was
    written, so it holds each DPO step once. An out_dir with no run in it: a one-line refusal."""
    out = tmp_path / "run"
    run_train(out, f"--init_from={tiny_run[0]}/ref.pt", "--sft_iters=2", *FAST[1:], "--dpo_iters=2", "--dropout=0.1")
    first = [r["loss"] for r in read_metrics(out) if r["stage"] == "dpo"]
    os.remove(out / "ckpt.pt")
    run_train(out, "--init_from=resume")
    dpo = [r for r in read_metrics(out) if r["stage"] == "dpo"]
    assert [r["step"] for r in dpo] == [1, 2] and [r["loss"] for r in dpo] == first
    assert [r["stage"] for r in read_metrics(out)].count("final") == 1
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


def torchrun(out, *args):
    """train.py under `torchrun --nproc_per_node=2` (gloo, one thread each); returns its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args,
           f"--out_dir={out}"]
    p = subprocess.run(cmd, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


def test_ddp_resume_restores_every_ranks_rng(tiny_run, small_file, tmp_path):
    """Two processes under torchrun, dropout 0.1: rank r seeds torch with policy_seed + r, so the ranks
    draw different dropout masks. 4 DPO steps in one go, and 2 steps + stop + resume for 2 more, give
    the same weights bit for bit and the same logged losses: each rank restores its own RNG state
    from ckpt.pt (which holds one per rank). Restoring rank 0's state on both ranks gives rank 1 rank
    0's masks from step 3 on, and other weights. (Batches: every rank cuts its slice from one shared
    position, restored from the checkpoint; gloo adds two gradients in the same order each time.)"""
    args = [*TINY, f"--init_from={tiny_run[0]}/ref.pt", *FAST, "--dpo_iters=4", "--batch_size=4", "--grad_accum=2",
            "--dpo_lr=1e-3", "--dropout=0.1", f"--data={small_file}"]
    torchrun(tmp_path / "a", *args)
    torchrun(tmp_path / "b", *args, "--stop_at=2")
    assert len(load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["rng"]) == 2
    torchrun(tmp_path / "b", "--init_from=resume")
    a, b = (load_checkpoint(str(tmp_path / d / "ckpt.pt"))["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = ([r["loss"] for r in read_metrics(tmp_path / d) if r["stage"] == "dpo"] for d in "ab")
    assert la == lb and len(la) == 4


def test_kill_9_then_resume_logs_each_step_once(tiny_run, small_file, tmp_path):
    """`kill -9` during DPO, with a checkpoint every 3 steps: the steps logged after the last checkpoint
    are lost work, not lost records. The resumed run cuts metrics.jsonl back to where that checkpoint
    was written (ckpt.pt records the log's length) and takes those steps again, so the log holds steps
    1..N once each, with the same losses, and the final weights equal an uninterrupted run's."""
    args = [f"--init_from={tiny_run[0]}/ref.pt", *FAST, "--dpo_lr=1e-3", "--eval_interval=1000", "--ckpt_interval=3",
            f"--data={small_file}"]
    p = subprocess.Popen([sys.executable, "train.py", *TINY, *args, "--dpo_iters=1000", f"--out_dir={tmp_path / 'b'}"],
                         cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "b" / "metrics.jsonl"
    for _ in range(2400):  # until a step past a checkpoint is logged
        steps = [json.loads(line)["step"] for line in open(metrics) if '"dpo"' in line] if metrics.exists() else []
        if len(steps) >= 4 and steps[-1] % 3:
            break
        time.sleep(0.05)
    p.kill()
    p.wait()
    saved = load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["step"]
    assert saved % 3 == 0 and max(steps) > saved  # steps were logged after the last checkpoint
    n = saved + 2
    train.main(["--init_from=resume", f"--out_dir={tmp_path / 'b'}", f"--dpo_iters={n}"])
    run_train(tmp_path / "a", *args, f"--dpo_iters={n}")
    la, lb = ([(r["step"], r["loss"]) for r in read_metrics(tmp_path / d) if r["stage"] == "dpo"] for d in "ab")
    assert [s for s, _ in lb] == list(range(1, n + 1)) and lb == la
    a, b = (load_checkpoint(str(tmp_path / d / "ckpt.pt"))["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_broken_missing_or_older_config(tiny_run, small_file, tmp_path, capsys):
    """A run stopped at DPO step 2 (of 4), then its out_dir/config.json: broken JSON, or a value of the
    wrong type, stops the resume with one line naming the file (and the setting); deleted, the
    settings stored in ckpt.pt are used (the run goes on to step 3); written by an older version
    that did not know --task (removed from config.json and from the checkpoint's settings), the run
    takes task's default '' and says so in one line, then finishes: steps 1-4, once each."""
    out = tmp_path / "run"
    run_train(out, f"--init_from={tiny_run[0]}/ref.pt", *FAST, "--dpo_iters=4", f"--data={small_file}", "--stop_at=2")
    settings = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text('{"beta": 1.0,')
    with pytest.raises(SystemExit, match=r"run/config.json: not valid JSON \(.*\); fix it, or delete it"):
        train.main(["--init_from=resume", f"--out_dir={out}"])
    (out / "config.json").write_text(json.dumps(dict(settings, beta="abc")))
    with pytest.raises(SystemExit, match=r"run/config.json: setting 'beta' is 'abc', not a float"):
        train.main(["--init_from=resume", f"--out_dir={out}"])
    (out / "config.json").unlink()
    train.main(["--init_from=resume", f"--out_dir={out}", "--stop_at=3"])
    assert "run/config.json is missing: resuming with the settings stored in" in capsys.readouterr().out
    older = {k: v for k, v in settings.items() if k != "task"}
    (out / "config.json").write_text(json.dumps(older))
    ck = load_checkpoint(str(out / "ckpt.pt"))
    ck["config"].pop("task")
    ck["sha256"] = digest({k: v for k, v in ck.items() if k != "sha256"})
    torch.save(ck, out / "ckpt.pt")
    train.main(["--init_from=resume", f"--out_dir={out}"])
    shown = capsys.readouterr().out
    assert "run/config.json predates --task: the run continues with its default (task='')" in shown
    assert [r["step"] for r in read_metrics(out) if r["stage"] == "dpo"] == [1, 2, 3, 4]


def test_a_full_disk_while_writing_a_checkpoint(tiny_run, small_file, tmp_path, monkeypatch):
    """A run stopped at DPO step 2 (of 4) is resumed on a disk that fills after 4 kB: the checkpoint
    at step 3 cannot be written. The run stops with one line naming ckpt.pt and the cause (not
    torch's 'unexpected pos' message), leaves no ckpt.pt.tmp, and the previous ckpt.pt (step 2)
    stays whole: resumed once there is room, the run finishes with steps 1-4 logged once each."""
    out = tmp_path / "run"
    run_train(out, f"--init_from={tiny_run[0]}/ref.pt", *FAST, "--dpo_iters=4", "--ckpt_interval=1", f"--data={small_file}",
              "--stop_at=2")
    full_disk(monkeypatch, runtime, {"ckpt.pt.tmp"}, room=4096)
    with pytest.raises(SystemExit, match=r"run/ckpt.pt: cannot write it \(No space left on device\); the previous file, "
                                         r"if any, is intact"):
        train.main(["--init_from=resume", f"--out_dir={out}"])
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] == 2 and not (out / "ckpt.pt.tmp").exists()
    monkeypatch.undo()
    train.main(["--init_from=resume", f"--out_dir={out}"])
    assert [r["step"] for r in read_metrics(out) if r["stage"] == "dpo"] == [1, 2, 3, 4]
