"""
What every test file shares: the float32 tolerance rule, a tiny model, and tiny runs of the recipe.

float32 results depend on summation order, and the order depends on the CPU's kernels (AVX2,
AVX-512, with or without bf16) and on a batch's shape. So a float32 result is never compared with a
tolerance picked until it passed. It is compared with an independent float64 computation, within a
bound derived from the float32 unit roundoff u = 2^-24, or with another float32 computation that
runs the very same kernels on the very same input (then they agree exactly, and the test says so).

The bound for response log-probabilities, the quantity nearly every DPO number is made of:
  - one token: log_softmax(z)_t = z_t - logsumexp(z), so an error in the logits z passes into the
    log-prob at most twice; a float32 forward pass computes z with an absolute error that grows with
    the logits' scale. TOKEN_ULPS * u * (1 + max|z|) per token, TOKEN_ULPS = 64: measured at most
    11 u max|z| (GPTs of 2-4 layers, width 16-128, vocabulary 37-257, logits up to 6; default, AVX2
    and AVX-512 kernels), so the bound holds with a margin of about 6x. test_model.py checks this rule
    itself on every kernel family, so a CPU that broke it would fail there, by name, not at random.
  - a sum of n of them: the n token errors add, and float32 summation adds at most (n - 1) u sum|x|.
A loss that is 1-Lipschitz in its argument (-log sigmoid) passes the bound on h through unchanged.
"""
import copy
import errno
import functools
import json
import os

import pytest
import torch

import reviews
import train
from model import GPT, GPTConfig
from runtime import setup
from evaluate import choose_judge
from task import load_data, tokenize

U32 = 2.0 ** -24  # float32 unit roundoff
TOKEN_ULPS = 64   # the per-token bound, in units of u * (1 + max|logit|)


@torch.no_grad()
def float64_logps(model, ids, mask):
    """The literal definition of the response log-probs (full logits, shift, log_softmax, gather),
    on a float64 copy of `model`. -> (per-row sums (B,), per-row bounds (B,), max |logit|, the
    token log-probs (B, T-1), 0 where not scored): each row's bound is what its float32 sum may
    differ from the sum here (the module docstring's rule)."""
    m = copy.deepcopy(model).double().eval()
    logits = m(ids)[:, :-1]                                                     # (B, T-1, V)
    tok = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None])[..., 0]     # (B, T-1)
    scored = mask[:, 1:]
    tok = torch.where(scored, tok, 0.0)
    zmax = logits.abs().max().item()
    n = scored.sum(1).double()
    bound = n * TOKEN_ULPS * U32 * (1 + zmax) + (n - 1).clamp(min=0) * U32 * tok.abs().sum(1)
    return tok.sum(1), bound, zmax, tok


def token_bound(zmax):
    """The rule's bound on one float32 token log-prob, for logits of scale zmax."""
    return TOKEN_ULPS * U32 * (1 + zmax)


# ------------------------------------------------------------------------------------------------
# a tiny model, and tiny runs of the recipe

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=160", "--batch_size=8", "--sft_batch_size=16",
        "--eval_pairs=32", "--eval_samples=8", "--max_new_tokens=24", "--show_samples=1", "--log_interval=1",
        "--dtype=float32", "--warmup_iters=2",
        "--collapse_kl=0"]  # tiny runs at high learning rates do wreck the tiny model: the rule has its own tests
FAST = ["--sft_iters=0", "--eval_samples=4", "--eval_pairs=8"]
RLHF = ["--sft_iters=0", "--eval_samples=4", "--max_new_tokens=16", "--rollout_batch=8", "--ppo_minibatch=4",
        "--ppo_epochs=2", "--eval_interval=2", "--show_samples=0"]


def tiny_model(seed=0, **kw):
    """A 2-layer, 16-wide GPT over a 37-token vocabulary, in eval mode (no dropout)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=37, block_size=64, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


@pytest.fixture(autouse=True, scope="session")
def task_built_once():
    """Every run builds the same reviews task (seed 1337, 0.5 s each): build it once per seed."""
    original = reviews.make_task
    reviews.make_task = functools.lru_cache(original)
    yield
    reviews.make_task = original


@pytest.fixture(scope="session")
def small_file(tmp_path_factory):
    """The first 400 training pairs of the reviews task as a .jsonl preference file: for runs whose
    test needs a whole pass over the data (a precomputed reference), not the task's 10,000 pairs."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in reviews.make_task(seed=1337).pairs[:400]))
    return str(path)


def stage_inputs(tmp_path, *args):
    """cfg, run and tokenized data of the tiny reviews setting, as main builds them."""
    cfg = train.parse_config(TINY + [f"--out_dir={tmp_path}", *args])
    with setup(cfg) as run:  # the out_dir is not kept locked: tests run the recipe into it too
        pass
    d = load_data(cfg)
    choose_judge(cfg, run, d)
    tokenize(cfg, d, 160)
    return cfg, run, d


def run_train(out, *args):
    return train.main(TINY + [f"--out_dir={out}", *args])


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny run from scratch: SFT, DPO, evaluation. Its ref.pt serves the other tests."""
    out = str(tmp_path_factory.mktemp("tiny"))
    result = run_train(out, "--sft_iters=80", "--sft_lr=3e-3", "--dpo_iters=16", "--dpo_lr=5e-4", "--beta=0.5", "--eval_interval=8")
    return out, result


@pytest.fixture(scope="session")
def tiny_rm(tiny_run, tmp_path_factory):
    """A reward model trained for 4 steps from the tiny run's reference."""
    out = tmp_path_factory.mktemp("rm")
    result = run_train(out, f"--init_from={tiny_run[0]}/ref.pt", "--method=reward_model", "--rm_iters=4", *RLHF)
    return out, result


class FullDisk:
    """A file on a disk that fills after `room` bytes: write() then raises OSError(ENOSPC), as a full
    disk does. tests put it in place of open() for the files they name (full_disk)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        if len(b) > self.room:
            self.f.write(bytes(b)[:self.room])  # the disk takes what fits, then fails
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):  # flush, fileno, seek, tell, truncate, name, close: the real file's
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def full_disk(monkeypatch, module, names, room):
    """From now on, files that `module` opens whose name is in `names` sit on a disk with `room` bytes free."""
    real_open = open

    def fake_open(path, mode="r", *args, **kw):
        f = real_open(path, mode, *args, **kw)
        return FullDisk(f, room) if os.path.basename(str(path)) in names else f
    monkeypatch.setattr(module, "open", fake_open, raising=False)
