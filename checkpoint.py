"""
Checkpoints: the file format, and resuming a run exactly where it stopped.

A checkpoint is one torch.save'd dict: the model's weights, shape and kind, whatever the run needs
to continue (optimizer, step, data position, RNG states, settings, input files' checksums), and a
sha256 of all of it. It is written atomically (to NAME.tmp, then renamed: a crash mid-write leaves
the previous file whole), only from finite weights, and read with weights_only=True (tensors and
plain containers: a pickled object is refused, never run), then checked against its digest.

A run's files: sft.pt (during SFT), ref.pt (the frozen reference, once SFT is done), ckpt.pt (the
policy, or the reward model, during training). `--init_from=resume` continues from the newest,
once it is shown to be the same run: the same settings (but MAY_CHANGE), input files, process
count and reference.
"""
import hashlib
import json
import os
import sys
from dataclasses import asdict

import torch
import torch.distributed as dist

from model import GPT, GPTConfig, ScalarGPT
from runtime import atomic_write, or_exit, param_groups, print0

# what a resumed run may change; every other setting must be the one the run was started with
MAY_CHANGE = ("init_from", "dpo_iters", "rm_iters", "ppo_iters", "stop_at", "eval_interval", "ckpt_interval",
              "log_interval", "sft_log_interval", "eval_pairs", "eval_samples", "show_samples", "score_batch_size",
              "sample_batch_size", "device", "threads", "compile", "grad_checkpoint", "overwrite", "prompt", "export",
              "out_dir", "data", "tokenizer")  # data and tokenizer: another path to the same bytes (checked)


# ------------------------------------------------------------------------------------------------
# the file format

def digest(obj):
    """sha256 of a checkpoint's content: every tensor's dtype, shape and bytes and every other value,
    walked in a fixed order. Stored in the file and checked on load, so a flipped byte in the weights,
    the optimizer state or the RNG state is caught (torch.load does not check its zip's CRCs)."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy())  # the raw bytes, no copy
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=repr):  # optimizer state has int keys
                h.update(repr(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(repr(x).encode())
    walk(obj)
    return h.hexdigest()


def finite(t):
    """No NaN or inf in `t`: its min and max in one pass (NaN propagates into both), no bool copy."""
    return not t.is_floating_point() or t.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def save_checkpoint(path, model, **extra):
    """Write `model` (weights, shape, kind) and `extra` state to `path` with the digest of it all.
    Atomic: the bytes go to path.tmp, which replaces `path` only once complete, so a crash mid-write
    leaves the last good file. Non-finite weights are refused, never written. -> the digest."""
    sd = model.state_dict()
    bad = [k for k, v in sd.items() if not finite(v)]
    if bad:
        raise ValueError(f"{path}: not written: non-finite weights in {', '.join(bad[:3])}")
    ck = dict(model=sd, model_args=asdict(model.config), kind=type(model).__name__, **extra)
    ck["sha256"] = digest(ck)
    atomic_write(path, lambda f: torch.save(ck, f))
    return ck["sha256"]


def load_checkpoint(path):
    """A file written by save_checkpoint, verified: read with weights_only (tensors and plain
    containers, never code) and refused unless its content matches the digest written with it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a zip, or a pickled object: never unpickled to find out
        raise ValueError(f"{path}: not a checkpoint of this project (unreadable: {type(e).__name__})") from None
    if not isinstance(ck, dict) or not {"model", "model_args", "sha256"} <= ck.keys():
        raise ValueError(f"{path}: not a checkpoint of this project (no weights, shape or checksum)")
    if digest({k: v for k, v in ck.items() if k != "sha256"}) != ck["sha256"]:
        raise ValueError(f"{path}: corrupted: its content does not match the checksum written with it")
    return ck


def load_model(path, device="cpu", dropout=0.0, kind="GPT"):
    """A model from a checkpoint of this project (a GPT policy, or with kind='ScalarGPT' a reward
    model) or, for a GPT, a Hugging Face GPT-2 folder."""
    if os.path.isdir(path) and kind == "GPT":
        return GPT.from_pretrained(path, dropout=dropout).to(device)
    ck = load_checkpoint(path)
    names = dict(GPT="a language model (policy)", ScalarGPT="a reward model")
    if ck.get("kind", "GPT") != kind:
        raise ValueError(f"{path}: holds {names.get(ck.get('kind'), ck.get('kind'))}, where {names[kind]} is needed")
    try:
        model = (ScalarGPT if kind == "ScalarGPT" else GPT)(GPTConfig(**{**ck["model_args"], "dropout": dropout}))
        model.load_state_dict(ck["model"])
    except (TypeError, RuntimeError, AssertionError) as e:
        raise ValueError(f"{path}: its weights do not fit its model shape ({str(e).splitlines()[0][:120]})") from None
    return model.to(device)


STAGES = ("ref", "sft", "dpo", "rm", "ppo", "grpo", "rloo")  # what a run's checkpoint can hold: the reference, or a stage's state


