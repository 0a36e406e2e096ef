"""
The run's plumbing, so that train.py can read as the recipe: processes (DDP), device and precision,
the output folder, the metrics log, stop signals, the optimizer and its schedule, and the divergence
guard that stops a run before it saves a broken model.
"""
import fcntl
import gc
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ppo import CRITIC_FREE

RUN_FILES = ("ref.pt", "sft.pt", "ckpt.pt", "config.json", "metrics.jsonl", "eval.json")


def print0(*a, **kw):
    """print, on rank 0 only (every process runs the same script)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **kw, flush=True)


def or_exit(fn, *args, **kw):
    """Bad input (a file, a field, a tokenizer, a checkpoint) stops with its message, not a traceback."""
    try:
        return fn(*args, **kw)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


class _Writes:
    """A file's write(), remembering the first OSError: torch.save reports a failed write (a full
    disk) as a RuntimeError of its own ('unexpected pos ...') that does not say why."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        self.f.flush()


def atomic_write(path, write):
    """Write a file so that a crash or a full disk at any moment leaves its old content or the new,
    never a torn file: `write(f)` fills path.tmp (binary), which is flushed to the disk and then
    renamed over `path`. On failure path.tmp is removed and an OSError names the file and the cause
    ('No space left on device')."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as raw:
            f = _Writes(raw)
            try:
                write(f)
            except RuntimeError as e:  # torch's report of a failed write; the OSError behind it, if any
                raise f.error or e
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise OSError(f"{path}: cannot write it ({why}); the previous file, if any, is intact") from None


def write_json(path, obj):
    """`obj` as JSON, written atomically (atomic_write)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


# ------------------------------------------------------------------------------------------------
# processes, device, precision

@dataclass
class Run:
    """Where and how this process runs, fixed by setup()."""
    ddp: bool               # launched by torchrun
    rank: int               # this process, 0 .. world - 1
    world: int              # processes
    device: str             # 'cpu', 'cuda:0', ...
    dtype: str              # 'float32' or 'bfloat16' (autocast)
    accum: int              # micro-steps per optimizer step, per process (grad_accum / world)
    out_dir: str
    t_start: float = field(default_factory=time.time)
    ref_sha256: Any = None  # the reference's checksum, once it exists (checkpoints name it)
    metrics: Any = None     # the open metrics.jsonl (rank 0, from start_run)
    lock: Any = None        # the out_dir's lock (rank 0 of a training run)
    seconds: dict = field(default_factory=dict)  # where the time went: phase -> seconds (mark)
    t_mark: float = None    # the last mark

    def add_seconds(self, phase, seconds):
        """Count `seconds` to `phase` in the run's profile."""
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def mark(self, phase):
        """The time since the last mark (or the start) is `phase`'s."""
        t = time.time()
        self.add_seconds(phase, t - (self.t_mark or self.t_start))
        self.t_mark = t

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        """Release the folder and close the log, however the run ends (an exit inside a test too)."""
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None:
            os.close(self.lock)
        self.metrics = self.lock = None
        if self.ddp and dist.is_initialized():
            gc.collect()  # a DDP wrapper left in a reference cycle holds the group; freed at exit it can abort
            dist.destroy_process_group()

    @property
    def master(self):
        return self.rank == 0

    @property
    def dev_type(self):
        return self.device.split(":")[0]

    @property
    def ctx(self):
        """The autocast context of every forward pass: bf16, or nothing (fp32)."""
        return torch.autocast(self.dev_type, dtype=torch.bfloat16) if self.dtype == "bfloat16" else nullcontext()

    def log(self, record):
        """One JSON line per log, evaluation and final record in metrics.jsonl, written by rank 0. A
        write that fails (a full disk) is undone, so the log never ends in a torn line."""
        if self.metrics:
            end, line = self.metrics.seek(0, os.SEEK_END), memoryview((json.dumps(record) + "\n").encode())
            try:
                while line:
                    line = line[self.metrics.write(line):]
            except OSError as e:
                self.metrics.truncate(end)
                sys.exit(f"{self.metrics.name}: cannot write it ({e.strerror or e}); it holds every record before this one")

    def log_bytes(self):
        """The metrics log's length: a checkpoint records it, and a resumed run cuts the log back to
        it, so that the steps taken after the last checkpoint (before a kill -9) are not logged twice."""
        return self.metrics.seek(0, os.SEEK_END) if self.metrics else None

    def cut_log(self, length, why):
        """Cut metrics.jsonl back to `length` bytes (a checkpoint's log_bytes)."""
        if self.metrics and length is not None and self.metrics.seek(0, os.SEEK_END) > length:
            self.metrics.truncate(length)
            self.metrics.seek(length)
            print0(f"{self.metrics.name}: cut back to {why}; the steps after it are logged again")


