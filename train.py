"""
DPO from nothing, in one script. The recipe, in the order `main` runs it:

  1. set-up      processes, device, precision, seeds, the output folder
  2. data        preference pairs, the SFT corpus, held-out prompts, a judge when there is one
  3. model       the policy: from scratch, a checkpoint, GPT-2 weights, or where a run stopped
  4. SFT         the reference, by maximum likelihood on responses; saved, frozen, loaded once
  5. DPO         the policy against the frozen reference (or Preferred-FT, or online DPO)
  6. evaluation  held-out preferences, then samples of policy and reference scored by the judge

  python train.py                                   # embedded task, CPU, a few minutes
  python train.py --beta=0.5 --dpo_lr=1e-4          # any setting, as --key=value
  python train.py --help                            # every setting with its meaning
  torchrun --standalone --nproc_per_node=4 train.py --data=hh.jsonl ...   # several GPUs (DDP)
"""
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data as D
import ppo as P
from dpo import (LOSS_TYPES, check_loss_args, concatenated_logps, dpo_loss, rejected_after_divergence, response_logps,
                 unlikelihood_loss)
from model import GPT, GPTConfig, ScalarGPT, load_checkpoint, load_model, save_checkpoint

# ------------------------------------------------------------------------------------------------
# every setting: (default, what it does). Override any of them as --key=value.
CONFIG = dict(
    # data
    data=("reviews", "'reviews' (embedded task with a judge, no download) or a .jsonl/.jsonl.gz/.json preference file"),
    tokenizer=("bytes", "'bytes', a tiktoken name such as 'gpt2' (downloaded once), or a local .tiktoken ranks file"),
    val_fraction=(0.05, "share of a preference file's prompts held out for evaluation"),
    min_prompt_tokens=(8, "truncation keeps at least this many prompt tokens before it cuts responses"),
    length_group=(50, "preference files: SFT and DPO steps come from runs of this many optimizer steps sorted by "
                      "length, so each pads little (0: plain shuffled batches; the reviews task always uses 0)"),
    # model
    init_from=("scratch", "'scratch', 'resume' (out_dir/ckpt.pt), a checkpoint .pt, or a Hugging Face GPT-2 folder"),
    n_layer=(4, "transformer blocks (scratch only)"),
    n_head=(4, "attention heads (scratch only)"),
    n_embd=(128, "width (scratch only)"),
    block_size=(0, "context length in tokens; sequences are truncated to it. 0: 256 for a new model, a loaded "
                   "one's own; below a loaded model's, its position table is cropped (as nanoGPT does)"),
    dropout=(0.0, "dropout in the policy; the reference never uses it"),
    grad_checkpoint=(False, "activation checkpointing: keep only each block's input, recompute the rest in "
                            "backward (less memory, about a third more compute)"),
    # stage 1: the reference, by maximum likelihood on responses (the embedded corpus or the chosen ones)
    sft_iters=(1200, "SFT steps before DPO (0: init_from already is the reference)"),
    sft_batch_size=(32, "sequences per SFT step, per process"),
    sft_lr=(3e-3, "SFT peak learning rate (warm-up, then cosine decay to 10%)"),
    sft_warmup_iters=(20, "SFT linear warm-up steps"),
    sft_log_interval=(100, "SFT steps between log lines"),
    # stage 2: DPO
    dpo_iters=(150, "DPO optimizer steps"),
    batch_size=(32, "preference pairs per micro-step, per process"),
    grad_accum=(1, "micro-steps per optimizer step, summed over all processes"),
    dpo_lr=(1e-4, "DPO learning rate after warm-up (the DPO paper: 1e-6 for large pretrained models)"),
    warmup_iters=(10, "linear warm-up steps; step 0 already gets lr/warmup_iters, never 0"),
    optimizer=("adamw", "'adamw' or 'rmsprop' (the DPO paper's)"),
    weight_decay=(0.0, "AdamW weight decay on matrices"),
    grad_clip=(1.0, "clip the gradient norm to this (0: off)"),
    diverge=(100.0, "stop a stage whose loss passes this many times max(its first loss, 1) (SFT, DPO, reward "
                    "model), or whose weights' norm more than doubles in one step (0: only non-finite values stop it)"),
    method=("dpo", "'dpo'; baselines: 'preferred_ft' (likelihood of the chosen only), 'unlikelihood' (and unlikelihood "
                   "of the rejected), 'best_of_n' (no training); RLHF: 'reward_model', then 'ppo'"),
    beta=(1.0, "strength of the KL anchor to the reference: small beta lets the policy move further"),
    loss_type=("sigmoid", f"one of {LOSS_TYPES}"),
    alpha=(0.001, "unlikelihood: weight of the term that pushes the rejected responses' tokens down (here 0.01 "
                  "already broke half the samples, 0.1 all of them)"),
    label_smoothing=(0.0, "conservative DPO: assumed share of flipped labels, in [0, 0.5)"),
    reference_free=(False, "take log pi_ref = 0 (no reference model in the loss)"),
    precompute_ref=(False, "score the training set with the reference once, then drop it from memory"),
    online=(False, "online DPO: each step sample two responses per prompt from the current policy and let the judge pick"),
    online_redraws=(10, "online DPO: draws of a batch in which the judge called every pair a tie, before stopping"),
    judge=("", "module:function, judge(prompt, a, b) -> 0 (a better), 1 (b better) or None, or a reward model's "
                "ckpt.pt; the task's own judge by default"),
    best_of=(16, "best_of_n: responses sampled from the reference per prompt; the highest-scored (PPO's score) is kept"),
    # RLHF: a Bradley-Terry reward model (--method=reward_model), then PPO with a per-token KL penalty (--method=ppo)
    reward_model=("", "PPO-RM (and best_of_n): a --method=reward_model run's ckpt.pt as the score; empty: the task's "
                      "exact reward (PPO-GT)"),
    rm_iters=(300, "reward model steps (batch_size pairs each)"),
    rm_lr=(1e-3, "reward model learning rate after warm-up"),
    ppo_iters=(100, "PPO iterations: sample rollout_batch responses, score them, then ppo_epochs passes of updates"),
    rollout_batch=(64, "prompts per PPO iteration (one response each), per process"),
    ppo_minibatch=(16, "responses per PPO update step (divides rollout_batch)"),
    ppo_epochs=(4, "passes over each rollout batch"),
    ppo_lr=(1e-4, "learning rate of the policy and of the value model after warm-up"),
    kl_coef=(1.0, "PPO's beta: each response token's reward is -kl_coef * (log pi - log pi_ref)"),
    target_kl=(0.0, "adaptive KL controller: target KL per response in nats (0: kl_coef stays fixed)"),
    kl_horizon=(1000, "adaptive KL controller: responses over which kl_coef moves by at most e^0.2"),
    gamma=(1.0, "discount over response tokens (1: the return is exactly the objective)"),
    lam=(0.95, "GAE lambda: 1 is the Monte-Carlo return, 0 the one-step TD error"),
    clip_range=(0.2, "PPO's clip of the probability ratio to [1 - eps, 1 + eps]"),
    clip_range_value=(0.2, "how far a value prediction may move from the rollout's before its loss is clipped"),
    no_eos_penalty=(1.0, "subtracted from the score of a response cut at max_new_tokens without an end token"),
    # evaluation and logging
    eval_interval=(50, "training steps between held-out evaluations"),
    eval_pairs=(256, "held-out pairs for the preference metrics"),
    eval_samples=(256, "held-out prompts sampled from policy and reference at the end"),
    max_new_tokens=(160, "longest sampled response"),
    temperature=(1.0, "sampling temperature at evaluation (0: greedy)"),
    top_k=(0, "sample from the top k tokens only (0: all)"),
    score_batch_size=(64, "sequences per no-grad scoring pass (reference precompute, held-out metrics, KL)"),
    sample_batch_size=(128, "prompts per batched generate call"),
    show_samples=(3, "prompts printed with reference and policy samples side by side"),
    log_interval=(10, "training steps (DPO, reward model, PPO iterations) between log lines"),
    eval_only=(False, "only evaluate and sample init_from (a checkpoint), no training"),
    prompt=("", "with eval_only: also sample continuations of this prompt"),
    export=("", "with eval_only: also write the policy here as a Hugging Face GPT-2 folder"),
    # system
    out_dir=("out", "where ref.pt, sft.pt, ckpt.pt, config.json, metrics.jsonl and eval.json go"),
    overwrite=(False, "start a new run in an out_dir that holds another run's files, deleting them"),
    ckpt_interval=(50, "training steps (SFT, DPO, reward model, PPO) between checkpoints (and one at each stage's end)"),
    stop_at=(0, "stop after this training step, with a checkpoint (0: run to the end); continue with init_from=resume"),
    seed=(1337, "seeds the task, the held-out split, the reference (SFT) and its samples"),
    policy_seed=(-1, "seeds what follows the reference: batch order, dropout, sampling, the policy's evaluation "
                     "samples (-1: --seed); another value trains another policy on the same data and reference "
                     "(keep compared seeds 1000 apart: epochs, steps and ranks offset the seed)"),
    device=("auto", "'auto' (cuda, then mps, then cpu), or e.g. 'cpu', 'cuda:1'"),
    dtype=("auto", "'float32' or 'bfloat16' autocast; auto: bfloat16 where the hardware has it"),
    compile=(False, "torch.compile the policy"),
    threads=(0, "CPU threads for torch (0: torch's default)"),
)
POSITIVE = ("best_of", "n_layer", "n_embd", "batch_size", "sft_batch_size", "grad_accum", "dpo_lr", "max_new_tokens", "log_interval",
            "sft_log_interval", "eval_interval", "ckpt_interval", "eval_samples", "eval_pairs", "score_batch_size",
            "sample_batch_size", "online_redraws", "rm_iters", "rm_lr", "ppo_iters", "rollout_batch", "ppo_minibatch",
            "ppo_epochs", "ppo_lr", "clip_range_value", "kl_horizon")