def check_run_checkpoint(ck, path):
    """A run's checkpoint, checked before anything is restored from it: every field a resume reads,
    of the right type, and weights and optimizer state that fit the shape they claim. The digest
    proves the file is what was written; this catches a file that is whole but wrong inside
    (edited, or from another version). ValueError names the file and the field."""
    def need(field, kind, ok=lambda v: True, want=None):
        if field not in ck:
            raise ValueError(f"{path}: no field '{field}'")
        if not isinstance(ck[field], kind) or not ok(ck[field]):
            raise ValueError(f"{path}: field '{field}' is {str(ck[field])[:60]!r}, {want or 'not a ' + kind.__name__}")
    need("stage", str, lambda s: s in STAGES, f"not one of {STAGES}")
    for field in ("model", "model_args", "config"):
        need(field, dict)
    if ck["stage"] != "ref":
        need("step", int, lambda s: s >= 0, "not a step")
        need("optimizer", dict, lambda o: {"state", "param_groups"} <= o.keys(), "not an optimizer's state")
        need("data", dict)
        need("rng", (list, dict), lambda r: all(isinstance(s, dict) and torch.is_tensor(s.get("torch"))
                                                 for s in (r if isinstance(r, list) else [r])), "not RNG states")
    weights = [("model", ScalarGPT if ck.get("kind") == "ScalarGPT" else GPT, "optimizer")]
    if ck["stage"] == "ppo":
        need("value", dict)
        weights.append(("value", ScalarGPT, "value_optimizer"))
    for field, kind, opt in weights:
        try:
            with torch.random.fork_rng(devices=[]):  # building a model must not move the seeded RNG
                model = kind(GPTConfig(**ck["model_args"]))
            model.load_state_dict(ck[field])
        except (TypeError, RuntimeError, AssertionError, ValueError) as e:
            raise ValueError(f"{path}: field '{field}': its weights do not fit 'model_args' ({str(e).splitlines()[0][:100]})") from None
        if ck["stage"] != "ref":
            params = [p for g in param_groups(model, 0.0) for p in g["params"]]
            check_optimizer_state(ck[opt], params, f"{path}: field '{opt}'")


def check_optimizer_state(state, params, where):
    """An optimizer's saved state fits these parameters: as many, and each state tensor of its shape."""
    ids = [i for g in state.get("param_groups", []) for i in g.get("params", [])]
    if len(ids) != len(params):
        raise ValueError(f"{where}: holds state for {len(ids)} parameters, the model has {len(params)}")
    for i, p in zip(ids, params):
        for name, v in state.get("state", {}).get(i, {}).items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                raise ValueError(f"{where}: '{name}' of parameter {i} has shape {tuple(v.shape)}, its weight {tuple(p.shape)}")


# ------------------------------------------------------------------------------------------------
# a run's checkpoints: save, find where it stopped, restore

def save_state(cfg, run, inputs, stage, model, optimizer, step, data_state, **extra):
    """ckpt.pt (sft.pt during SFT): weights, optimizer, step, data position and RNG, everything a run
    needs to continue, and what it must continue with: settings, input files, processes, reference.
    -> the label a divergence stop names ("out/ckpt.pt (dpo step 50)")."""
    path = os.path.join(cfg.out_dir, "sft.pt" if stage == "sft" else "ckpt.pt")
    rng = [dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if run.dev_type == "cuda" else [])]
    if run.ddp:  # each rank draws its own dropout masks: every rank's RNG state is saved, by rank
        rng = [None] * run.world
        dist.all_gather_object(rng, dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all()
                                         if run.dev_type == "cuda" else []))
    if run.master:  # every rank holds the same weights; one writes, every rank knows what was written
        or_exit(save_checkpoint, path, model, stage=stage, optimizer=optimizer.state_dict(), step=step, data=data_state,
                rng=rng, config=dict(vars(cfg)), inputs=inputs, world=run.world, reference=run.ref_sha256,
                log_bytes=run.log_bytes(), **extra)
    return f"{path} ({stage} step {step})"


def restore_state(model, optimizer, ck, rank=0):
    """The inverse of save_state: loads weights, optimizer and this rank's RNG. -> (step, data state)."""
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    rng = ck["rng"][rank] if isinstance(ck["rng"], list) else ck["rng"]  # a dict: one process, before 2026-12
    torch.set_rng_state(rng["torch"])  # dropout masks
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return ck["step"], ck["data"]


