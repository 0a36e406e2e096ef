"""
A task: what the recipe trains on and how its result is judged.

    Task(name, pairs, reward=None, is_valid=None, val_pairs=None, prompts=None, sft=None)

  pairs      training preference pairs, {"prompt", "chosen", "rejected"} strings (or any record a
             preference file may hold, data.load_pairs); None: read from --data
  reward     reward(prompt, response) -> float, the task's exact reward: PPO-GT maximises it, Best-of-N
             picks by it, it judges policy against reference (the higher reward wins), and the
             evaluation reports its mean. None: no reward (a preference file): those need --judge or
             --reward_model
  is_valid   is_valid(prompt, response) -> bool, optional: the evaluation reports the share of valid samples
  val_pairs  held-out pairs; None: a --val_fraction of pairs' prompts is held out
  prompts    held-out prompts to sample at evaluation; None: the held-out pairs' prompts
  sft        (prompt, response) texts the reference is trained on by SFT; None: the chosen responses

Choose one on the command line with --task=module:name, where `name(seed)` returns a Task: the
embedded `reviews` task (reviews.py, `--data=reviews`, the default) is loaded the same way. Without
--task, --data names a preference file, which is a task with pairs and nothing else.
"""
import importlib
import math
import os
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

import data as D
from runtime import or_exit


@dataclass
class Task:
    name: str
    pairs: list = None
    reward: Callable = None
    is_valid: Callable = None
    val_pairs: list = None
    prompts: list = None
    sft: list = None
    length_grouped: bool = True  # batches of similar lengths (measured on reviews: a worse reference; off there)


EMBEDDED = {"reviews": "reviews:make_task"}  # --data names that are tasks, not files


def load_object(spec, what):
    """'module:name' -> the object, or ValueError naming the spec (the module is imported from the
    current folder or the Python path)."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"--{what}={spec}: expected module:name")
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except Exception as e:  # not found, or the module fails as it is imported (a syntax error, an exception)
        where = f" ({e.filename}, line {e.lineno})" if isinstance(e, SyntaxError) else ""
        raise ValueError(f"--{what}={spec}: cannot load it ({type(e).__name__}: {getattr(e, 'msg', e)}{where})") from None


def load_task(cfg, verbose=True):
    """The run's task, every field filled in: pairs, held-out pairs, SFT texts, held-out prompts."""
    if cfg.task or cfg.data in EMBEDDED:
        spec, what = (cfg.task, "task") if cfg.task else (EMBEDDED[cfg.data], "data")
        make = or_exit(load_object, spec, what)
        try:
            task = make(cfg.seed)
        except Exception as e:
            sys.exit(f"--{what}={spec}: raised {type(e).__name__}: {e}")
        task = replace(or_exit(check_task, task, f"--{what}={spec}", verbose))  # a copy: what is filled in is this run's
    else:
        task = Task(name=cfg.data)
    if task.pairs is None:
        if cfg.data in EMBEDDED:
            sys.exit(f"--task={cfg.task}: it has no pairs of its own; give a preference file as --data")
        task.pairs = or_exit(D.load_pairs, cfg.data, verbose=verbose)
    if task.val_pairs is None:
        task.pairs, task.val_pairs = D.split_by_prompt(task.pairs, cfg.val_fraction, cfg.seed)
        if not task.val_pairs:
            sys.exit(f"{cfg.data}: its {len(task.pairs)} pairs share one prompt; a held-out split needs two prompts or more")
    if task.sft is None:
        task.sft = [(p["prompt"], p["chosen"]) for p in task.pairs]  # SFT on the preferred responses
    if task.prompts is None:
        task.prompts = sorted({p["prompt"] for p in task.val_pairs})
    return task