NON_NEGATIVE = ("sft_iters", "dpo_iters", "warmup_iters", "sft_warmup_iters", "sft_lr", "grad_clip", "stop_at",
                "top_k", "temperature", "threads", "weight_decay", "kl_coef", "target_kl", "no_eos_penalty", "diverge",
                "block_size", "length_group", "alpha")
# what a resumed run may change; every other setting must be the one the run was started with
MAY_CHANGE = ("init_from", "dpo_iters", "rm_iters", "ppo_iters", "stop_at", "eval_interval", "ckpt_interval",
              "log_interval", "sft_log_interval", "eval_pairs", "eval_samples", "show_samples", "score_batch_size",
              "sample_batch_size", "device", "threads", "compile", "grad_checkpoint", "overwrite", "prompt", "export",
              "out_dir", "data", "tokenizer")  # data and tokenizer: another path to the same bytes (checked)
RUN_FILES = ("ref.pt", "sft.pt", "ckpt.pt", "config.json", "metrics.jsonl", "eval.json")
METHODS = ("dpo", "preferred_ft", "unlikelihood", "best_of_n", "reward_model", "ppo")


def parse_config(argv):
    """--key=value arguments -> the settings, as attributes (cfg.beta). Stops with a message that
    names the setting on anything it cannot use."""
    cfg, given = {k: v for k, (v, _) in CONFIG.items()}, set()
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        for k, (v, h) in CONFIG.items():
            print(f"  --{k}={v!r:<14} {h}")
        sys.exit(0)
    for arg in argv:
        key, eq, val = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            sys.exit(f"bad argument {arg!r}: use --key=value (see --help)")
        if key not in cfg:
            sys.exit(f"unknown setting {key!r}; valid settings: {', '.join(CONFIG)}")
        kind = type(cfg[key])
        given.add(key)
        try:
            if kind is bool:
                if val.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                cfg[key] = val.lower() in ("true", "1")
            else:
                cfg[key] = kind(val)
        except ValueError:
            sys.exit(f"bad value for --{key}: {val!r} is not a {kind.__name__}")
    saved = os.path.join(cfg["out_dir"], "config.json")
    if cfg["init_from"] == "resume" and os.path.isfile(saved):  # the run's own settings, but those given here
        with open(saved) as f:
            cfg.update({k: v for k, v in json.load(f).items() if k in CONFIG and k not in given and k not in ("init_from", "stop_at", "overwrite")})
    c = SimpleNamespace(**cfg)
    try:
        check_loss_args(c.beta, c.loss_type, c.label_smoothing)  # the loss's own checks, not a copy
    except ValueError as e:
        sys.exit(f"bad setting: {e}")
    checks = [("optimizer", c.optimizer in ("adamw", "rmsprop"), "'adamw' or 'rmsprop'"),
              ("method", c.method in METHODS, f"one of {METHODS}"), ("gamma", 0 < c.gamma <= 1, "in (0, 1]"),
              ("lam", 0 <= c.lam <= 1, "in [0, 1]"), ("clip_range", 0 < c.clip_range < 1, "in (0, 1)"),
              ("ppo_minibatch", c.rollout_batch % c.ppo_minibatch == 0, "a divisor of --rollout_batch"),
              ("dtype", c.dtype in ("auto", "float32", "bfloat16"), "'auto', 'float32' or 'bfloat16'"),
              ("n_head", c.n_head > 0 and c.n_embd % c.n_head == 0, "a divisor of --n_embd"),
              ("out_dir", c.out_dir != "", "a folder"),
              ("val_fraction", 0 < c.val_fraction < 1, "in (0, 1)"), ("dropout", 0 <= c.dropout < 1, "in [0, 1)"),
              ("judge", c.judge == "" or ":" in c.judge or c.judge.endswith(".pt"), "module:function or a .pt"),
              ("reward_model", c.reward_model == "" or c.method in ("ppo", "best_of_n"), "empty unless --method=ppo or best_of_n")]
    checks += [(k, cfg[k] > 0, "> 0") for k in POSITIVE] + [(k, cfg[k] >= 0, ">= 0") for k in NON_NEGATIVE]
    for key, ok, want in checks:
        if not ok:
            sys.exit(f"bad value for --{key}: {cfg[key]!r} (must be {want})")
    c.policy_seed = c.seed if c.policy_seed < 0 else c.policy_seed
    if c.online and c.precompute_ref:
        sys.exit("--precompute_ref=True needs a fixed training set; online DPO scores its fresh pairs as it goes")
    for flag in ("online", "precompute_ref", "reference_free"):
        if c.method in ("reward_model", "ppo", "best_of_n") and getattr(c, flag):
            sys.exit(f"--{flag}=True is a DPO setting; it does not apply to --method={c.method}")
    if c.export and not c.eval_only:
        sys.exit("--export=DIR works with --eval_only=True (it exports the checkpoint given as --init_from)")
    if c.eval_only and c.init_from in ("scratch", "resume"):
        sys.exit("--eval_only=True needs --init_from=<checkpoint .pt or GPT-2 folder>")
    return c


# ------------------------------------------------------------------------------------------------
# 1. set-up: processes, device, precision, seeds, output

def print0(*a, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **kw, flush=True)


