"""
Settings from the command line: `--key=value`, read against a table of defaults, then checked.

The table (train.py's CONFIG) maps each setting to (default, help). A default's type is its
setting's type: `--beta=0.5` is a float, `--online=true` a bool. A malformed argument, an unknown
key, a value of the wrong type or out of range, or two settings that do not fit together stop with
one line that names the setting; `--help` prints the table.
"""
import sys
from types import SimpleNamespace

from dpo import check_loss_args
from ppo import CRITIC_FREE

POSITIVE = ("best_of", "n_layer", "n_embd", "batch_size", "sft_batch_size", "grad_accum", "dpo_lr", "max_new_tokens",
            "log_interval", "sft_log_interval", "eval_interval", "ckpt_interval", "eval_samples", "eval_pairs",
            "score_batch_size", "sample_batch_size", "online_redraws", "rm_iters", "rm_lr", "ppo_iters", "rollout_batch",
            "ppo_minibatch", "ppo_epochs", "ppo_lr", "clip_range_value", "kl_horizon", "group_size")
NON_NEGATIVE = ("sft_iters", "dpo_iters", "warmup_iters", "sft_warmup_iters", "sft_lr", "grad_clip", "stop_at",
                "top_k", "temperature", "threads", "weight_decay", "kl_coef", "target_kl", "no_eos_penalty", "diverge",
                "block_size", "length_group", "alpha", "collapse_kl")


def parse(argv, table, doc=""):
    """-> (settings {key: value}, the keys given on the command line)."""
    cfg, given = {k: v for k, (v, _) in table.items()}, set()
    if "--help" in argv or "-h" in argv:
        print(doc)
        for k, (v, h) in table.items():
            print(f"  --{k}={v!r:<14} {h}")
        sys.exit(0)
    for arg in argv:
        key, eq, val = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            sys.exit(f"bad argument {arg!r}: use --key=value (see --help)")
        if key not in cfg:
            sys.exit(f"unknown setting {key!r}; valid settings: {', '.join(table)}")
        cfg[key], given = convert(key, val, type(cfg[key])), given | {key}
    return cfg, given


def convert(key, val, kind):
    """A command-line string as the setting's type, or exit naming the setting."""
    try:
        if kind is bool:
            if val.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return val.lower() in ("true", "1")
        return kind(val)
    except ValueError:
        sys.exit(f"bad value for --{key}: {val!r} is not a {kind.__name__}")


def check(cfg, rules):
    """Stop at the first rule (key, holds, what it must be) that does not hold, naming the setting."""
    for key, ok, want in rules:
        if not ok:
            sys.exit(f"bad value for --{key}: {cfg[key]!r} (must be {want})")


def check_settings(cfg, methods):
    """Every setting in range, and the ones that must fit together fitting. -> the settings as
    attributes, with policy_seed resolved (-1: the seed)."""
    c = SimpleNamespace(**cfg)
    try:
        check_loss_args(c.beta, c.loss_type, c.label_smoothing)  # the loss's own checks, not a copy
    except ValueError as e:
        sys.exit(f"bad setting: {e}")
    check(cfg, [
        ("optimizer", c.optimizer in ("adamw", "rmsprop"), "'adamw' or 'rmsprop'"),
        ("method", c.method in methods, f"one of {tuple(methods)}"), ("gamma", 0 < c.gamma <= 1, "in (0, 1]"),
        ("lam", 0 <= c.lam <= 1, "in [0, 1]"), ("clip_range", 0 < c.clip_range < 1, "in (0, 1)"),
        ("ppo_minibatch", c.rollout_batch % c.ppo_minibatch == 0, "a divisor of --rollout_batch"),
        ("group_size", c.group_size >= 2 and (c.rollout_batch % c.group_size == 0 or c.method not in CRITIC_FREE),
         ">= 2 and, for grpo and rloo, a divisor of --rollout_batch"),
        ("kl_penalty", c.kl_penalty in ("reward", "loss") and (c.kl_penalty == "reward" or c.method in CRITIC_FREE),
         "'reward', or 'loss' with --method=grpo or rloo"),
        ("dtype", c.dtype in ("auto", "float32", "bfloat16"), "'auto', 'float32' or 'bfloat16'"),
        ("n_head", c.n_head > 0 and c.n_embd % c.n_head == 0, "a divisor of --n_embd"),
        ("out_dir", c.out_dir != "", "a folder"),
        ("val_fraction", 0 < c.val_fraction < 1, "in (0, 1)"), ("dropout", 0 <= c.dropout < 1, "in [0, 1)"),
        ("judge", c.judge == "" or ":" in c.judge or c.judge.endswith(".pt"), "module:function or a .pt"),
        ("task", c.task == "" or ":" in c.task, "module:name"),
        ("reward_model", c.reward_model == "" or c.method in ("ppo", *CRITIC_FREE, "best_of_n"),
         "empty unless --method=ppo, grpo, rloo or best_of_n"),
        *[(k, cfg[k] > 0, "> 0") for k in POSITIVE], *[(k, cfg[k] >= 0, ">= 0") for k in NON_NEGATIVE]])
    c.policy_seed = c.seed if c.policy_seed < 0 else c.policy_seed
    if c.online and c.precompute_ref:
        sys.exit("--precompute_ref=True needs a fixed training set; online DPO scores its fresh pairs as it goes")
    for flag in ("online", "precompute_ref", "reference_free"):
        if c.method in ("reward_model", "ppo", *CRITIC_FREE, "best_of_n") and getattr(c, flag):
            sys.exit(f"--{flag}=True is a DPO setting; it does not apply to --method={c.method}")
    if c.export and not c.eval_only:
        sys.exit("--export=DIR works with --eval_only=True (it exports the checkpoint given as --init_from)")
    if c.eval_only and c.init_from in ("scratch", "resume"):
        sys.exit("--eval_only=True needs --init_from=<checkpoint .pt or GPT-2 folder>")
    return c