def resumed_settings(cfg, given, defaults):
    """--init_from=resume: the run's own settings in place of every default not given on the command
    line, from out_dir/config.json or, if it is missing, from the newest checkpoint. A setting the
    run predates keeps its default, said in one line. `cfg` {key: value} is updated in place."""
    path = os.path.join(cfg["out_dir"], "config.json")
    if os.path.isfile(path):
        saved = read_settings(path)
    else:
        ck_path = newest_checkpoint(cfg["out_dir"])
        if ck_path is None:
            return  # no run there: the out_dir check says so
        saved = or_exit(load_checkpoint, ck_path).get("config", {})
        print0(f"{path} is missing: resuming with the settings stored in {ck_path}")
        path = ck_path
    for k, v in saved.items():
        if k in defaults and not isinstance(v, type(defaults[k])) and not (type(defaults[k]) is float and type(v) is int):
            sys.exit(f"{path}: setting '{k}' is {v!r}, not a {type(defaults[k]).__name__}; fix it, or delete "
                     f"config.json to resume with the settings stored in the checkpoint")
    lacking = [k for k in defaults if k not in saved]
    if lacking and path.endswith(".json"):  # a hand-edited file, or an older one: the checkpoint may know them
        ck_path = newest_checkpoint(cfg["out_dir"])
        stored = (or_exit(load_checkpoint, ck_path).get("config") or {}) if ck_path else {}
        if any(k in stored for k in lacking):
            print0(f"{path} lacks {', '.join(f'--{k}' for k in lacking if k in stored)}: the values stored in {ck_path}")
            saved = {**{k: stored[k] for k in lacking if k in stored}, **saved}
    new = [k for k in defaults if k not in saved]
    if new:
        print0(f"{path} predates {', '.join(f'--{k}' for k in new)}: the run continues with "
               f"{'their defaults' if len(new) > 1 else 'its default'} ({', '.join(f'{k}={cfg[k]!r}' for k in new)})")
    cfg.update({k: v for k, v in saved.items() if k in cfg and k not in given and k not in ("init_from", "stop_at", "overwrite")})


def read_settings(path):
    """A run's config.json: {setting: value}, or exit naming the file and what is wrong with it."""
    try:
        with open(path, "rb") as f:
            saved = json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        sys.exit(f"{path}: not valid JSON ({getattr(e, 'msg', e)}); fix it, or delete it to resume with the settings "
                 f"stored in the checkpoint")
    except OSError as e:
        sys.exit(f"{path}: cannot read it ({e.strerror or e})")
    if not isinstance(saved, dict):
        sys.exit(f"{path}: holds a {type(saved).__name__}, not the run's settings; delete it to resume with the "
                 f"settings stored in the checkpoint")
    return saved


def newest_checkpoint(out_dir):
    """The checkpoint a resumed run continues from: ckpt.pt, else sft.pt, else ref.pt (or None)."""
    return next((os.path.join(out_dir, f) for f in ("ckpt.pt", "sft.pt", "ref.pt")
                 if os.path.isfile(os.path.join(out_dir, f))), None)


def resume_point(cfg, run, inputs, defaults):
    """--init_from=resume: the run's latest checkpoint (ckpt.pt, else sft.pt, else ref.pt: stopped
    before its first training checkpoint), once it is shown to be this run. Stops naming everything
    that differs: settings (but MAY_CHANGE; one the run predates counts as its default), input files,
    processes, reference. Nothing is written here (runtime.start_run). -> (checkpoint or None, the
    reference's checksum or None)."""
    if cfg.init_from != "resume":
        return None, None
    path = newest_checkpoint(cfg.out_dir)
    ck = or_exit(load_checkpoint, path)
    or_exit(check_run_checkpoint, ck, path)
    saved, ref_path, ref_sha = ck.get("config", {}), os.path.join(cfg.out_dir, "ref.pt"), None
    if path == ref_path:
        ref_sha = ck["sha256"]
    elif ck.get("reference"):  # a training checkpoint names the reference it trained against
        ref_sha = or_exit(load_checkpoint, ref_path)["sha256"]
    diff = [f"--{k}={v!r} (the run has {saved.get(k, defaults[k])!r})" for k, v in vars(cfg).items()
            if k not in MAY_CHANGE and saved.get(k, defaults[k]) != v]
    diff += [f"the {k} file's content" for k, v in inputs.items() if ck.get("inputs", {}).get(k) != v]
    diff += [f"{run.world} processes (the run has {ck['world']})"] if ck.get("world", run.world) != run.world else []
    diff += [f"{ref_path}, not the reference the run trained against"] if ck.get("reference") not in (None, ref_sha) else []
    if diff:
        sys.exit(f"--init_from=resume: {path} is another run; what differs: {'; '.join(diff)}. "
                 f"May change on resume: {', '.join(MAY_CHANGE)}")
    setting = dict(dpo="dpo_iters", rm="rm_iters", ppo="ppo_iters", grpo="ppo_iters", rloo="ppo_iters",
                   sft="sft_iters").get(ck["stage"])
    if setting is not None and ck["step"] > getattr(cfg, setting):
        sys.exit(f"--init_from=resume: {path} is at {ck['stage']} step {ck['step']}, past the {getattr(cfg, setting)} "
                 f"asked for: pass a larger --{setting}")
    print0(f"resuming from {path}: " + ("SFT is done; training starts at step 1, no checkpoint of it was written"
                                        if ck["stage"] == "ref" else f"{ck['stage']} step {ck['step']}"))
    return ck, ref_sha