def cpu_has_bf16():
    """avx512_bf16 or AMX: bf16 matmuls several times faster than fp32 (see bench.py)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def setup(cfg):
    """-> run: rank, world, device, autocast context `ctx`, micro-steps per process, out_dir, log."""
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
        sys.exit(f"--method={cfg.method} runs in one process; torchrun (DDP) is supported for dpo, preferred_ft and unlikelihood")
    if cfg.grad_accum % world:
        sys.exit(f"grad_accum ({cfg.grad_accum}) must be divisible by the number of processes ({world})")
    dev_type = device.split(":")[0]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = cfg.dtype
    if dtype == "auto":  # bf16 where the hardware multiplies it natively (measured faster), else fp32
        dtype = "bfloat16" if (torch.cuda.is_bf16_supported() if dev_type == "cuda" else
                               dev_type == "cpu" and cpu_has_bf16()) else "float32"
    torch.manual_seed(cfg.seed + rank)
    master = rank == 0
    prepare_out_dir(cfg, master, ddp)
    print0(json.dumps(dict(vars(cfg), resolved_device=device, resolved_dtype=dtype, world_size=world), indent=1))
    if master and cfg.init_from != "resume" and not cfg.eval_only:  # a resumed run keeps its own (checked later)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(vars(cfg), f, indent=1)
    metrics = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if master and not cfg.eval_only else None

    def log(record):  # one JSON line per log, evaluation and final record, written by rank 0
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    ctx = torch.autocast(dev_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    return SimpleNamespace(ddp=ddp, rank=rank, world=world, master=master, device=device, dev_type=dev_type,
                           ctx=ctx, accum=cfg.grad_accum // world, log=log, t_start=time.time())


def check_device(device):
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        sys.exit(f"bad value for --device: {device!r} ({str(e).splitlines()[0]})")
    count = dict(cuda=torch.cuda.device_count(), mps=int(torch.backends.mps.is_available())).get(dev.type, 1)
    if count == 0 or (dev.index or 0) >= count:
        sys.exit(f"--device={device}: not available on this machine ({count} {dev.type} devices); try --device=cpu")


def prepare_out_dir(cfg, master, ddp):
    """out_dir exists and can be written, and holds one run: a new run stops rather than write over
    another run's checkpoints or results unless --overwrite=True (which deletes them); a resumed run
    needs them. The settings and log of a run that left neither are cleared without asking."""
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
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(d, f))]
    if cfg.eval_only:
        return
    if cfg.init_from == "resume":
        if "ref.pt" not in found and "sft.pt" not in found:
            sys.exit(f"--init_from=resume: {d} holds no run to continue (no ref.pt or sft.pt)")
        return
    if not cfg.overwrite and any(f.endswith(".pt") or f == "eval.json" for f in found):
        sys.exit(f"{d} holds another run's files ({', '.join(found)}): add --overwrite=True to replace them, "
                 f"--init_from=resume to continue that run, or choose another --out_dir")
    if os.path.basename(cfg.init_from) in found and os.path.abspath(os.path.dirname(cfg.init_from)) == os.path.abspath(d):
        sys.exit(f"--init_from={cfg.init_from} lies in the out_dir that --overwrite=True would clear; copy it elsewhere")
    if ddp:
        dist.barrier()  # every rank has looked before rank 0 deletes
    if master:
        for f in found:
            os.remove(os.path.join(d, f))


def or_exit(fn, *args, **kw):
    """Bad input (a file, a field, a tokenizer, a checkpoint) stops with its message, not a traceback."""
    try:
        return fn(*args, **kw)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


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


def exit_for_signal(cfg, run, stage, step):
    if run.ddp:
        dist.barrier()  # no rank exits (and makes torchrun stop the others) before rank 0 has saved
    signum = STOP[0][0] if STOP else signal.SIGTERM
    print0(f"stopped by {signal.Signals(signum).name} at {stage} step {step}, checkpoint written. "
           f"Continue with: python train.py --init_from=resume --out_dir={cfg.out_dir}")
    sys.exit(128 + signum)


# ------------------------------------------------------------------------------------------------
# 2. data: preference pairs, the SFT corpus, held-out prompts, a judge

def load_data(cfg, run):
    """-> data: tokenizer, text pairs (train/val), SFT texts, held-out prompts, judge, task."""
    enc = or_exit(D.get_tokenizer, cfg.tokenizer)
    task, judge, judge_name = None, None, ""
    if cfg.data == D.TASK_NAME:
        task = D.make_task(seed=cfg.seed)
        train_pairs, val_pairs, eval_prompts, sft_texts = task["train"], task["val"], task["eval_prompts"], task["sft"]
        judge, judge_name = D.pair_judge(task["reward"]), "reviews.reward"
    else:
        pairs = or_exit(D.load_pairs, cfg.data, verbose=run.master)
        train_pairs, val_pairs = D.split_by_prompt(pairs, cfg.val_fraction, cfg.seed)
        if not val_pairs:
            sys.exit(f"{cfg.data}: its {len(pairs)} pairs share one prompt; a held-out split needs two prompts or more")
        sft_texts = [(p["prompt"], p["chosen"]) for p in train_pairs]  # SFT on the preferred responses
        eval_prompts = sorted({p["prompt"] for p in val_pairs})
    if cfg.judge:
        judge = reward_model_judge(cfg.judge, enc, run) if cfg.judge.endswith(".pt") else or_exit(D.load_judge, cfg.judge)
        judge_name = cfg.judge
    if cfg.online and judge is None:
        sys.exit("--online=True needs a judge: use the reviews task or pass --judge=module:function")
    eval_prompts = (eval_prompts * math.ceil(cfg.eval_samples / max(1, len(eval_prompts))))[:cfg.eval_samples]
    # what a resumed run must find unchanged: the bytes of the data and tokenizer files
    inputs = {k: D.file_digest(v) if os.path.isfile(v) else v for k, v in (("data", cfg.data), ("tokenizer", cfg.tokenizer))}
    return SimpleNamespace(enc=enc, eot=enc.eot_token, train_pairs=train_pairs, val_pairs=val_pairs, inputs=inputs,
                           sft_texts=sft_texts, eval_prompts=eval_prompts, judge=judge, judge_name=judge_name, task=task)


def tokenize(cfg, run, data, block):
    """Token ids for the model's block size: train and held-out pairs, and prompts to sample from,
    which keep their end and leave room for max_new_tokens."""
    tok = lambda pairs: D.tokenize_pairs(pairs, data.enc, block, cfg.min_prompt_tokens, verbose=run.master)
    data.train, data.val = tok(data.train_pairs), tok(data.val_pairs)[:cfg.eval_pairs]
    if len(data.train) < cfg.batch_size * cfg.grad_accum or not data.val:
        sys.exit(f"{cfg.data}: {len(data.train)} training and {len(data.val)} held-out pairs fit block_size {block}: "
                 f"too few for one step of --batch_size={cfg.batch_size} x --grad_accum={cfg.grad_accum} and one held-out pair")
    data.room = block - cfg.max_new_tokens
    data.eval_ids = [prompt_ids(data.enc, p, data.room) for p in data.eval_prompts]


def prompt_ids(enc, prompt, room):
    """A prompt's last `room` tokens: a response continues the prompt's end, so a long one loses its start."""
    return (enc.encode_ordinary(prompt) or [enc.eot_token])[-room:]


def text(data, resp):
    """A sampled response as text, without its end-of-text token."""
    return data.enc.decode(resp[:-1] if resp and resp[-1] == data.eot else resp)


def exact_rewards(data, prompts, responses, device="cpu"):
    """The task's exact reward of each (prompt ids, response ids): PPO-GT's score, Best-of-N's oracle
    pick, the truth a reward model is compared with. -> (len(prompts),) float32."""
    return torch.tensor([data.task["reward"](data.enc.decode(p), text(data, r)) for p, r in zip(prompts, responses)],
                        dtype=torch.float, device=device)


def call_judge(data, prompt, a, b):
    try:
        verdict = data.judge(prompt, a, b)
    except Exception as e:
        raise SystemExit(f"judge {data.judge_name} raised {type(e).__name__}: {e} (prompt {prompt[:60]!r})") from None
    if verdict not in (0, 1, None):
        raise SystemExit(f"judge {data.judge_name} returned {verdict!r}; it must return 0, 1 or None")
    return verdict


def reward_model_judge(path, enc, run):
    """A reward model's checkpoint as a judge: the response it scores higher wins, ties tie."""
    with torch.random.fork_rng(devices=[]):  # building the model must not move the seeded RNG
        rm = or_exit(load_model, path, run.device, kind="ScalarGPT").eval()
    if rm.config.vocab_size != enc.n_vocab:
        sys.exit(f"--judge={path}: vocabulary {rm.config.vocab_size} does not match the tokenizer's {enc.n_vocab}")

    @torch.no_grad()
    def judge(prompt, a, b):  # tokenized as the reward model was trained: prompt + response + eot, fitted
        rows = D.tokenize_sft([(prompt, a), (prompt, b)], enc, rm.config.block_size, verbose=False)
        ids, mask = D.collate_sft(rows, enc.eot_token)
        with run.ctx:
            ra, rb = P.last_token_scores(rm, ids.to(run.device), mask.to(run.device)).tolist()
        return None if ra == rb else (0 if ra > rb else 1)
    return judge


# ------------------------------------------------------------------------------------------------
# 3. the model, checkpoints, optimizer and schedule

def build_policy(cfg, run, enc, resumed):
    """The model DPO starts from (and SFT trains first): new, loaded, or the resumed run's own."""
    if resumed is not None:  # the run's shape; the weights of a checkpoint are restored by its stage
        model = GPT(GPTConfig(**{**resumed["model_args"], "dropout": cfg.dropout}))
        if resumed["stage"] == "ref":
            model.load_state_dict(resumed["model"])
    elif cfg.init_from == "scratch":
        model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=cfg.block_size or 256, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout))
    else:
        model = or_exit(load_model, cfg.init_from, "cpu", cfg.dropout)
        if cfg.block_size and cfg.block_size != model.config.block_size:
            or_exit(model.crop_block_size, cfg.block_size)  # longer than the model's: refused, it has no positions there
    model.grad_checkpoint = cfg.grad_checkpoint
    if model.config.vocab_size != enc.n_vocab:
        sys.exit(f"the model's vocabulary ({model.config.vocab_size}) does not match tokenizer {cfg.tokenizer!r} "
                 f"({enc.n_vocab} tokens); pass the tokenizer the model was trained with (for GPT-2: --tokenizer=gpt2)")
    if cfg.max_new_tokens >= model.config.block_size:
        sys.exit(f"bad value for --max_new_tokens: {cfg.max_new_tokens} leaves no room for a prompt "
                 f"in block_size {model.config.block_size}")
    print0(f"model: {model.num_params() / 1e6:.2f}M parameters, {asdict(model.config)}")
    return model.to(run.device)