def cpu_has_bf16():
    """avx512_bf16 or AMX: bf16 matmuls several times faster than fp32 (see bench.py)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def setup(cfg):
    """Processes, device, precision and seed; the output folder checked and locked (start_run writes
    to it once every input is known to be good). -> Run, a context: leaving it releases the folder."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        check_device(device)
    if ddp and cfg.method in ("reward_model", "ppo", "best_of_n"):
        sys.exit(f"--method={cfg.method} runs in one process; torchrun (DDP) is supported for dpo, preferred_ft, "
                 f"unlikelihood, grpo and rloo")
    if cfg.grad_accum % world and cfg.method not in CRITIC_FREE:  # they take rollout_batch per process
        sys.exit(f"grad_accum ({cfg.grad_accum}) must be divisible by the number of processes ({world})")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype, dev_type = cfg.dtype, device.split(":")[0]
    if dtype == "auto":  # bf16 where the hardware multiplies it natively (measured faster), else fp32
        dtype = "bfloat16" if (torch.cuda.is_bf16_supported() if dev_type == "cuda" else
                               dev_type == "cpu" and cpu_has_bf16()) else "float32"
    torch.manual_seed(cfg.seed + rank)
    run = Run(ddp=ddp, rank=rank, world=world, device=device, dtype=dtype, accum=max(cfg.grad_accum // world, 1),
              out_dir=cfg.out_dir)
    try:
        check_out_dir(cfg, run)
    except BaseException:
        run.__exit__()  # a refusal after the lock was taken releases it
        raise
    print0(json.dumps(dict(vars(cfg), resolved_device=device, resolved_dtype=dtype, world_size=world), indent=1))
    return run


def check_device(device):
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        sys.exit(f"bad value for --device: {device!r} ({str(e).splitlines()[0]})")
    count = dict(cuda=torch.cuda.device_count(), mps=int(torch.backends.mps.is_available())).get(dev.type, 1)
    if count == 0 or (dev.index or 0) >= count:
        sys.exit(f"--device={device}: not available on this machine ({count} {dev.type} devices); try --device=cpu")


def check_out_dir(cfg, run):
    """out_dir exists (or is made) and can be written; a training run locks it (rank 0: one run per
    folder at a time), and it holds what the run needs: another run's checkpoints or results stop a
    new run unless --overwrite=True; a resumed run needs a run to continue. Nothing is changed here."""
    d = cfg.out_dir
    if os.path.exists(d) and not os.path.isdir(d):
        sys.exit(f"--out_dir={d} is a file, not a folder")
    try:
        os.makedirs(d, exist_ok=True)
        probe = os.path.join(d, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        sys.exit(f"--out_dir={d}: cannot write there ({e.strerror or e})")
    if cfg.eval_only:
        return
    if run.master:
        run.lock = lock_folder(d)
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(d, f))]
    if cfg.init_from == "resume":
        if "ref.pt" not in found and "sft.pt" not in found:
            sys.exit(f"--init_from=resume: {d} holds no run to continue (no ref.pt or sft.pt)")
        return
    if not cfg.overwrite and any(f.endswith(".pt") or f == "eval.json" for f in found):
        sys.exit(f"{d} holds another run's files ({', '.join(found)}): add --overwrite=True to replace them, "
                 f"--init_from=resume to continue that run, or choose another --out_dir")
    if os.path.basename(cfg.init_from) in found and os.path.abspath(os.path.dirname(cfg.init_from)) == os.path.abspath(d):
        sys.exit(f"--init_from={cfg.init_from} lies in the out_dir that --overwrite=True would clear; copy it elsewhere")


def lock_folder(d):
    """An advisory lock on the folder itself, held while the returned descriptor is open: a second run
    into it stops here, naming the holder. The operating system drops it when the process ends, so a
    kill -9 never leaves the folder locked, and no lock file is ever left behind."""
    fd = os.open(d, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        sys.exit(f"--out_dir={d} is in use by another run ({lock_holder(d)}); wait for it to end, or choose another --out_dir")
    return fd


def lock_holder(d):
    """'process PID: its command line', from /proc/locks (Linux), or what is known."""
    try:
        inode = os.stat(d).st_ino
        with open("/proc/locks") as f:
            pid = next(line.split()[4] for line in f if "FLOCK" in line and line.split()[5].endswith(f":{inode}"))
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"process {pid}: {f.read().replace(bytes(1), b' ').decode(errors='replace').strip()[:200]}"
    except (OSError, StopIteration, IndexError):
        return "a process on this machine"


def start_run(cfg, run, resumed):
    """The run's own files, once every input is known to be good: --overwrite deletes the old run's
    files only now; config.json gets the settings the run goes on with; the metrics log is opened,
    and a resumed run's is cut back to its checkpoint (so steps after it, before a kill, are logged once)."""
    if cfg.eval_only:
        return
    if cfg.init_from != "resume":
        if run.ddp:
            dist.barrier()  # every rank has looked before rank 0 deletes
        for f in RUN_FILES if run.master else ():
            if os.path.exists(os.path.join(cfg.out_dir, f)):
                os.remove(os.path.join(cfg.out_dir, f))
    if run.master:
        or_exit(write_json, os.path.join(cfg.out_dir, "config.json"), vars(cfg))
        run.metrics = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "ab", buffering=0)  # unbuffered: each line at once
        if resumed is not None:
            run.cut_log(resumed.get("log_bytes"), f"the {resumed['stage']} checkpoint (step {resumed.get('step', '-')})")


