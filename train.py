"""
DPO from nothing, in one script: train a reference by maximum likelihood (SFT), then the policy by
Direct Preference Optimization against that frozen reference, then measure what it learned.

  python train.py                                   # embedded task, CPU, a few minutes
  python train.py --beta=0.5 --dpo_lr=1e-4          # any setting, as --key=value
  python train.py --help                            # every setting with its meaning
  torchrun --standalone --nproc_per_node=4 train.py --data=hh.jsonl ...   # several GPUs (DDP)
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data as D
from dpo import LOSS_TYPES, concatenated_logps, dpo_loss, response_logps
from model import GPT, GPTConfig

# ------------------------------------------------------------------------------------------------
# every setting: (default, what it does). Override any of them as --key=value.
CONFIG = dict(
    # data
    data=("reviews", "'reviews' (embedded task with a judge, no download) or a .jsonl/.jsonl.gz/.json preference file"),
    tokenizer=("bytes", "'bytes', a .tiktoken ranks file (offline GPT-2: ../shared/data/gpt2-bpe/gpt2.tiktoken) or a tiktoken name"),
    val_fraction=(0.05, "share of a preference file's prompts held out for evaluation"),
    min_prompt_tokens=(8, "truncation keeps at least this many prompt tokens before it cuts responses"),
    # model
    init_from=("scratch", "'scratch', 'resume' (out_dir/ckpt.pt), a checkpoint .pt, or a Hugging Face GPT-2 folder"),
    n_layer=(4, "transformer blocks (scratch only)"),
    n_head=(4, "attention heads (scratch only)"),
    n_embd=(128, "width (scratch only)"),
    block_size=(256, "context length in tokens (scratch only; sequences are truncated to it)"),
    dropout=(0.0, "dropout in the policy; the reference never uses it"),
    # stage 1: the reference, by maximum likelihood on responses (the embedded corpus or the chosen ones)
    sft_iters=(1200, "SFT steps before DPO (0: init_from already is the reference)"),
    sft_batch_size=(32, "sequences per SFT step, per process"),
    sft_lr=(3e-3, "SFT peak learning rate (warm-up, then cosine decay to 10%)"),
    # stage 2: DPO
    dpo_iters=(150, "DPO optimizer steps"),
    batch_size=(32, "preference pairs per micro-step, per process"),
    grad_accum=(1, "micro-steps per optimizer step, summed over all processes"),
    dpo_lr=(1e-4, "DPO learning rate after warm-up (the DPO paper: 1e-6 for large pretrained models)"),
    warmup_iters=(10, "linear warm-up steps; step 0 already gets lr/warmup_iters, never 0"),
    optimizer=("adamw", "'adamw' or 'rmsprop' (the DPO paper's)"),
    weight_decay=(0.0, "AdamW weight decay on matrices"),
    grad_clip=(1.0, "clip the gradient norm to this (0: off)"),
    method=("dpo", "'dpo', or 'preferred_ft': the baseline that maximises the likelihood of the chosen responses"),
    beta=(1.0, "strength of the KL anchor to the reference: small beta lets the policy move further"),
    loss_type=("sigmoid", f"one of {LOSS_TYPES}"),
    label_smoothing=(0.0, "conservative DPO: assumed share of flipped labels, in [0, 0.5)"),
    reference_free=(False, "take log pi_ref = 0 (no reference model in the loss)"),
    precompute_ref=(False, "score the training set with the reference once, then drop it from memory"),
    online=(False, "online DPO: each step sample two responses per prompt from the current policy and let the judge pick"),
    judge=("", "module:function, judge(prompt, a, b) -> 0 (a better), 1 (b better) or None; the task's own judge by default"),
    # evaluation and logging
    eval_interval=(50, "DPO steps between held-out preference evaluations"),
    eval_pairs=(256, "held-out pairs for the preference metrics"),
    eval_samples=(256, "held-out prompts sampled from policy and reference at the end"),
    max_new_tokens=(160, "longest sampled response"),
    temperature=(1.0, "sampling temperature at evaluation (0: greedy)"),
    top_k=(0, "sample from the top k tokens only (0: all)"),
    show_samples=(3, "prompts printed with reference and policy samples side by side"),
    log_interval=(10, "steps between log lines"),
    eval_only=(False, "only evaluate and sample init_from (a checkpoint), no training"),
    prompt=("", "with eval_only: also sample continuations of this prompt"),
    # system
    out_dir=("out", "where ref.pt, ckpt.pt, config.json, metrics.jsonl and eval.json go"),
    ckpt_interval=(50, "DPO steps between checkpoints (and one at the end)"),
    stop_at=(0, "stop after this DPO step, with a checkpoint (0: run to dpo_iters); continue with init_from=resume"),
    seed=(1337, "seeds data order, initialisation and sampling"),
    device=("auto", "'auto' (cuda, then mps, then cpu), or e.g. 'cpu', 'cuda:1'"),
    dtype=("auto", "'float32' or 'bfloat16' autocast; auto: bfloat16 where the hardware has it"),
    compile=(False, "torch.compile the policy"),
    threads=(0, "CPU threads for torch (0: torch's default)"),
)


def parse_config(argv):
    cfg = {k: v for k, (v, _) in CONFIG.items()}
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
        try:
            if kind is bool:
                if val.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                cfg[key] = val.lower() in ("true", "1")
            else:
                cfg[key] = kind(val)
        except ValueError:
            sys.exit(f"bad value for --{key}: {val!r} is not a {kind.__name__}")
    checks = [("loss_type", cfg["loss_type"] in LOSS_TYPES, f"one of {LOSS_TYPES}"),
              ("optimizer", cfg["optimizer"] in ("adamw", "rmsprop"), "'adamw' or 'rmsprop'"),
              ("method", cfg["method"] in ("dpo", "preferred_ft"), "'dpo' or 'preferred_ft'"),
              ("dtype", cfg["dtype"] in ("auto", "float32", "bfloat16"), "'auto', 'float32' or 'bfloat16'"),
              ("beta", cfg["beta"] > 0, "> 0"), ("label_smoothing", 0 <= cfg["label_smoothing"] < 0.5, "in [0, 0.5)"),
              ("val_fraction", 0 < cfg["val_fraction"] < 1, "in (0, 1)"), ("judge", cfg["judge"] == "" or ":" in cfg["judge"], "module:function")]
    checks += [("label_smoothing", cfg["label_smoothing"] == 0 or cfg["loss_type"] == "sigmoid", "0 unless loss_type is sigmoid"),
               ("dropout", 0 <= cfg["dropout"] < 1, "in [0, 1)")]
    checks += [(k, cfg[k] > 0, "> 0") for k in ("batch_size", "sft_batch_size", "grad_accum", "dpo_lr", "block_size",
                                                  "max_new_tokens", "log_interval", "eval_interval", "ckpt_interval",
                                                  "eval_samples", "eval_pairs")]
    checks += [(k, cfg[k] >= 0, ">= 0") for k in ("sft_iters", "dpo_iters", "warmup_iters", "sft_lr", "grad_clip",
                                                   "stop_at", "top_k", "temperature")]
    for key, ok, want in checks:
        if not ok:
            sys.exit(f"bad value for --{key}: {cfg[key]!r} (must be {want})")
    if cfg["online"] and cfg["precompute_ref"]:
        sys.exit("--precompute_ref=True needs a fixed training set; online DPO scores its fresh pairs as it goes")
    if cfg["eval_only"] and cfg["init_from"] in ("scratch", "resume"):
        sys.exit("--eval_only=True needs --init_from=<checkpoint .pt or GPT-2 folder>")
    return cfg


# ------------------------------------------------------------------------------------------------
# helpers: processes, devices, checkpoints, schedules

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


def or_exit(fn, *args, **kw):
    """Bad input (a file, a field, a tokenizer, a checkpoint) stops with its message, not a traceback."""
    try:
        return fn(*args, **kw)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def save_atomic(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-write leaves the last good file untouched


def load_model(path, device, dropout=0.0):
    if os.path.isdir(path):
        return GPT.from_pretrained(path, dropout=dropout).to(device)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**{**ck["model_args"], "dropout": dropout}))
    model.load_state_dict(ck["model"])
    return model.to(device)


def frozen(model):
    model.eval()  # no dropout in the reference
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_optimizer(model, cfg, lr):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=cfg["weight_decay"]), dict(params=rest, weight_decay=0.0)]
    if cfg["optimizer"] == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=torch.cuda.is_available())


def lr_at(step, peak, warmup, total, cosine):
    if step < warmup:
        return peak * (step + 1) / warmup
    if not cosine:
        return peak
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def load_judge(spec):
    """'module:function' -> the callable, with errors that name the spec."""
    mod_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(__import__(mod_name, fromlist=[fn_name]), fn_name)
    except (ImportError, AttributeError) as e:
        sys.exit(f"--judge={spec}: cannot load it ({e})")
    if not callable(fn):
        sys.exit(f"--judge={spec}: {fn_name} is not callable")
    return fn


def call_judge(judge, name, prompt, a, b):
    try:
        verdict = judge(prompt, a, b)
    except Exception as e:
        raise SystemExit(f"judge {name} raised {type(e).__name__}: {e} (prompt {prompt[:60]!r})") from None
    if verdict not in (0, 1, None):
        raise SystemExit(f"judge {name} returned {verdict!r}; it must return 0, 1 or None")
    return verdict


def reward_judge(reward):
    def judge(prompt, a, b):
        ra, rb = reward(prompt, a), reward(prompt, b)
        return None if ra == rb else (0 if ra > rb else 1)
    return judge


def main(argv):
    cfg = parse_config(argv)
    t_start = time.time()
    # --------------------------------------------------------------------------------------------
    # processes and device
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = cfg["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if cfg["grad_accum"] % world:
        sys.exit(f"grad_accum ({cfg['grad_accum']}) must be divisible by the number of processes ({world})")
    accum = cfg["grad_accum"] // world
    master = rank == 0
    dev_type = device.split(":")[0]
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    dtype = cfg["dtype"]
    if dtype == "auto":  # bf16 where the hardware multiplies it natively (measured faster), else fp32
        dtype = "bfloat16" if (torch.cuda.is_bf16_supported() if dev_type == "cuda" else
                               dev_type == "cpu" and cpu_has_bf16()) else "float32"
    ctx = torch.autocast(dev_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    torch.manual_seed(cfg["seed"] + rank)
    out = cfg["out_dir"]
    os.makedirs(out, exist_ok=True)
    print0(json.dumps(dict(cfg, resolved_device=device, resolved_dtype=dtype, world_size=world), indent=1))
    if master and not cfg["eval_only"]:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    metrics_file = open(os.path.join(out, "metrics.jsonl"), "a") if master else None

    def log(record):
        if master:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    # --------------------------------------------------------------------------------------------
    # data: preference pairs, the SFT corpus, held-out prompts, and a judge when there is one
    enc = or_exit(D.get_tokenizer, cfg["tokenizer"])
    eot = enc.eot_token
    judge, judge_name = None, ""
    if cfg["data"] == D.TASK_NAME:
        task = D.make_task(seed=cfg["seed"])
        train_pairs, val_pairs, eval_prompts = task["train"], task["val"], task["eval_prompts"]
        sft_texts = task["sft"]
        judge, judge_name = reward_judge(task["reward"]), "reviews.reward"
    else:
        pairs = or_exit(D.load_pairs, cfg["data"], verbose=master)
        train_pairs, val_pairs = D.split_by_prompt(pairs, cfg["val_fraction"], cfg["seed"])
        sft_texts = [(p["prompt"], p["chosen"]) for p in train_pairs]  # SFT on the preferred responses
        eval_prompts = sorted({p["prompt"] for p in val_pairs})
    if cfg["judge"]:
        judge, judge_name = load_judge(cfg["judge"]), cfg["judge"]
    if cfg["online"] and judge is None:
        sys.exit("--online=True needs a judge: use the reviews task or pass --judge=module:function")
    eval_prompts = (eval_prompts * math.ceil(cfg["eval_samples"] / max(1, len(eval_prompts))))[:cfg["eval_samples"]]

    # --------------------------------------------------------------------------------------------
    # the model: from scratch, a checkpoint, GPT-2 weights, or where a run stopped
    resume = cfg["init_from"] == "resume"
    ref_path = os.path.join(out, "ref.pt")
    if cfg["init_from"] == "scratch":
        model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                              n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=cfg["dropout"])).to(device)
    else:
        model = or_exit(load_model, ref_path if resume else cfg["init_from"], device, cfg["dropout"])
    mcfg = model.config
    if mcfg.vocab_size != enc.n_vocab:
        sys.exit(f"the model's vocabulary ({mcfg.vocab_size}) does not match tokenizer {cfg['tokenizer']!r} ({enc.n_vocab} tokens); "
                 f"pass the tokenizer the model was trained with, e.g. --tokenizer=../shared/data/gpt2-bpe/gpt2.tiktoken for GPT-2")
    print0(f"model: {model.num_params() / 1e6:.2f}M parameters, {asdict(mcfg)}")
    block = mcfg.block_size
    if cfg["max_new_tokens"] >= block:
        sys.exit(f"bad value for --max_new_tokens: {cfg['max_new_tokens']} leaves no room for a prompt in block_size {block}")
    tok = lambda pairs: D.tokenize_pairs(pairs, enc, block, cfg["min_prompt_tokens"], verbose=master)
    train, val = tok(train_pairs), tok(val_pairs)[:cfg["eval_pairs"]]
    # the prompts keep their end and leave room for the response
    eval_ids = [(enc.encode_ordinary(p) or [eot])[-(block - cfg["max_new_tokens"]):] for p in eval_prompts]

    def ckpt_dict(m):
        return dict(model=m.state_dict(), model_args=asdict(m.config), config=cfg)

    # --------------------------------------------------------------------------------------------
    # stage 1: the reference, by maximum likelihood on responses given their prompts
    if not resume and not cfg["eval_only"] and cfg["sft_iters"] > 0:
        sft = D.tokenize_sft(sft_texts, enc, block, cfg["min_prompt_tokens"], verbose=master)
        loader = D.Batches(sft, cfg["sft_batch_size"], cfg["seed"], rank, world)
        sft_model = DDP(model) if ddp else model
        opt = make_optimizer(model, cfg, cfg["sft_lr"])
        model.train()
        for step in range(cfg["sft_iters"]):
            lr = lr_at(step, cfg["sft_lr"], 20, cfg["sft_iters"], cosine=True)
            for g in opt.param_groups:
                g["lr"] = lr
            ids, mask = (x.to(device) for x in D.collate_sft(loader.next(), eot))
            with ctx:
                logps, n = response_logps(sft_model, ids, mask)
                loss = -logps.sum() / n.sum()  # mean negative log-likelihood per response token
            loss.backward()
            if cfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % (cfg["log_interval"] * 10) == 0 or step == cfg["sft_iters"] - 1:
                print0(f"sft {step + 1}/{cfg['sft_iters']} | nll/token {loss.item():.4f} | lr {lr:.2e} | {time.time() - t_start:.0f}s")
                log(dict(stage="sft", step=step + 1, nll=loss.item(), lr=lr, elapsed=time.time() - t_start))
        del opt, sft_model
    if not resume and not cfg["eval_only"]:
        if master:
            save_atomic(ckpt_dict(model), ref_path)
        if ddp:
            dist.barrier()  # the other ranks load it next
    elif cfg["eval_only"]:  # the reference saved beside the checkpoint, if there is one
        ref_path = os.path.join(os.path.dirname(os.path.abspath(cfg["init_from"])), "ref.pt")
    # the frozen reference: a copy, in eval mode, without gradients, never seen by the optimizer
    reference = None
    if not cfg["reference_free"] and os.path.isfile(ref_path):
        reference = frozen(load_model(ref_path, device))
    elif not cfg["reference_free"] and not cfg["eval_only"]:
        sys.exit(f"{ref_path}: the reference is missing")
    elif not cfg["reference_free"]:
        print0(f"no reference at {ref_path}: evaluating without reference comparisons")

    @torch.no_grad()
    def score(m, seqs, bs=64):
        """Summed response log-probs and token counts of (prompt_ids, response_ids) pairs, in batches."""
        was_training, out = m.training, []
        m.eval()
        with ctx:
            for i in range(0, len(seqs), bs):
                ids, mask = (x.to(device) for x in D.collate_sft(seqs[i:i + bs], eot))
                out.append([x.float() for x in response_logps(m, ids, mask)])
        m.train(was_training)
        return [torch.cat(x) for x in zip(*out)]

    def score_pairs(m, examples):
        """-> (chosen logps, rejected logps, chosen lengths, rejected lengths); zeros without a reference."""
        if m is None:
            z = torch.zeros(len(examples), device=device)
            return z, z, z, z
        lp, n = score(m, [(p, c) for p, c, _ in examples] + [(p, r) for p, _, r in examples])
        B = len(examples)
        return lp[:B], lp[B:], n[:B], n[B:]

    # --------------------------------------------------------------------------------------------
    # evaluation: held-out preferences, and samples from policy and reference scored by the judge
    val_ref = score_pairs(reference, val)[:2]

    def preference_eval(m):
        pc, pr, nc, nr = score_pairs(m, val)
        losses, rw, rl = dpo_loss(pc, pr, *val_ref, cfg["beta"], cfg["loss_type"], cfg["label_smoothing"], nc, nr)
        return dict(val_loss=losses.mean().item(), pref_accuracy=(rw > rl).float().mean().item(),
                    val_margin=(rw - rl).mean().item())

    def sample(m, prompt_ids, seed, bs=128):
        was_training, outs = m.training, []
        m.eval()
        g = torch.Generator(device=device).manual_seed(seed)
        with ctx:
            for i in range(0, len(prompt_ids), bs):
                outs += m.generate(prompt_ids[i:i + bs], cfg["max_new_tokens"], cfg["temperature"],
                                   cfg["top_k"] or None, eot, generator=g)
        m.train(was_training)
        return outs

    def text(resp):
        return enc.decode(resp[:-1] if resp and resp[-1] == eot else resp)

    def sample_eval(m):
        """Judge reward, win rate, KL and validity of policy samples against reference samples."""
        t0 = time.time()
        pol = sample(m, eval_ids, cfg["seed"] + 1)
        res = {"policy_mean_length": sum(map(len, pol)) / len(pol)}
        if reference is not None:
            ref = sample(reference, eval_ids, cfg["seed"] + 2)
            # KL(pi || pi_ref) estimated on the policy's own samples: E[log pi(y) - log pi_ref(y)];
            # an estimate of that KL only when the samples come from pi itself (temperature 1, no top-k)
            if cfg["temperature"] != 1.0 or cfg["top_k"]:
                print0("note: kl is measured on tempered/top-k samples, so it is not KL(pi || pi_ref)")
            seqs = list(zip(eval_ids, pol))
            res["kl"] = (score(m, seqs)[0] - score(reference, seqs)[0]).mean().item()
            res["reference_mean_length"] = sum(map(len, ref)) / len(ref)
        pol_t = [text(r) for r in pol]
        ref_t = [text(r) for r in ref] if reference is not None else None
        if judge is not None and reference is not None:
            wins = [call_judge(judge, judge_name, p, a, b) for p, a, b in zip(eval_prompts, pol_t, ref_t)]
            res["win_rate"] = sum(1.0 if w == 0 else 0.5 if w is None else 0.0 for w in wins) / len(wins)
        if cfg["data"] == D.TASK_NAME:
            mean = lambda xs: sum(xs) / len(xs)
            res["policy_reward"] = mean([task["reward"](p, r) for p, r in zip(eval_prompts, pol_t)])
            res["valid_fraction"] = mean([task["is_valid"](r) for r in pol_t])
            if ref_t:
                res["reference_reward"] = mean([task["reward"](p, r) for p, r in zip(eval_prompts, ref_t)])
                res["reference_valid_fraction"] = mean([task["is_valid"](r) for r in ref_t])
        for i in range(min(cfg["show_samples"], len(pol_t))):
            print0(f"--- prompt: {eval_prompts[i]!r}\n    reference: {ref_t[i] if ref_t else '-'!r}\n    policy:    {pol_t[i]!r}")
        res["sample_seconds"] = time.time() - t0
        return res

    if cfg["eval_only"]:
        model.eval()
        if cfg["prompt"]:
            p_ids = [(enc.encode_ordinary(cfg["prompt"]) or [eot])[-(block - cfg["max_new_tokens"]):]] * 3
            for who, m in (("reference", reference), ("policy", model)):
                if m is not None:
                    for r in sample(m, p_ids, cfg["seed"]):
                        print0(f"{who}: {cfg['prompt']!r} -> {text(r)!r}")
        res = {**preference_eval(model), **sample_eval(model)}
        print0(json.dumps(res, indent=1))
        return res

    # --------------------------------------------------------------------------------------------
    # stage 2: DPO
    policy = model
    policy.train()
    optimizer = make_optimizer(policy, cfg, cfg["dpo_lr"])
    loader = D.Batches(list(range(len(train))), cfg["batch_size"], cfg["seed"], rank, world)
    step = 0
    if resume:
        ck = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
        policy.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        loader.load_state_dict(ck["data"]["pairs"])
        step = ck["step"]
        torch.set_rng_state(ck["rng"]["torch"])  # dropout masks (rank 0's state; exact when dropout=0)
        if ck["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        print0(f"resumed from {out}/ckpt.pt at step {step}")
    train_ref = None
    if cfg["precompute_ref"] and reference is not None:
        t0 = time.time()
        train_ref = score_pairs(reference, train)[:2]
        print0(f"precomputed reference log-probs of {len(train)} pairs in {time.time() - t0:.1f}s; reference dropped")
        reference = None  # freed; it is loaded again for the final evaluation
    if cfg["online"]:
        room = block - cfg["max_new_tokens"]  # prompts keep their end and leave room to sample
        prompt_loader = D.Batches(sorted({tuple(p[-room:]) for p, _, _ in train}), cfg["batch_size"], cfg["seed"], rank, world)
        online_stats = dict(pairs=0, ties=0)
        if resume:
            prompt_loader.load_state_dict(ck["data"]["prompts"])
            online_stats = ck["data"]["online_stats"]

    def online_batch(step, micro):
        """Two fresh samples per prompt from the current policy; the judge picks, ties are dropped.
        The sampling seed is a function of (seed, step, micro-step, rank), so a resumed run draws
        exactly what an uninterrupted one would have."""
        prompts = [list(p) for p in prompt_loader.next()]
        for attempt in range(10):  # an all-tie batch is drawn again, so every rank has pairs to train on
            both = sample(policy, prompts + prompts, hash((cfg["seed"], step, micro, rank, attempt)) % 2**31)
            batch = []
            for p, ra, rb in zip(prompts, both[:len(prompts)], both[len(prompts):]):
                w = call_judge(judge, judge_name, enc.decode(p), text(ra), text(rb))
                if w is None or ra == rb:
                    online_stats["ties"] += 1
                else:
                    batch.append((p, ra, rb) if w == 0 else (p, rb, ra))
            online_stats["pairs"] += len(batch)
            if batch:
                return batch
        sys.exit(f"the judge {judge_name} called every pair a tie, 10 times in a row, at DPO step {step + 1}")

    def data_state():
        if not cfg["online"]:
            return dict(pairs=loader.state_dict())
        return dict(pairs=loader.state_dict(), prompts=prompt_loader.state_dict(), online_stats=dict(online_stats))

    raw, train_model = policy, DDP(policy) if ddp else policy
    if cfg["compile"]:
        train_model = torch.compile(train_model)
    last_step = min(cfg["dpo_iters"], cfg["stop_at"] or cfg["dpo_iters"])
    t_loop, t_log, pairs_seen, tokens_seen, first_step = time.time(), time.time(), 0, 0, step
    while step < last_step:
        lr = lr_at(step, cfg["dpo_lr"], cfg["warmup_iters"], cfg["dpo_iters"], cosine=False)
        for g in optimizer.param_groups:
            g["lr"] = lr
        stats = torch.zeros(6, device=device)
        for micro in range(accum):
            ref_c = ref_r = None  # stays None for reference-free DPO
            if cfg["online"]:
                examples = online_batch(step, micro)
            else:
                idx = loader.next()
                examples = [train[i] for i in idx]
                if train_ref is not None:
                    ref_c, ref_r = train_ref[0][idx], train_ref[1][idx]
            ids, mask = (x.to(device) for x in D.collate(examples, eot))
            if ref_c is None and reference is not None:
                with torch.no_grad(), ctx:
                    ref_c, ref_r = (x.float() for x in concatenated_logps(reference, ids, mask)[:2])
            sync = nullcontext() if not ddp or micro == accum - 1 else train_model.no_sync()
            with sync:
                with ctx:
                    pc, pr, nc, nr = (x.float() for x in concatenated_logps(train_model, ids, mask))
                    losses, rw, rl = dpo_loss(pc, pr, ref_c, ref_r, cfg["beta"], cfg["loss_type"],
                                              cfg["label_smoothing"], nc, nr)
                    # summed over pairs, divided by the pairs a full step holds: online steps with
                    # fewer pairs (ties dropped) move the weights less, not with a larger weight each
                    loss = losses.sum() / (cfg["batch_size"] * accum)
                    if cfg["method"] == "preferred_ft":  # same batches and steps, no rejected side
                        loss = -pc.sum() / nc.sum() / accum
                loss.backward()
            shown = loss.detach() * accum if cfg["method"] == "preferred_ft" else losses.detach().mean()
            stats += torch.stack([shown, rw.mean(), rl.mean(), (rw > rl).float().mean(),
                                  pc.detach().mean(), pr.detach().mean()]) / accum
            pairs_seen += len(examples) * world
            tokens_seen += mask.numel() * world
        # gradients are identical on every rank after the all-reduce, so every rank stops together
        gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg["grad_clip"] or float("inf"))
        if not torch.isfinite(gnorm):
            what = "loss" if not torch.isfinite(stats[0]) else "gradient norm"
            sys.exit(f"non-finite {what} at DPO step {step + 1}; stopped, the last good checkpoint is {out}/ckpt.pt")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % cfg["log_interval"] == 0 or step == last_step:
            s = stats.tolist()
            dt = time.time() - t_log
            rec = dict(stage="dpo", step=step, loss=s[0], **{"rewards/chosen": s[1], "rewards/rejected": s[2],
                       "rewards/margins": s[1] - s[2], "rewards/accuracies": s[3], "logps/chosen": s[4],
                       "logps/rejected": s[5]}, grad_norm=gnorm.item(), lr=lr, pairs_per_s=pairs_seen / dt,
                       tokens_per_s=tokens_seen / dt, elapsed=time.time() - t_start)
            if cfg["online"]:
                rec.update(online_pairs=online_stats["pairs"], online_ties=online_stats["ties"])
            eta = (time.time() - t_loop) / (step - first_step) * (last_step - step)
            print0(f"dpo {step}/{cfg['dpo_iters']} | loss {s[0]:.4f} | r/chosen {s[1]:+.3f} r/rejected {s[2]:+.3f} "
                   f"margin {s[1] - s[2]:+.3f} acc {s[3]:.2f} | logps {s[4]:.1f}/{s[5]:.1f} | gnorm {gnorm.item():.2f} "
                   f"| lr {lr:.1e} | {rec['pairs_per_s']:.0f} pairs/s {rec['tokens_per_s']:.0f} tok/s | "
                   f"{rec['elapsed']:.0f}s, eta {eta:.0f}s")
            log(rec)
            t_log, pairs_seen, tokens_seen = time.time(), 0, 0
        t_aside = time.time()  # evaluation and checkpoints do not count against the training rate
        if master and (step % cfg["eval_interval"] == 0 or step == last_step):
            rec = dict(stage="eval", step=step, **preference_eval(raw))
            print0(f"eval {step}: val loss {rec['val_loss']:.4f} | implicit-reward accuracy {rec['pref_accuracy']:.3f} | margin {rec['val_margin']:+.3f}")
            log(rec)
        if master and (step % cfg["ckpt_interval"] == 0 or step == last_step):
            rng = dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if dev_type == "cuda" else [])
            save_atomic(dict(ckpt_dict(raw), optimizer=optimizer.state_dict(), step=step, data=data_state(), rng=rng),
                        os.path.join(out, "ckpt.pt"))
        t_log += time.time() - t_aside
        t_loop += time.time() - t_aside

    # --------------------------------------------------------------------------------------------
    # final evaluation (rank 0)
    result = None
    if master and step == cfg["dpo_iters"]:
        if reference is None and not cfg["reference_free"]:
            reference = frozen(load_model(ref_path, device))
        result = dict(preference_eval(raw), **sample_eval(raw), wall_seconds=time.time() - t_start)
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(result, f, indent=1)
        log(dict(stage="final", **result))
        print0("final: " + " | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