def save_state(cfg, run, data, stage, model, optimizer, step, data_state, **extra):
    """ckpt.pt (sft.pt during SFT): weights, optimizer, step, data position and RNG, everything a run
    needs to continue, and what it must continue with: settings, input files, processes, reference."""
    path = os.path.join(cfg.out_dir, "sft.pt" if stage == "sft" else "ckpt.pt")
    rng = dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if run.dev_type == "cuda" else [])
    if run.master:  # every rank holds the same weights; one writes, every rank knows what was written
        or_exit(save_checkpoint, path, model, stage=stage, optimizer=optimizer.state_dict(), step=step, data=data_state,
                rng=rng, config=dict(vars(cfg)), inputs=data.inputs, world=run.world, reference=run.ref_sha256, **extra)
    return f"{path} ({stage} step {step})"


def resume_point(cfg, run, data):
    """--init_from=resume: the run's latest checkpoint (ckpt.pt, else sft.pt, else ref.pt: stopped
    before its first DPO checkpoint), once it is shown to be this run. Stops naming everything that
    differs: settings (but MAY_CHANGE), input files, processes, reference. -> (checkpoint or None,
    the reference's checksum or None)."""
    if cfg.init_from != "resume":
        return None, None
    path = next(os.path.join(cfg.out_dir, f) for f in ("ckpt.pt", "sft.pt", "ref.pt")
                if os.path.isfile(os.path.join(cfg.out_dir, f)))
    ck = or_exit(load_checkpoint, path)
    saved, ref_path, ref_sha = ck.get("config", {}), os.path.join(cfg.out_dir, "ref.pt"), None
    if path == ref_path:
        ref_sha = ck["sha256"]
    elif ck.get("reference"):  # a training checkpoint names the reference it trained against
        ref_sha = or_exit(load_checkpoint, ref_path)["sha256"]
    diff = [f"--{k}={getattr(cfg, k)!r} (the run has {saved.get(k)!r})" for k in CONFIG
            if k not in MAY_CHANGE and saved.get(k) != getattr(cfg, k)]
    diff += [f"the {k} file's content" for k, v in data.inputs.items() if ck.get("inputs", {}).get(k) != v]
    diff += [f"{run.world} processes (the run has {ck['world']})"] if ck.get("world", run.world) != run.world else []
    diff += [f"{ref_path}, not the reference the run trained against"] if ck.get("reference") not in (None, ref_sha) else []
    if diff:
        sys.exit(f"--init_from=resume: {path} is another run; what differs: {'; '.join(diff)}. "
                 f"May change on resume: {', '.join(MAY_CHANGE)}")
    iters = dict(dpo=cfg.dpo_iters, rm=cfg.rm_iters, ppo=cfg.ppo_iters, sft=cfg.sft_iters).get(ck["stage"])
    if iters is not None and ck["step"] > iters:
        sys.exit(f"--init_from=resume: {path} is at {ck['stage']} step {ck['step']}, past the {iters} asked for: "
                 f"pass a larger --{ck['stage']}_iters")
    if run.master:  # the settings the run now continues with
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(vars(cfg), f, indent=1)
    print0(f"resuming from {path}: " + ("SFT is done; training starts at step 1, no checkpoint of it was written"
                                        if ck["stage"] == "ref" else f"{ck['stage']} step {ck['step']}"))
    return ck, ref_sha


def restore_state(model, optimizer, ck):
    """The inverse of save_state: loads weights, optimizer and RNG. -> (step, data state)."""
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["rng"]["torch"])  # dropout masks (rank 0's state; exact when dropout=0)
    if ck["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    return ck["step"], ck["data"]


def make_optimizer(cfg, model, lr):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=rest, weight_decay=0.0)]
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


# ------------------------------------------------------------------------------------------------
# 4. SFT: the reference, by maximum likelihood on responses given their prompts

def sft(cfg, run, policy, data, resumed):
    """Train `policy` in place on the SFT corpus: mean negative log-likelihood per response token.
    Checkpoints go to sft.pt; `resumed` (sft.pt's content) continues exactly where it stopped."""
    seqs = D.tokenize_sft(data.sft_texts, data.enc, policy.config.block_size, cfg.min_prompt_tokens, verbose=run.master)
    if len(seqs) < cfg.sft_batch_size * run.world:
        sys.exit(f"{cfg.data}: {len(seqs)} SFT sequences fit block_size {policy.config.block_size}: too few for one "
                 f"batch of --sft_batch_size={cfg.sft_batch_size} x {run.world} processes")
    lengths = [len(p) + len(r) for p, r in seqs] if data.task is None else None  # length-grouped on a file
    loader = D.Batches(seqs, cfg.sft_batch_size, cfg.seed, run.rank, run.world, lengths, cfg.length_group)
    model = DDP(policy) if run.ddp else policy
    optimizer = make_optimizer(cfg, policy, cfg.sft_lr)
    step, last = 0, "none: SFT starts again from its beginning"
    if resumed is not None:
        step, state = restore_state(policy, optimizer, resumed)
        loader.load_state_dict(state["sft"])
        last = f"{cfg.out_dir}/sft.pt (sft step {step})"
    guard = Guard(cfg, run, "sft", [policy], last, None if resumed is None else resumed["first_loss"])
    policy.train()
    while step < cfg.sft_iters:
        lr = lr_at(step, cfg.sft_lr, cfg.sft_warmup_iters, cfg.sft_iters, cosine=True)
        for g in optimizer.param_groups:
            g["lr"] = lr
        ids, mask = (x.to(run.device) for x in D.collate_sft(loader.next(), data.eot))
        with run.ctx:
            logps, n = response_logps(model, ids, mask)
            loss = -logps.sum() / n.sum()
        loss.backward()
        guard.before_step(step + 1, loss)
        guard.after_step(step + 1, clip_and_step(policy.parameters(), optimizer, cfg.grad_clip))
        step += 1
        if (step - 1) % cfg.sft_log_interval == 0 or step == cfg.sft_iters:
            print0(f"sft {step}/{cfg.sft_iters} | nll/token {loss.item():.4f} | lr {lr:.2e} | {time.time() - run.t_start:.0f}s")
            run.log(dict(stage="sft", step=step, nll=loss.item(), lr=lr, elapsed=time.time() - run.t_start))
        stop = stop_requested(run)
        if (step % cfg.ckpt_interval == 0 and step < cfg.sft_iters) or stop:  # at the end, ref.pt instead
            guard.last_ckpt = save_state(cfg, run, data, "sft", policy, optimizer, step, dict(sft=loader.state_dict()),
                                         first_loss=guard.first_loss)
            if stop:
                exit_for_signal(cfg, run, "sft", step)


def load_reference(cfg, run, path):
    """The frozen reference from `path`, or None for reference-free DPO (or nothing to compare to)."""
    if cfg.reference_free or cfg.method == "reward_model":
        return None
    if not os.path.isfile(path):
        if not cfg.eval_only:
            sys.exit(f"{path}: the reference is missing")
        print0(f"no reference at {path}: evaluating without reference comparisons")
        return None
    reference = or_exit(load_model, path, run.device)
    reference.eval()  # no dropout, whatever the policy uses
    return reference.requires_grad_(False)  # no gradients: nothing can move it


# ------------------------------------------------------------------------------------------------
# scoring and sampling, shared by training and evaluation

@torch.no_grad()
def score(cfg, run, model, seqs, eot):
    """Summed response log-probs and token counts of (prompt_ids, response_ids), in eval mode; a
    reward model's score at the last token instead when `model` is a ScalarGPT. Batches hold
    sequences of similar length (sorted, then put back in order): little padding to compute."""
    was_training, out = model.training, []
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    model.eval()
    with run.ctx:
        for i in range(0, len(seqs), cfg.score_batch_size):
            batch = [seqs[j] for j in order[i:i + cfg.score_batch_size]]
            ids, mask = (x.to(run.device) for x in D.collate_sft(batch, eot))
            if isinstance(model, ScalarGPT):
                out.append([P.last_token_scores(model, ids, mask)])
            else:
                out.append([x.float() for x in response_logps(model, ids, mask)])
    model.train(was_training)
    where = torch.tensor(order, device=run.device)  # sorted row k is input sequence order[k]
    return [torch.empty_like(x).index_copy_(0, where, x) for x in map(torch.cat, zip(*out))]