# ------------------------------------------------------------------------------------------------
# stopping on a signal

STOP = []  # (signal, time) of the stop request; the training loops check it after every step


def on_signal(signum, frame):
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's): finish the step, checkpoint, exit. A second signal
    stops at once, unless it comes within 2 s of the first: torchrun relays the one it received."""
    if STOP:
        if time.time() - STOP[0][1] > 2:
            raise KeyboardInterrupt
        return
    STOP.append((signum, time.time()))
    print0(f"\n{signal.Signals(signum).name}: finishing this step, then a checkpoint and exit (again: stop at once)")


def stop_requested(run):
    """Has a signal asked the run to stop? Under DDP a signal to any rank stops every rank at one step."""
    if not run.ddp:
        return bool(STOP)
    flag = torch.tensor([float(bool(STOP))], device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def exit_for_signal(run, stage, step):
    if run.ddp:
        dist.barrier()  # no rank exits (and makes torchrun stop the others) before rank 0 has saved
    signum = STOP[0][0] if STOP else signal.SIGTERM
    print0(f"stopped by {signal.Signals(signum).name} at {stage} step {step}, checkpoint written. "
           f"Continue with: python train.py --init_from=resume --out_dir={run.out_dir}")
    sys.exit(128 + signum)


# ------------------------------------------------------------------------------------------------
# the optimizer, its schedule, and the divergence guard

def param_groups(model, weight_decay):
    """The optimizer's two groups: the matrices (decayed), then the rest; a checkpoint's optimizer
    state lists the parameters in this order."""
    return [dict(params=[p for p in model.parameters() if p.dim() >= 2], weight_decay=weight_decay),
            dict(params=[p for p in model.parameters() if p.dim() < 2], weight_decay=0.0)]


def make_optimizer(cfg, model, lr):
    """AdamW (or the DPO paper's RMSprop); weight decay on matrices only."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=torch.cuda.is_available())


def lr_at(step, peak, warmup, total, cosine):
    """Linear warm-up from peak/warmup at step 0 (never 0), then constant or cosine down to 10%."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if not cosine:
        return peak
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def set_lr(optimizers, lr):
    for g in (g for opt in optimizers for g in opt.param_groups):
        g["lr"] = lr


def clip_and_step(params, optimizer, grad_clip):
    """Clip the gradient norm (0: no clipping), take the step, clear the gradients. -> the norm
    before clipping; a non-finite norm is returned before the step, which is then not taken."""
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    if torch.isfinite(gnorm):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return gnorm


class Guard:
    """The divergence rule of one training stage. Before a step is taken, its loss must be finite and
    at most `diverge` x max(the stage's first loss, 1); the step is taken only if its gradient norm is
    finite; after it, the weights must be finite and their norm at most double what it was (a step
    that big means a learning rate far too high). Otherwise the run stops before anything of the
    step is saved, naming the last checkpoint written: written from weights that passed these checks."""

    def __init__(self, cfg, run, stage, models, last_ckpt, first_loss=None):
        self.diverge, self.run, self.stage, self.models, self.last_ckpt = cfg.diverge, run, stage, models, last_ckpt
        self.first_loss, self.norm = first_loss, self.weight_norm()  # first_loss: a resumed stage's scale

    def weight_norm(self):
        return torch.stack([p.detach().float().norm() for m in self.models for p in m.parameters()]).norm().item()

    def before_step(self, step, loss):
        """`loss`: the step's loss tensor (averaged over processes here, so that every rank agrees)."""
        if self.run.ddp:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= self.run.world
        loss = loss.item()
        self.first_loss = loss if self.first_loss is None else self.first_loss
        if not math.isfinite(loss):
            self.stop(step, "non-finite loss")
        if self.diverge and loss > self.diverge * max(self.first_loss, 1.0):
            self.stop(step, f"loss {loss:.4g} is over --diverge={self.diverge:g} x max(first loss {self.first_loss:.4g}, 1)")

    def after_step(self, step, *gnorms):
        """`gnorms`: the step's gradient norms from clip_and_step (which takes no non-finite step)."""
        if not all(torch.isfinite(g) for g in gnorms):
            self.stop(step, f"non-finite gradient norm {[g.item() for g in gnorms]}")
        norm = self.weight_norm()
        if not math.isfinite(norm):
            self.stop(step, "non-finite weights")
        if self.diverge and norm > 2 * self.norm:
            self.stop(step, f"the weights' norm went from {self.norm:.4g} to {norm:.4g} in one step")
        self.norm = norm

    def stop(self, step, why):
        sys.exit(f"{self.stage} step {step}: {why}; stopped without saving it (lower the learning rate?). "
                 f"The last good checkpoint is {self.last_ckpt}")