def check_task(task, source, verbose):
    """A task function's result, checked field by field (ValueError naming the field); its pairs go
    through the preference-file checks, so they may take any of a file's record formats."""
    if not isinstance(task, Task):
        raise ValueError(f"{source}: returned {type(task).__name__}, not a task.Task")
    for field in ("reward", "is_valid"):
        if getattr(task, field) is not None and not callable(getattr(task, field)):
            raise ValueError(f"{source}: field '{field}': not a function")
    fields = {}
    for field in ("pairs", "val_pairs"):
        value = getattr(task, field)
        if value is not None:
            if not isinstance(value, list):
                raise ValueError(f"{source}: field '{field}': expected a list of pairs, got {type(value).__name__}")
            fields[field] = D.parse_pairs([(f"{field}[{i}]", r) for i, r in enumerate(value)], source, verbose)
    if task.prompts is not None and not (isinstance(task.prompts, list) and task.prompts
                                         and all(isinstance(p, str) for p in task.prompts)):
        raise ValueError(f"{source}: field 'prompts': expected a non-empty list of strings")
    if task.sft is not None and not (isinstance(task.sft, list) and task.sft and all(
            isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(s, str) for s in x) for x in task.sft)):
        raise ValueError(f"{source}: field 'sft': expected a non-empty list of (prompt, response) strings")
    return replace(task, **fields)


def call_task(data, fn, prompt, response):
    """A task's reward or is_valid on one sample, or exit naming the task and the prompt."""
    try:
        out = fn(prompt, response)
        if fn is data.task.is_valid:
            return bool(out)
        if not math.isfinite(float(out)):
            raise ValueError(f"returned {out!r}, not a finite number")
        return float(out)
    except Exception as e:
        sys.exit(f"task {data.task.name}: {fn.__name__}({prompt[:40]!r}, ...) failed: {type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------------
# a run's data: the task, tokenized for the model

@dataclass
class Data:
    """What the stages read: the task, the tokenizer, and the task's texts as token ids."""
    task: Task
    enc: Any                    # the tiktoken Encoding
    inputs: dict                # sha256 of the data and tokenizer files: a resumed run must find them unchanged
    eval_prompts: list          # held-out prompts as text, cycled to --eval_samples of them
    judge: Callable = None      # judge(prompt, a, b) -> 0, 1 or None (evaluate.py)
    judge_name: str = ""
    train: list = None          # (prompt, chosen, rejected) token ids, fitted to the block: set by tokenize()
    val: list = None            # the same for --eval_pairs held-out pairs
    eval_ids: list = None       # eval_prompts as token ids, leaving room for max_new_tokens
    room: int = 0               # prompt tokens a sample may condition on
    train_ref: tuple = None     # --precompute_ref: the reference's log-probs of train (chosen, rejected)

    @property
    def eot(self):
        return self.enc.eot_token


def load_data(cfg, verbose=True):
    enc = or_exit(D.get_tokenizer, cfg.tokenizer)
    task = load_task(cfg, verbose)
    eval_prompts = (task.prompts * math.ceil(cfg.eval_samples / max(1, len(task.prompts))))[:cfg.eval_samples]
    inputs = {k: D.file_digest(v) if os.path.isfile(v) else v for k, v in (("data", cfg.data), ("tokenizer", cfg.tokenizer))}
    return Data(task=task, enc=enc, inputs=inputs, eval_prompts=eval_prompts)


def tokenize(cfg, data, block, verbose=True):
    """Token ids for the model's block size: train and held-out pairs, and prompts to sample from,
    which keep their end and leave room for max_new_tokens."""
    tok = lambda pairs: D.tokenize_pairs(pairs, data.enc, block, cfg.min_prompt_tokens, verbose=verbose)
    data.train, data.val = tok(data.task.pairs), tok(data.task.val_pairs)[:cfg.eval_pairs]
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


def task_rewards(data, prompts, responses, device="cpu"):
    """The task's exact reward of each (prompt ids, response ids): PPO-GT's score, Best-of-N's pick,
    the truth a reward model is compared with. -> (len(prompts),) float32."""
    return torch.tensor([call_task(data, data.task.reward, data.enc.decode(p), text(data, r))
                         for p, r in zip(prompts, responses)], dtype=torch.float, device=device)