def score_pairs(cfg, run, model, pairs, eot):
    """-> (chosen logps, rejected logps, chosen lengths, rejected lengths); zeros without a model."""
    if model is None:
        z = torch.zeros(len(pairs), device=run.device)
        return z, z, z, z
    lp, n = score(cfg, run, model, [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], eot)
    B = len(pairs)
    return lp[:B], lp[B:], n[:B], n[B:]


def sample(cfg, run, model, prompts, seed, eot, exact=False):
    """Responses (token lists, ending in eot unless cut at max_new_tokens) to token-id prompts, at
    the evaluation's temperature and top-k, or from the model's own distribution if `exact`."""
    was_training, outs = model.training, []
    model.eval()
    g = torch.Generator(device=run.device).manual_seed(seed)
    temperature, top_k = (1.0, None) if exact else (cfg.temperature, cfg.top_k or None)
    with run.ctx:
        for i in range(0, len(prompts), cfg.sample_batch_size):
            outs += model.generate(prompts[i:i + cfg.sample_batch_size], cfg.max_new_tokens, temperature,
                                   top_k, eot, generator=g)
    model.train(was_training)
    return outs


# ------------------------------------------------------------------------------------------------
# 5. DPO: the policy against the frozen reference

def online_batch(cfg, run, data, policy, prompts, stats, seed):
    """Online DPO's pairs: two fresh samples per prompt from the current policy, the judge's pick
    first; ties are dropped. `seed` = (seed, step, micro-step, rank) seeds the sampling, so a
    resumed run draws exactly what an uninterrupted one would have."""
    for attempt in range(cfg.online_redraws):  # an all-tie batch is drawn again: every rank needs pairs
        both = sample(cfg, run, policy, prompts + prompts, hash((*seed, attempt)) % 2**31, data.eot)
        batch = []
        for p, ra, rb in zip(prompts, both[:len(prompts)], both[len(prompts):]):
            w = call_judge(data, data.enc.decode(p), text(data, ra), text(data, rb))
            if w is None or ra == rb:
                stats["ties"] += 1
            else:
                batch.append((p, ra, rb) if w == 0 else (p, rb, ra))
        stats["pairs"] += len(batch)
        if batch:
            return batch
    sys.exit(f"the judge {data.judge_name} called every pair a tie, {cfg.online_redraws} times in a row, "
             f"at DPO step {seed[1] + 1}")


def next_batch(cfg, run, data, policy, src, step, micro):
    """-> (examples, reference log-probs or None): the next pairs of the data set and their
    precomputed reference log-probs, or fresh pairs from the policy (online)."""
    if cfg.online:
        prompts = [list(p) for p in src.prompts.next()]
        return online_batch(cfg, run, data, policy, prompts, src.online, (cfg.policy_seed, step, micro, run.rank)), None
    idx = src.pairs.next()
    return [data.train[i] for i in idx], None if src.train_ref is None else (src.train_ref[0][idx], src.train_ref[1][idx])


def objective(cfg, pc, pr, nc, nr, ref_c, ref_r, accum, ul_logps=None):
    """A method's loss on one micro-batch of pairs, from the policy's summed log-probs pc, pr (or a
    reward model's scores), response lengths nc, nr, and for unlikelihood the log-probs of the rejected
    tokens it pushes down. -> (loss to backpropagate, stats: the per-pair loss to log, chosen and
    rejected (implicit) rewards, accuracy (ties count as wrong), pc, pr).

    DPO family: dpo_loss, summed over pairs and divided by the pairs a full step holds, so that online
    steps with fewer pairs (ties dropped) move the weights less, not each pair more. Preferred-FT:
    mean negative log-likelihood per token of the chosen responses; Unlikelihood adds alpha times the
    rejected tokens' mean -log(1 - p) (dpo.unlikelihood_loss). Reward model: Bradley-Terry
    on the scores, -log sigmoid(r_w - r_l), mean over the step's pairs."""
    if cfg.method in ("preferred_ft", "unlikelihood"):
        if (cfg.method == "unlikelihood") != (ul_logps is not None):
            raise ValueError("the unlikelihood objective needs ul_logps (and only it)")
        nll = -pc.sum() / nc.sum() if ul_logps is None else unlikelihood_loss(pc, nc, ul_logps, cfg.alpha)[0]
        zero = torch.zeros_like(pc)
        rw = cfg.beta * (pc - (zero if ref_c is None else ref_c)).detach()
        rl = cfg.beta * (pr - (zero if ref_r is None else ref_r)).detach()
        loss, shown = nll / accum, nll.detach()
    else:
        if cfg.method == "reward_model":
            losses, rw, rl = P.bradley_terry_loss(pc, pr)[0], pc.detach(), pr.detach()
        else:
            losses, rw, rl = dpo_loss(pc, pr, ref_c, ref_r, cfg.beta, cfg.loss_type, cfg.label_smoothing, nc, nr)
        loss, shown = losses.sum() / (cfg.batch_size * accum), losses.detach().mean()
    return loss, torch.stack([shown, rw.mean(), rl.mean(), (rw > rl).float().mean(), pc.detach().mean(), pr.detach().mean()])


def dpo_step(cfg, run, data, wrapped, model, reference, src, step):
    """The gradients of one optimizer step: `run.accum` micro-batches, forward and backward each,
    through `wrapped` (the model itself, or its DDP / compiled wrapper).
    -> (stats averaged over micro-steps, pairs and token positions seen, over all processes)."""
    stats, pairs, tokens = torch.zeros(6, device=run.device), 0, 0
    for micro in range(run.accum):
        examples, ref_logps = next_batch(cfg, run, data, model, src, step, micro)
        ids, mask = (x.to(run.device) for x in D.collate(examples, data.eot))
        if ref_logps is None and reference is not None:  # the live reference, in the policy's precision
            with torch.no_grad(), run.ctx:
                ref_logps = [x.float() for x in concatenated_logps(reference, ids, mask)[:2]]
        ref_c, ref_r = ref_logps if ref_logps is not None else (None, None)
        last = not run.ddp or micro == run.accum - 1
        with nullcontext() if last else wrapped.no_sync():  # DDP all-reduces on the last micro-step only
            with run.ctx:
                ul, ul_logps = cfg.method == "unlikelihood", None
                if cfg.method == "reward_model":  # the scalar head at each sequence's last token
                    r = P.last_token_scores(wrapped, ids, mask)
                    pc, pr, nc, nr = r[:len(examples)], r[len(examples):], None, None
                else:
                    out = [x.float() for x in concatenated_logps(wrapped, ids, mask, with_tokens=ul)]
                    pc, pr, nc, nr = out[:4]
                    ul_logps = out[4][rejected_after_divergence(ids, mask)] if ul else None
                loss, s = objective(cfg, pc, pr, nc, nr, ref_c, ref_r, run.accum, ul_logps)
            loss.backward()
        stats += s / run.accum
        pairs, tokens = pairs + len(examples) * run.world, tokens + mask.numel() * run.world
    return stats, pairs, tokens


def dpo(cfg, run, data, model, reference, train_ref, val_ref, resumed):
    """The DPO loop: batches (offline, or sampled and judged online), the loss against the
    reference (live, or precomputed in `train_ref`), held-out evaluations and checkpoints; it
    continues from `resumed` (ckpt.pt's content) if given. `model` is the policy, or RLHF's reward
    model (a ScalarGPT), which trains in the same loop. -> the last step taken."""
    rm = cfg.method == "reward_model"
    stage, iters, peak_lr = ("rm", cfg.rm_iters, cfg.rm_lr) if rm else ("dpo", cfg.dpo_iters, cfg.dpo_lr)
    model.train()
    optimizer = make_optimizer(cfg, model, peak_lr)
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in data.train] if data.task is None else None
    pairs = D.Batches(list(range(len(data.train))), cfg.batch_size, cfg.policy_seed, run.rank, run.world, lengths,
                      cfg.length_group, step_items=cfg.batch_size * cfg.grad_accum)  # one optimizer step's pairs
    src = SimpleNamespace(pairs=pairs, prompts=None, online=dict(pairs=0, ties=0), train_ref=train_ref)
    if cfg.online:  # prompts keep their end and leave room to sample
        prompts = sorted({tuple(p[-data.room:]) for p, _, _ in data.train})
        src.prompts = D.Batches(prompts, cfg.batch_size, cfg.policy_seed, run.rank, run.world)
    step, last = 0, f"{cfg.out_dir}/ref.pt (the SFT model this stage starts from)"
    if resumed is not None:
        step, state = restore_state(model, optimizer, resumed)
        src.pairs.load_state_dict(state["pairs"])
        if cfg.online:
            src.prompts.load_state_dict(state["prompts"])
            src.online = state["online_stats"]
        last = f"{cfg.out_dir}/ckpt.pt ({stage} step {step})"
    guard = Guard(cfg, run, stage, [model], last, None if resumed is None else resumed["first_loss"])
    wrapped = DDP(model) if run.ddp else model  # what the forward passes go through
    wrapped = torch.compile(wrapped) if cfg.compile else wrapped
    last_step = min(iters, cfg.stop_at or iters)
    t_loop, t_log, pairs_seen, tokens_seen, first_step = time.time(), time.time(), 0, 0, step
    while step < last_step:
        lr = lr_at(step, peak_lr, cfg.warmup_iters, iters, cosine=False)
        for g in optimizer.param_groups:
            g["lr"] = lr
        stats, pairs, tokens = dpo_step(cfg, run, data, wrapped, model, reference, src, step)
        pairs_seen, tokens_seen = pairs_seen + pairs, tokens_seen + tokens
        guard.before_step(step + 1, stats[0])
        gnorm = clip_and_step(model.parameters(), optimizer, cfg.grad_clip)
        guard.after_step(step + 1, gnorm)  # gradients and weights are the same on every rank after the all-reduce
        step += 1
        if step % cfg.log_interval == 0 or step == last_step:
            s, dt = stats.tolist(), time.time() - t_log
            rec = dict(stage=stage, step=step, loss=s[0], **{"rewards/chosen": s[1], "rewards/rejected": s[2],
                       "rewards/margins": s[1] - s[2], "rewards/accuracies": s[3], "logps/chosen": s[4],
                       "logps/rejected": s[5]}, grad_norm=gnorm.item(), lr=lr, pairs_per_s=pairs_seen / dt,
                       tokens_per_s=tokens_seen / dt, elapsed=time.time() - run.t_start)
            if rm:  # its rewards are the scalar head's scores; it has no log-probs
                del rec["logps/chosen"], rec["logps/rejected"]
            if cfg.online:
                rec.update(online_pairs=src.online["pairs"], online_ties=src.online["ties"])
            eta = (time.time() - t_loop) / (step - first_step) * (last_step - step)
            logps = "" if rm else f" | logps {s[4]:.1f}/{s[5]:.1f}"
            print0(f"{stage} {step}/{iters} | loss {s[0]:.4f} | r/chosen {s[1]:+.3f} r/rejected {s[2]:+.3f} "
                   f"margin {s[1] - s[2]:+.3f} acc {s[3]:.2f}{logps} | gnorm {gnorm.item():.2f} "
                   f"| lr {lr:.1e} | {rec['pairs_per_s']:.0f} pairs/s {rec['tokens_per_s']:.0f} tok/s | "
                   f"{rec['elapsed']:.0f}s, eta {eta:.0f}s")
            run.log(rec)
            t_log, pairs_seen, tokens_seen = time.time(), 0, 0
        t_aside = time.time()  # evaluation and checkpoints do not count against the training rate
        if run.master and (step % cfg.eval_interval == 0 or step == last_step):
            held_out_eval(cfg, run, data, model, val_ref, step)
        stop = stop_requested(run)
        if step % cfg.ckpt_interval == 0 or step == last_step or stop:
            state = dict(pairs=src.pairs.state_dict())
            if cfg.online:
                state.update(prompts=src.prompts.state_dict(), online_stats=dict(src.online))
            guard.last_ckpt = save_state(cfg, run, data, stage, model, optimizer, step, state, first_loss=guard.first_loss)
        if stop:
            exit_for_signal(cfg, run, stage, step)
        t_log += time.time() - t_aside
        t_loop += time.time() - t_aside
    return step


# ------------------------------------------------------------------------------------------------
# 5b. RLHF: PPO against a reward (the task's exact one, or a reward model), with a per-token KL penalty

def load_scorer(cfg, run, data, model):
    """What PPO and Best-of-N maximise: None for the task's exact reward, or the reward model of
    --reward_model (PPO-RM), which must read `model`'s tokens at its block size."""
    scorer = or_exit(load_model, cfg.reward_model, run.device, kind="ScalarGPT").eval() if cfg.reward_model else None
    if scorer is None and data.task is None:
        sys.exit(f"--method={cfg.method} on a preference file needs --reward_model=<a --method=reward_model run's ckpt.pt>")
    if scorer is not None and (scorer.config.vocab_size, scorer.config.block_size) != \
            (model.config.vocab_size, model.config.block_size):
        sys.exit(f"--reward_model={cfg.reward_model}: vocabulary and block size {scorer.config.vocab_size}, "
                 f"{scorer.config.block_size} do not match the policy's {model.config.vocab_size}, {model.config.block_size}")
    return scorer


@torch.no_grad()
def rollout(cfg, run, data, policy, reference, value, scorer, prompts, seed, kl_coef):
    """One response per prompt from the policy itself (temperature 1), scored, with everything PPO's
    update needs: old log-probs, values, per-token rewards, GAE advantages (whitened) and returns.
    A response cut at max_new_tokens without an end token is scored as it is, minus no_eos_penalty,
    and its last token is terminal (ppo.py's docstring says why)."""
    t0 = time.time()
    responses = sample(cfg, run, policy, prompts, seed, data.eot, exact=True)
    t1 = time.time()
    ids, mask = (x.to(run.device) for x in D.collate_sft(list(zip(prompts, responses)), data.eot))
    n = mask.sum(1)
    rmask = torch.arange(int(n.max()), device=run.device) < n[:, None]  # (B, R)
    with run.ctx:
        old_logps, _ = P.token_logps(policy, ids, mask, rmask)
        ref_logps, _ = P.token_logps(reference, ids, mask, rmask)
        values = P.token_values(value, ids, mask, rmask).float()
        if scorer is None:  # PPO-GT: the task's exact reward
            scores = exact_rewards(data, prompts, responses, run.device)
        else:               # PPO-RM: the reward model's score at the last token
            scores = P.last_token_scores(scorer, ids, mask).float()
    truncated = torch.tensor([r[-1] != data.eot for r in responses], device=run.device)
    scores = scores - cfg.no_eos_penalty * truncated
    rewards, kl = P.per_token_rewards(old_logps, ref_logps, rmask, scores, kl_coef)
    advantages, returns = P.gae(rewards, values, rmask, cfg.gamma, cfg.lam)
    return SimpleNamespace(ids=ids, mask=mask, rmask=rmask, old_logps=old_logps, values=values, returns=returns,
                           advantages=P.masked_whiten(advantages, rmask), scores=scores, kl=kl.sum(1),
                           lengths=n.float(), widths=torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses)]),
                           truncated=truncated.float(), sample_s=t1 - t0, score_s=time.time() - t1)


def ppo_update(cfg, run, policy, value, optimizers, ep, generator, guard, step):
    """ppo_epochs passes over the rollout in shuffled minibatches: one clipped policy step and one
    clipped value step each, each checked by `guard`. -> the mean of each statistic over all of them."""
    stats = []
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(len(ep.ids), generator=generator).split(cfg.ppo_minibatch):
            width = int(ep.widths[mb].max())  # the minibatch's own padding, not the rollout's
            ids, mask, rmask = ep.ids[mb, :width], ep.mask[mb, :width], ep.rmask[mb]
            with run.ctx:
                logps, entropy = P.token_logps(policy, ids, mask, rmask, entropy=True)
            pg_loss, pg = P.policy_loss(logps, ep.old_logps[mb], ep.advantages[mb], rmask, cfg.clip_range)
            pg_loss.backward()
            with run.ctx:
                v = P.token_values(value, ids, mask, rmask)
            v_loss, vs = P.value_loss(v.float(), ep.values[mb], ep.returns[mb], rmask, cfg.clip_range_value)
            v_loss.backward()
            norms = [clip_and_step(m.parameters(), opt, cfg.grad_clip) for m, opt in zip((policy, value), optimizers)]
            guard.after_step(step, *norms)
            stats.append(torch.stack([pg_loss.detach(), v_loss.detach(), pg["clip_fraction"], pg["approx_kl"],
                                      P.masked_mean(entropy.detach(), rmask), vs["value_clip_fraction"], *norms]))
    names = ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "entropy", "value_clip_fraction",
             "grad_norm", "value_grad_norm")
    return dict(zip(names, torch.stack(stats).mean(0).tolist()))


def ppo(cfg, run, data, policy, reference, val_ref, resumed):
    """RLHF step 3: each iteration samples a rollout from the policy, scores it (rollout), and takes
    ppo_epochs passes of clipped updates (ppo_update); evaluations and checkpoints as in dpo().
    The value model is a separate ScalarGPT, initialised from the reward model (PPO-RM) or from the
    SFT reference with a zero head (PPO-GT): the policy stays a plain GPT, and the value loss never
    pulls on the policy's features. Continues from `resumed` (ckpt.pt's content). -> the last step taken."""
    scorer = load_scorer(cfg, run, data, policy)
    value = ScalarGPT.from_model(scorer if scorer is not None else policy)
    # dropout stays off in both models: the ratio pi/pi_old must compare one function at two weights
    policy.eval(), value.eval()
    optimizers = [make_optimizer(cfg, m, cfg.ppo_lr) for m in (policy, value)]
    prompt_loader = or_exit(D.Batches, sorted({tuple(p[-data.room:]) for p, _, _ in data.train}), cfg.rollout_batch, cfg.policy_seed)
    kl_ctl = P.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl else None
    step, last = 0, f"{cfg.out_dir}/ref.pt (the SFT model this stage starts from)"
    if resumed is not None:
        step, state = restore_state(policy, optimizers[0], resumed)
        prompt_loader.load_state_dict(state["prompts"])
        value.load_state_dict(resumed["value"])
        optimizers[1].load_state_dict(resumed["value_optimizer"])
        if kl_ctl:
            kl_ctl.load_state_dict(resumed["kl_controller"])
        last = f"{cfg.out_dir}/ckpt.pt (ppo step {step})"
    guard = Guard(cfg, run, "ppo", [policy, value], last)
    last_step = min(cfg.ppo_iters, cfg.stop_at or cfg.ppo_iters)
    while step < last_step:
        lr = lr_at(step, cfg.ppo_lr, cfg.warmup_iters, cfg.ppo_iters, cosine=False)
        for group in (g for opt in optimizers for g in opt.param_groups):
            group["lr"] = lr
        kl_coef = kl_ctl.value if kl_ctl else cfg.kl_coef
        prompts = [list(p) for p in prompt_loader.next()]
        ep = rollout(cfg, run, data, policy, reference, value, scorer, prompts, hash((cfg.policy_seed, step)) % 2**31, kl_coef)
        t0 = time.time()
        stats = ppo_update(cfg, run, policy, value, optimizers, ep, torch.Generator().manual_seed(cfg.policy_seed + step), guard, step + 1)
        step += 1
        rec = dict(stage="ppo", step=step, score=ep.scores.mean().item(), kl=ep.kl.mean().item(), kl_coef=kl_coef,
                   **stats, response_length=ep.lengths.mean().item(), truncated=ep.truncated.mean().item(),
                   explained_variance=P.explained_variance(ep.values, ep.returns, ep.rmask), lr=lr,
                   sample_s=ep.sample_s, score_s=ep.score_s, update_s=time.time() - t0, elapsed=time.time() - run.t_start)
        if kl_ctl:
            kl_ctl.update(rec["kl"], len(prompts))
        if step % cfg.log_interval == 0 or step == last_step:
            print0(f"ppo {step}/{cfg.ppo_iters} | score {rec['score']:+.3f} | kl {rec['kl']:.3f} | "
                   f"pg {rec['policy_loss']:+.4f} vf {rec['value_loss']:.4f} | clip {rec['clip_fraction']:.3f} | "
                   f"approx_kl {rec['approx_kl']:.4f} | entropy {rec['entropy']:.3f} | len {rec['response_length']:.1f} | "
                   f"ev {rec['explained_variance']:+.2f} | sample/score/update {ep.sample_s:.1f}/{ep.score_s:.1f}/"
                   f"{rec['update_s']:.1f}s | {rec['elapsed']:.0f}s")
            run.log(rec)
        if step % cfg.eval_interval == 0 or step == last_step:
            held_out_eval(cfg, run, data, policy, val_ref, step)
        stop = stop_requested(run)
        if step % cfg.ckpt_interval == 0 or step == last_step or stop:
            guard.last_ckpt = save_state(cfg, run, data, "ppo", policy, optimizers[0], step, dict(prompts=prompt_loader.state_dict()),
                                         value=value.state_dict(), value_optimizer=optimizers[1].state_dict(),
                                         kl_controller=kl_ctl.state_dict() if kl_ctl else None)
        if stop:
            exit_for_signal(cfg, run, "ppo", step)
    return step


# ------------------------------------------------------------------------------------------------
# 6. evaluation: held-out preferences, and samples of policy and reference scored by the judge

def preference_eval(cfg, run, data, policy, val_ref):
    """The loss, implicit-reward accuracy (ties count as wrong) and margin on the held-out pairs."""
    pc, pr, nc, nr = score_pairs(cfg, run, policy, data.val, data.eot)
    losses, rw, rl = dpo_loss(pc, pr, *val_ref, cfg.beta, cfg.loss_type, cfg.label_smoothing, nc, nr)
    return dict(val_loss=losses.mean().item(), pref_accuracy=(rw > rl).float().mean().item(),
                val_margin=(rw - rl).mean().item())


def reward_model_eval(cfg, run, data, rm):
    """A reward model on the held-out pairs: Bradley-Terry loss, accuracy (ties count as wrong) and
    margin; on the reviews task also the Pearson correlation of its scores with the exact reward,
    over every held-out response (chosen and rejected)."""
    rows = [(p, c) for p, c, _ in data.val] + [(p, r) for p, _, r in data.val]
    r, B = score(cfg, run, rm, rows, data.eot)[0], len(data.val)
    losses, accuracy = P.bradley_terry_loss(r[:B], r[B:])
    res = dict(rm_val_loss=losses.mean().item(), rm_accuracy=accuracy, rm_margin=(r[:B] - r[B:]).mean().item())
    if data.task is not None:
        truth = exact_rewards(data, *zip(*rows))
        res["reward_correlation"] = torch.corrcoef(torch.stack([r.cpu(), truth]))[0, 1].item()
    return res


def held_out_eval(cfg, run, data, model, val_ref, step):
    """The evaluation during training, on held-out pairs: a policy's implicit-reward metrics, or a
    reward model's own."""
    if cfg.method == "reward_model":
        rec = reward_model_eval(cfg, run, data, model)
        print0(f"eval {step}: val loss {rec['rm_val_loss']:.4f} | reward model accuracy {rec['rm_accuracy']:.3f} "
               f"| margin {rec['rm_margin']:+.3f}")
    else:
        rec = preference_eval(cfg, run, data, model, val_ref)
        print0(f"eval {step}: val loss {rec['val_loss']:.4f} | implicit-reward accuracy {rec['pref_accuracy']:.3f} "
               f"| margin {rec['val_margin']:+.3f}")
    run.log(dict(stage="eval", step=step, **rec))


def win_rate(verdicts):
    """Share of judge verdicts won by the policy (verdict 0); a tie (None) counts half."""
    return sum(1.0 if w == 0 else 0.5 if w is None else 0.0 for w in verdicts) / len(verdicts)


@torch.no_grad()
def best_of_n(cfg, run, data, reference):
    """The Best-of-N baseline: best_of responses per held-out prompt sampled from the reference's own
    distribution (temperature 1, the condition of the KL bound), and the highest-scored kept (the
    first of equals) by the score PPO maximises: the task's exact reward (an oracle, as for PPO-GT) or
    the reward model of --reward_model, minus no_eos_penalty for a response cut without an end token.
    No training; it costs N samples per prompt at inference."""
    scorer = load_scorer(cfg, run, data, reference)
    n, prompts = cfg.best_of, [p for p in data.eval_ids for _ in range(cfg.best_of)]  # each prompt n times in a row
    outs = sample(cfg, run, reference, prompts, cfg.policy_seed + 1, data.eot, exact=True)
    if scorer is None:
        scores = exact_rewards(data, prompts, outs)
    else:
        scores = score(cfg, run, scorer, list(zip(prompts, outs)), data.eot)[0].cpu()
    scores = scores - cfg.no_eos_penalty * torch.tensor([r[-1] != data.eot for r in outs])
    best = scores.view(-1, n).argmax(1)  # (prompts,) the first maximum of each row
    return [outs[i * n + k] for i, k in enumerate(best.tolist())]


def sample_eval(cfg, run, data, policy, reference):
    """Judge reward, win rate, KL and validity of policy samples against reference samples. For
    best_of_n the policy's samples are best_of_n's picks, and the KL is not estimated but bounded:
    KL(best-of-N || reference) <= log N - (N-1)/N, written as kl_bound: the formula used as the KL of
    best-of-N since Stiennon et al. 2020 (arXiv:2009.01325), shown to be an upper bound, not the value,
    by Beirami et al. 2024 (arXiv:2401.01879, Thm. 3.1); far below it when rewards often tie."""
    t0, mean = time.time(), lambda xs: sum(xs) / len(xs)
    bon = cfg.method == "best_of_n"
    pol = best_of_n(cfg, run, data, reference) if bon else sample(cfg, run, policy, data.eval_ids, cfg.policy_seed + 1, data.eot)
    res = {"policy_mean_length": mean(list(map(len, pol)))}
    pol_t, ref_t = [text(data, r) for r in pol], None
    if reference is not None:
        ref = sample(cfg, run, reference, data.eval_ids, cfg.seed + 2, data.eot)
        # KL(pi || pi_ref) = E_{y~pi}[log pi(y) - log pi_ref(y)], estimated on the policy's own samples:
        # an estimate of that KL only when the samples come from pi itself (temperature 1, no top-k)
        if cfg.temperature != 1.0 or cfg.top_k:
            print0("note: kl is measured on tempered/top-k samples, so it is not KL(pi || pi_ref)")
        if bon:
            res["kl_bound"] = math.log(cfg.best_of) - (cfg.best_of - 1) / cfg.best_of
        else:
            seqs = list(zip(data.eval_ids, pol))
            res["kl"] = (score(cfg, run, policy, seqs, data.eot)[0] - score(cfg, run, reference, seqs, data.eot)[0]).mean().item()
        res["reference_mean_length"] = mean(list(map(len, ref)))
        ref_t = [text(data, r) for r in ref]
        if data.judge is not None:
            res["win_rate"] = win_rate([call_judge(data, p, a, b) for p, a, b in zip(data.eval_prompts, pol_t, ref_t)])
    if data.task is not None:
        reward, valid = data.task["reward"], data.task["is_valid"]
        res["policy_reward"] = mean([reward(p, r) for p, r in zip(data.eval_prompts, pol_t)])
        res["valid_fraction"] = mean([valid(r) for r in pol_t])
        if ref_t:
            res["reference_reward"] = mean([reward(p, r) for p, r in zip(data.eval_prompts, ref_t)])
            res["reference_valid_fraction"] = mean([valid(r) for r in ref_t])
    for i in range(min(cfg.show_samples, len(pol_t))):
        print0(f"--- prompt: {data.eval_prompts[i]!r}\n    reference: {ref_t[i] if ref_t else '-'!r}\n    policy:    {pol_t[i]!r}")
    res["sample_seconds"] = time.time() - t0
    return res


def evaluate(cfg, run, data, model, reference, val_ref):
    """Both evaluations of a policy: held-out preferences, then samples; a reward model's own."""
    if cfg.method == "reward_model":
        return reward_model_eval(cfg, run, data, model)
    return {**preference_eval(cfg, run, data, model, val_ref), **sample_eval(cfg, run, data, model, reference)}


def final_eval(cfg, run, data, model, reference, val_ref):
    """The evaluation at the end of training, written to eval.json and metrics.jsonl."""
    result = dict(evaluate(cfg, run, data, model, reference, val_ref), wall_seconds=time.time() - run.t_start)
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    run.log(dict(stage="final", **result))
    print0("final: " + " | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return result


def eval_only(cfg, run, data, policy, reference, val_ref):
    """Evaluate a checkpoint (and sample --prompt three times from each model), no training."""
    policy.eval()
    if cfg.prompt:
        ids = [prompt_ids(data.enc, cfg.prompt, data.room)] * 3
        for who, m in (("reference", reference), ("policy", policy)):
            if m is not None:
                for r in sample(cfg, run, m, ids, cfg.seed, data.eot):
                    print0(f"{who}: {cfg.prompt!r} -> {text(data, r)!r}")
    res = evaluate(cfg, run, data, policy, reference, val_ref)
    print0(json.dumps(res, indent=1))
    if cfg.export:
        policy.save_pretrained(cfg.export)
        with open(os.path.join(cfg.export, "TOKENIZER.txt"), "w") as f:  # HF has no file for tiktoken's encodings
            f.write(f"tokenizer: {cfg.tokenizer} (tiktoken; 'bytes' is UTF-8 bytes, id 256 = <|endoftext|>); "
                    f"end-of-text id {data.eot}\n")
        print0(f"exported the policy as a Hugging Face GPT-2 folder: {cfg.export}")
    return res


# ------------------------------------------------------------------------------------------------

def main(argv):
    cfg = parse_config(argv)
    run = setup(cfg)
    data = load_data(cfg, run)
    resumed, run.ref_sha256 = resume_point(cfg, run, data)  # None, None for a new run
    policy = build_policy(cfg, run, data.enc, resumed)
    tokenize(cfg, run, data, policy.config.block_size)
    # the reference: trained here by SFT (or the rest of it) and saved, or a checkpoint's own; frozen, loaded once
    ref_path = os.path.join(cfg.out_dir, "ref.pt")
    if cfg.eval_only:
        ref_path = os.path.join(os.path.dirname(os.path.abspath(cfg.init_from)), "ref.pt")
    elif resumed is None or resumed["stage"] == "sft":
        if cfg.sft_iters > 0:
            sft(cfg, run, policy, data, resumed)
        if run.master:
            run.ref_sha256 = or_exit(save_checkpoint, ref_path, policy, stage="ref", config=dict(vars(cfg)),
                                     inputs=data.inputs, world=run.world)
            if os.path.exists(os.path.join(cfg.out_dir, "sft.pt")):
                os.remove(os.path.join(cfg.out_dir, "sft.pt"))  # SFT's state, done with
        if run.ddp:
            dist.barrier()  # the other ranks load it next
        resumed = None
    elif resumed["stage"] == "ref":  # stopped before training's first checkpoint: nothing past SFT to restore
        resumed = None
    if resumed is None and not cfg.eval_only:  # what follows the reference starts from its own seed
        torch.manual_seed(cfg.policy_seed + run.rank)
    reference = load_reference(cfg, run, ref_path)
    val_ref = score_pairs(cfg, run, reference, data.val, data.eot)[:2]
    if cfg.eval_only:
        return eval_only(cfg, run, data, policy, reference, val_ref)
    reward_model = ScalarGPT.from_model(policy) if cfg.method == "reward_model" else None
    if cfg.method == "best_of_n":     # no training: the reference's samples, the best of each N kept
        step = 0
    elif cfg.method == "ppo":         # RLHF step 3
        step = ppo(cfg, run, data, policy, reference, val_ref, resumed)
    elif reward_model is not None:    # RLHF step 2: from the SFT model, in the DPO loop
        step = dpo(cfg, run, data, reward_model, None, None, val_ref, resumed)
    else:
        train_ref = None
        if cfg.precompute_ref and reference is not None:
            t0 = time.time()
            train_ref = score_pairs(cfg, run, reference, data.train, data.eot)[:2]
            print0(f"precomputed reference log-probs of {len(data.train)} pairs in {time.time() - t0:.1f}s; reference dropped")
            reference = None  # freed for training; loaded again for the final evaluation
        step = dpo(cfg, run, data, policy, reference, train_ref, val_ref, resumed)
    result = None
    if run.master and step == dict(reward_model=cfg.rm_iters, ppo=cfg.ppo_iters, best_of_n=0).get(cfg.method, cfg.dpo_iters):
        if reference is None:
            reference = load_reference(cfg, run, ref_path)
        result = final_eval(cfg, run, data, policy if reward_model is None else reward_model, reference, val_ref)
    if run.ddp:
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        sys.exit("interrupted twice: stopped at once. Every checkpoint is written atomically, so the last one is whole; "
                 "continue with --init_from=resume")
