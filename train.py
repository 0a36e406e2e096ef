"""
DPO from nothing, in one recipe. `main` runs it top-down:

  1. set-up      processes, device, precision, seeds, the output folder (runtime.py)
  2. data        the task: preference pairs, SFT texts, held-out prompts, a reward or a judge (task.py)
  3. model       the policy: from scratch, a checkpoint, GPT-2 weights, or where a run stopped
  4. SFT         the reference, by maximum likelihood on responses; saved as ref.pt, frozen, loaded once
  5. training    the method: DPO on pairs (or Preferred-FT, Unlikelihood, online DPO); RLHF's reward
                 model on the same pairs, then PPO (rlhf.py); Best-of-N trains nothing
  6. evaluation  held-out preferences, then samples of policy and reference scored (evaluate.py)

  python train.py                                   # embedded task, CPU, a few minutes
  python train.py --beta=0.5 --dpo_lr=1e-4          # any setting, as --key=value
  python train.py --help                            # every setting with its meaning
  torchrun --standalone --nproc_per_node=4 train.py --data=hh.jsonl ...   # several GPUs (DDP)
"""
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import config
import data as D
from checkpoint import load_model, restore_state, resume_point, resumed_settings, save_checkpoint, save_state
from dpo import LOSS_TYPES, concatenated_logps, dpo_loss, rejected_after_divergence, response_logps, \
    unlikelihood_loss
from evaluate import call_judge, check_inputs, choose_judge, eval_only, final_eval, held_out_eval, sample, score_pairs
from model import GPT, GPTConfig, ScalarGPT
from ppo import bradley_terry_loss, last_token_scores
from rlhf import train_rl
from runtime import (Guard, clip_and_step, exit_for_signal, lr_at, make_optimizer, on_signal, or_exit, print0, set_lr,
                     setup, start_run, stop_requested)
from task import load_data, text, tokenize

# ------------------------------------------------------------------------------------------------
# every setting: (default, what it does). Override any of them as --key=value.
CONFIG = dict(
    # data
    data=("reviews", "'reviews' (embedded task with a reward, no download) or a .jsonl/.jsonl.gz/.json preference file"),
    tokenizer=("bytes", "'bytes', a tiktoken name such as 'gpt2' (downloaded once), or a local .tiktoken ranks file"),
    task=("", "module:name, a task of your own: name(seed) returns a task.Task (task.py says what it holds)"),
    val_fraction=(0.05, "share of a preference file's prompts held out for evaluation"),
    min_prompt_tokens=(8, "truncation keeps at least this many prompt tokens before it cuts responses"),
    length_group=(50, "steps come from runs of this many steps sorted by length: little padding (0: off; reviews: off)"),
    # model
    init_from=("scratch", "'scratch', 'resume' (out_dir/ckpt.pt), a checkpoint .pt, or a Hugging Face GPT-2 folder"),
    n_layer=(2, "transformer blocks (scratch only)"),
    n_head=(2, "attention heads (scratch only; head size n_embd/n_head: 64 as in GPT-2, the CPU's fastest)"),
    n_embd=(128, "width (scratch only)"),
    block_size=(0, "context length; sequences are cut to fit. 0: 256 new, a loaded model's own; smaller crops it"),
    dropout=(0.0, "dropout in the policy; the reference never uses it"),
    grad_checkpoint=(False, "activation checkpointing: recompute each block in backward (less memory, ~1/3 more compute)"),
    # stage 1: the reference, by maximum likelihood on responses (the task's SFT texts or the chosen ones)
    sft_iters=(800, "SFT steps before DPO (0: init_from already is the reference)"),
    sft_batch_size=(32, "sequences per SFT step, per process"),
    sft_lr=(6e-3, "SFT peak learning rate (warm-up, then cosine decay to 10%)"),
    sft_warmup_iters=(20, "SFT linear warm-up steps"),
    sft_log_interval=(100, "SFT steps between log lines"),
    # stage 2: DPO and the other methods on pairs
    dpo_iters=(150, "DPO optimizer steps"),
    batch_size=(32, "preference pairs per micro-step, per process"),
    grad_accum=(1, "micro-steps per optimizer step, summed over all processes"),
    dpo_lr=(1.5e-4, "DPO learning rate after warm-up (the DPO paper: 1e-6 for large pretrained models)"),
    warmup_iters=(10, "linear warm-up steps; step 0 already gets lr/warmup_iters, never 0"),
    optimizer=("adamw", "'adamw' or 'rmsprop' (the DPO paper's)"),
    weight_decay=(0.0, "AdamW weight decay on matrices"),
    grad_clip=(1.0, "clip the gradient norm to this (0: off)"),
    diverge=(100.0, "stop when a loss passes this x max(first loss, 1) or the weights' norm doubles in a step (0: off)"),
    method=("dpo", "'dpo'; baselines 'preferred_ft', 'unlikelihood', 'best_of_n'; RLHF: 'reward_model', then 'ppo', "
                   "or critic-free 'grpo', 'rloo'"),
    beta=(1.0, "strength of the KL anchor to the reference: small beta lets the policy move further"),
    loss_type=("sigmoid", f"one of {LOSS_TYPES}"),
    alpha=(0.001, "unlikelihood: weight of the push down on the rejected tokens (0.01 broke half the samples here)"),
    label_smoothing=(0.0, "conservative DPO: assumed share of flipped labels, in [0, 0.5)"),
    reference_free=(False, "take log pi_ref = 0 (no reference model in the loss)"),
    precompute_ref=(False, "score the training set with the reference once, then drop it from memory"),
    online=(False, "online DPO: each step sample two responses per prompt from the current policy and let the judge pick"),
    online_redraws=(10, "online DPO: draws of a batch in which the judge called every pair a tie, before stopping"),
    judge=("", "module:function, judge(prompt, a, b) -> 0 (a wins), 1 or None (tie); or a reward model's ckpt.pt"),
    best_of=(16, "best_of_n: responses sampled from the reference per prompt; the highest-scored (PPO's score) is kept"),
    # RLHF: a Bradley-Terry reward model (--method=reward_model), then policy gradients: PPO with a value model and a
    # per-token KL penalty (--method=ppo), or critic-free with a group of responses per prompt (grpo, rloo)
    reward_model=("", "PPO, GRPO, RLOO, best_of_n: a --method=reward_model run's ckpt.pt as the score ('': the task's reward)"),
    rm_iters=(300, "reward model steps (batch_size pairs each)"),
    rm_lr=(1e-3, "reward model learning rate after warm-up"),
    ppo_iters=(35, "PPO/GRPO/RLOO iterations: sample rollout_batch responses, score them, ppo_epochs passes of updates"),
    rollout_batch=(64, "responses per PPO/GRPO/RLOO iteration, per process (PPO: one per prompt; GRPO/RLOO: group_size)"),
    group_size=(4, "GRPO/RLOO: responses sampled per prompt, whose scores are each other's baseline (>= 2)"),
    kl_penalty=("reward", "GRPO/RLOO: 'reward' subtracts kl_coef * sum_t (log pi - log pi_ref) from each score (the "
                          "RLHF objective); 'loss' adds kl_coef * mean k3 to the loss, as GRPO (ppo.py (5) says how they differ)"),
    ppo_minibatch=(16, "responses per PPO update step (divides rollout_batch)"),
    ppo_epochs=(4, "passes over each rollout batch"),
    ppo_lr=(2e-4, "learning rate of the policy and of PPO's value model after warm-up (grpo, rloo: 1e-4)"),
    kl_coef=(0.5, "PPO/GRPO/RLOO's beta: PPO pays each response token -kl_coef * (log pi - log pi_ref) (grpo, rloo: 0.7)"),
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
    collapse_kl=(0.25, "final KL per response token above which the policy counts as destroyed: exit 1 (0: off)"),
    eval_only=(False, "only evaluate and sample init_from (a checkpoint), no training"),
    prompt=("", "with eval_only: also sample continuations of this prompt"),
    export=("", "with eval_only: also write the policy here as a Hugging Face GPT-2 folder"),
    # system
    out_dir=("out", "where ref.pt, sft.pt, ckpt.pt, config.json, metrics.jsonl and eval.json go"),
    overwrite=(False, "start a new run in an out_dir that holds another run's files, deleting them"),
    ckpt_interval=(50, "training steps (SFT, DPO, reward model, PPO) between checkpoints (and one at each stage's end)"),
    stop_at=(0, "stop after this training step, with a checkpoint (0: run to the end); continue with init_from=resume"),
    seed=(1337, "seeds the task, the held-out split, the reference (SFT) and its samples"),
    policy_seed=(-1, "seeds what follows the reference: batches, dropout, sampling (-1: --seed; compare seeds 1000 apart)"),
    device=("auto", "'auto' (cuda, then mps, then cpu), or e.g. 'cpu', 'cuda:1'"),
    dtype=("auto", "'float32' or 'bfloat16' autocast; auto: bfloat16 where the hardware has it"),
    compile=(False, "torch.compile the policy"),
    threads=(0, "CPU threads for torch (0: torch's default)"),
)
DEFAULTS = {k: v for k, (v, _) in CONFIG.items()}
# the defaults that differ by method (a setting given on the command line wins): GRPO and RLOO give
# every token of a response the same advantage, so the same learning rate moves them further than PPO
METHOD_DEFAULTS = dict(grpo=dict(ppo_lr=1e-4, kl_coef=0.7), rloo=dict(ppo_lr=1e-4, kl_coef=0.7))


def parse_config(argv):
    """--key=value arguments -> the settings, as attributes (cfg.beta); a resumed run's own settings
    fill what is not given. Stops with a message that names the setting on anything it cannot use."""
    cfg, given = config.parse(argv, CONFIG, __doc__)
    if cfg["init_from"] == "resume":
        resumed_settings(cfg, given, DEFAULTS)
    else:
        cfg.update({k: v for k, v in METHOD_DEFAULTS.get(cfg["method"], {}).items() if k not in given})
    return config.check_settings(cfg, METHODS)


# ------------------------------------------------------------------------------------------------
# the policy and the reference

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


def ref_path(cfg):
    """ref.pt: in out_dir, or (--eval_only) beside the checkpoint evaluated."""
    return os.path.join(os.path.dirname(os.path.abspath(cfg.init_from)) if cfg.eval_only else cfg.out_dir, "ref.pt")


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
# 4. SFT: the reference, by maximum likelihood on responses given their prompts

def sft(cfg, run, policy, data, resumed):
    """Train `policy` in place on the task's SFT texts: negative log-likelihood per response token
    (every token of the corpus weighs the same, whatever its batch). Checkpoints go to sft.pt;
    `resumed` (sft.pt's content) continues exactly where it stopped."""
    seqs = D.tokenize_sft(data.task.sft, data.enc, policy.config.block_size, cfg.min_prompt_tokens, verbose=run.master)
    if len(seqs) < cfg.sft_batch_size * run.world:
        sys.exit(f"{cfg.data}: {len(seqs)} SFT sequences fit block_size {policy.config.block_size}: too few for one "
                 f"batch of --sft_batch_size={cfg.sft_batch_size} x {run.world} processes")
    lengths = [len(p) + len(r) for p, r in seqs] if data.task.length_grouped else None  # little padding
    loader = D.Batches(seqs, cfg.sft_batch_size, cfg.seed, run.rank, run.world, lengths, cfg.length_group)
    # the loss divides by a batch's expected response tokens, not its own: in a batch of short responses each
    # token would otherwise weigh more, and length-grouped batches would teach shorter responses
    per_batch = cfg.sft_batch_size * sum(len(r) for _, r in seqs) / len(seqs)
    model = DDP(policy) if run.ddp else policy
    optimizer = make_optimizer(cfg, policy, cfg.sft_lr)
    step, last = 0, "none: SFT starts again from its beginning"
    if resumed is not None:
        step, state = restore_state(policy, optimizer, resumed, run.rank)
        loader.load_state_dict(state["sft"])
        last = f"{cfg.out_dir}/sft.pt (sft step {step})"
    guard = Guard(cfg, run, "sft", [policy], last, None if resumed is None else resumed["first_loss"])
    policy.train()
    while step < cfg.sft_iters:
        lr = lr_at(step, cfg.sft_lr, cfg.sft_warmup_iters, cfg.sft_iters, cosine=True)
        set_lr([optimizer], lr)
        ids, mask = (x.to(run.device) for x in D.collate_sft(loader.next(), data.eot))
        with run.ctx:
            logps, n = response_logps(model, ids, mask)
            loss = -logps.sum() / per_batch
        loss.backward()
        guard.before_step(step + 1, loss)
        guard.after_step(step + 1, clip_and_step(policy.parameters(), optimizer, cfg.grad_clip))
        step += 1
        if (step - 1) % cfg.sft_log_interval == 0 or step == cfg.sft_iters:
            nll = (-logps.sum() / n.sum()).item()  # per response token of this batch
            print0(f"sft {step}/{cfg.sft_iters} | nll/token {nll:.4f} | lr {lr:.2e} | {time.time() - run.t_start:.0f}s")
            run.log(dict(stage="sft", step=step, nll=nll, lr=lr, elapsed=time.time() - run.t_start))
        stop = stop_requested(run)
        if (step % cfg.ckpt_interval == 0 and step < cfg.sft_iters) or stop:  # at the end, ref.pt instead
            guard.last_ckpt = save_state(cfg, run, data.inputs, "sft", policy, optimizer, step,
                                         dict(sft=loader.state_dict()), first_loss=guard.first_loss)
            if stop:
                exit_for_signal(run, "sft", step)


def make_reference(cfg, run, data, policy, resumed):
    """Step 4: SFT `policy` into the reference and save it as ref.pt, unless the run is past that.
    -> the training checkpoint to continue from, or None: training starts at step 1."""
    if resumed is None or resumed["stage"] == "sft":
        if cfg.sft_iters > 0:
            sft(cfg, run, policy, data, resumed)
        if run.master:
            run.ref_sha256 = or_exit(save_checkpoint, ref_path(cfg), policy, stage="ref", config=dict(vars(cfg)),
                                     inputs=data.inputs, world=run.world, log_bytes=run.log_bytes())
            if os.path.exists(os.path.join(cfg.out_dir, "sft.pt")):
                os.remove(os.path.join(cfg.out_dir, "sft.pt"))  # SFT's state, done with
        if run.ddp:
            dist.barrier()  # the other ranks load it next
        resumed = None
    elif resumed["stage"] == "ref":  # stopped before training's first checkpoint: nothing past SFT to restore
        resumed = None
    if resumed is None:  # what follows the reference starts from its own seed
        torch.manual_seed(cfg.policy_seed + run.rank)
    return resumed


# ------------------------------------------------------------------------------------------------
# 5. training on pairs: DPO, its baselines, online DPO, and RLHF's reward model

class PairScores(NamedTuple):
    """A micro-batch's scores under the model trained: summed log-probs of the chosen and rejected
    responses (a reward model: its scores), their token counts, and for Unlikelihood the log-probs of
    the rejected tokens it pushes down."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    n_chosen: torch.Tensor = None
    n_rejected: torch.Tensor = None
    pushed_down: torch.Tensor = None


def dpo_objective(cfg, pol, ref, accum):
    """The DPO family (dpo.dpo_loss), summed over pairs and divided by the pairs a full step holds,
    so that online steps with fewer pairs (ties dropped) move the weights less, not each pair more.
    -> (loss to backpropagate, the loss to log, chosen and rejected implicit rewards (B,))."""
    losses, rw, rl = dpo_loss(pol.chosen, pol.rejected, *(ref or (None, None)), cfg.beta, cfg.loss_type,
                              cfg.label_smoothing, pol.n_chosen, pol.n_rejected)
    return losses.sum() / (cfg.batch_size * accum), losses.detach().mean(), rw, rl


def likelihood_objective(cfg, pol, ref, accum):
    """Preferred-FT: mean negative log-likelihood per token of the chosen responses; Unlikelihood adds
    alpha times the rejected tokens' mean -log(1 - p) (dpo.unlikelihood_loss). Implicit rewards are
    logged as for DPO, though nothing here pushes them."""
    if (cfg.method == "unlikelihood") != (pol.pushed_down is not None):
        raise ValueError("the unlikelihood objective needs the pushed-down tokens' log-probs (and only it)")
    if pol.pushed_down is None:
        nll = -pol.chosen.sum() / pol.n_chosen.sum()
    else:
        nll = unlikelihood_loss(pol.chosen, pol.n_chosen, pol.pushed_down, cfg.alpha)[0]
    ref_c, ref_r = ref or (torch.zeros_like(pol.chosen), torch.zeros_like(pol.rejected))
    rw, rl = cfg.beta * (pol.chosen - ref_c).detach(), cfg.beta * (pol.rejected - ref_r).detach()
    return nll / accum, nll.detach(), rw, rl


def reward_model_objective(cfg, pol, ref, accum):
    """RLHF's reward model: Bradley-Terry on its scores, -log sigmoid(r_w - r_l), summed over pairs and
    divided by the pairs of a step; its 'rewards' are the scores themselves."""
    losses = bradley_terry_loss(pol.chosen, pol.rejected)[0]
    return losses.sum() / (cfg.batch_size * accum), losses.detach().mean(), pol.chosen.detach(), pol.rejected.detach()


OBJECTIVES = dict(dpo=dpo_objective, preferred_ft=likelihood_objective, unlikelihood=likelihood_objective,
                  reward_model=reward_model_objective)


def score_batch(cfg, model, ids, mask):
    """PairScores of a collated batch (rows [0, B) chosen, [B, 2B) rejected) under the model trained."""
    B = ids.shape[0] // 2
    if cfg.method == "reward_model":  # the scalar head at each sequence's last token
        r = last_token_scores(model, ids, mask)
        return PairScores(r[:B], r[B:])
    ul = cfg.method == "unlikelihood"
    out = [x.float() for x in concatenated_logps(model, ids, mask, with_tokens=ul)]
    return PairScores(*out[:4], pushed_down=out[4][rejected_after_divergence(ids, mask)] if ul else None)


def online_batch(cfg, run, data, policy, prompts, counts, seed):
    """Online DPO's pairs: two fresh samples per prompt from the current policy, the judge's pick
    first; ties are dropped. `seed` = (seed, step, micro-step, rank) seeds the sampling, so a
    resumed run draws exactly what an uninterrupted one would have."""
    for attempt in range(cfg.online_redraws):  # an all-tie batch is drawn again: every rank needs pairs
        both = sample(cfg, run, policy, prompts + prompts, hash((*seed, attempt)) % 2**31, data.eot, cfg.temperature,
                      cfg.top_k)
        batch = []
        for p, ra, rb in zip(prompts, both[:len(prompts)], both[len(prompts):]):
            w = call_judge(data, data.enc.decode(p), text(data, ra), text(data, rb))
            if w is None or ra == rb:
                counts["ties"] += 1
            else:
                batch.append((p, ra, rb) if w == 0 else (p, rb, ra))
        counts["pairs"] += len(batch)
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
    return [data.train[i] for i in idx], None if data.train_ref is None else (data.train_ref[0][idx], data.train_ref[1][idx])


def pairs_step(cfg, run, data, wrapped, model, reference, src, step):
    """The gradients of one optimizer step: `run.accum` micro-batches, forward and backward each,
    through `wrapped` (the model itself, or its DDP / compiled wrapper).
    -> (statistics averaged over micro-steps, pairs and token positions seen, over all processes)."""
    stats, pairs, tokens = {}, 0, 0
    for micro in range(run.accum):
        examples, ref = next_batch(cfg, run, data, model, src, step, micro)
        ids, mask = (x.to(run.device) for x in D.collate(examples, data.eot))
        if ref is None and reference is not None:  # the live reference, in the policy's precision
            with torch.no_grad(), run.ctx:
                ref = [x.float() for x in concatenated_logps(reference, ids, mask)[:2]]
        last = not run.ddp or micro == run.accum - 1
        with nullcontext() if last else wrapped.no_sync():  # DDP all-reduces on the last micro-step only
            with run.ctx:
                pol = score_batch(cfg, wrapped, ids, mask)
                loss, shown, rw, rl = OBJECTIVES[cfg.method](cfg, pol, ref, run.accum)
            loss.backward()
        micro_stats = {"loss": shown, "rewards/chosen": rw.mean(), "rewards/rejected": rl.mean(),
                       "rewards/accuracies": (rw > rl).float().mean(), "logps/chosen": pol.chosen.detach().mean(),
                       "logps/rejected": pol.rejected.detach().mean()}
        stats = {k: stats.get(k, 0) + v / run.accum for k, v in micro_stats.items()}
        pairs, tokens = pairs + len(examples) * run.world, tokens + mask.numel() * run.world
    return stats, pairs, tokens


def pair_sources(cfg, run, data, resumed):
    """Where a pairs stage's batches come from: the training pairs (length-grouped for a file's),
    and with --online the prompts it samples pairs for, with their pair and tie counts."""
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in data.train] if data.task.length_grouped else None
    src = SimpleNamespace(online=dict(pairs=0, ties=0), prompts=None, pairs=D.Batches(
        list(range(len(data.train))), cfg.batch_size, cfg.policy_seed, run.rank, run.world, lengths, cfg.length_group,
        step_items=cfg.batch_size * cfg.grad_accum))  # one optimizer step's pairs
    if cfg.online:  # prompts keep their end and leave room to sample
        prompts = sorted({tuple(p[-data.room:]) for p, _, _ in data.train})
        src.prompts = D.Batches(prompts, cfg.batch_size, cfg.policy_seed, run.rank, run.world)
    if resumed is not None:
        src.pairs.load_state_dict(resumed["data"]["pairs"])
        if cfg.online:
            src.prompts.load_state_dict(resumed["data"]["prompts"])
            src.online = resumed["data"]["online_stats"]
    return src


def log_pairs_step(cfg, run, stage, step, iters, stats, gnorm, lr, rate, eta):
    """One log line and metrics record of a pairs stage; `rate` = (pairs, tokens, seconds) since the last."""
    stats = {k: v.item() for k, v in stats.items()}
    rec = dict(stage=stage, step=step, **stats, **{"rewards/margins": stats["rewards/chosen"] - stats["rewards/rejected"]},
               grad_norm=gnorm.item(), lr=lr, pairs_per_s=rate[0] / rate[2], tokens_per_s=rate[1] / rate[2],
               elapsed=time.time() - run.t_start)
    logps = f" | logps {stats['logps/chosen']:.1f}/{stats['logps/rejected']:.1f}" if stage != "rm" else ""
    if stage == "rm":  # its rewards are the scalar head's scores; it has no log-probs
        del rec["logps/chosen"], rec["logps/rejected"]
    print0(f"{stage} {step}/{iters} | loss {rec['loss']:.4f} | r/chosen {rec['rewards/chosen']:+.3f} r/rejected "
           f"{rec['rewards/rejected']:+.3f} margin {rec['rewards/margins']:+.3f} acc {rec['rewards/accuracies']:.2f}{logps} "
           f"| gnorm {rec['grad_norm']:.2f} | lr {lr:.1e} | {rec['pairs_per_s']:.0f} pairs/s {rec['tokens_per_s']:.0f} tok/s "
           f"| {rec['elapsed']:.0f}s, eta {eta:.0f}s")
    return rec


def train_on_pairs(cfg, run, data, model, reference, val_ref, resumed):
    """The loop of every method that learns from preference pairs: batches (offline, or sampled and
    judged online), the method's objective (against the reference: live, or precomputed in
    data.train_ref), held-out evaluations and checkpoints; it continues from `resumed` (ckpt.pt's
    content). `model` is the policy, or RLHF's reward model (a ScalarGPT). -> (model, the last step taken)."""
    stage, iters, peak_lr = ("rm", cfg.rm_iters, cfg.rm_lr) if cfg.method == "reward_model" else ("dpo", cfg.dpo_iters, cfg.dpo_lr)
    model.train()
    optimizer = make_optimizer(cfg, model, peak_lr)
    src = pair_sources(cfg, run, data, resumed)
    step, last = 0, f"{cfg.out_dir}/ref.pt (the SFT model this stage starts from)"
    if resumed is not None:
        step = restore_state(model, optimizer, resumed, run.rank)[0]
        last = f"{cfg.out_dir}/ckpt.pt ({stage} step {step})"
    guard = Guard(cfg, run, stage, [model], last, None if resumed is None else resumed["first_loss"])
    wrapped = DDP(model) if run.ddp else model  # what the forward passes go through
    wrapped = torch.compile(wrapped) if cfg.compile else wrapped
    last_step = min(iters, cfg.stop_at or iters)
    t_loop, t_log, first_step, seen = time.time(), time.time(), step, [0, 0]  # seen: pairs, tokens since the last log
    while step < last_step:
        lr = lr_at(step, peak_lr, cfg.warmup_iters, iters, cosine=False)
        set_lr([optimizer], lr)
        stats, pairs, tokens = pairs_step(cfg, run, data, wrapped, model, reference, src, step)
        seen = [seen[0] + pairs, seen[1] + tokens]
        guard.before_step(step + 1, stats["loss"])
        gnorm = clip_and_step(model.parameters(), optimizer, cfg.grad_clip)
        guard.after_step(step + 1, gnorm)  # gradients and weights are the same on every rank after the all-reduce
        step += 1
        if step % cfg.log_interval == 0 or step == last_step:
            eta = (time.time() - t_loop) / (step - first_step) * (last_step - step)
            rec = log_pairs_step(cfg, run, stage, step, iters, stats, gnorm, lr, (*seen, time.time() - t_log), eta)
            run.log(rec if not cfg.online else dict(rec, online_pairs=src.online["pairs"], online_ties=src.online["ties"]))
            t_log, seen = time.time(), [0, 0]
        t_aside = time.time()  # evaluation and checkpoints do not count against the training rate
        if run.master and (step % cfg.eval_interval == 0 or step == last_step):
            held_out_eval(cfg, run, data, model, val_ref, step)
        stop = stop_requested(run)
        if step % cfg.ckpt_interval == 0 or step == last_step or stop:
            state = dict(pairs=src.pairs.state_dict())
            if cfg.online:
                state.update(prompts=src.prompts.state_dict(), online_stats=dict(src.online))
            guard.last_ckpt = save_state(cfg, run, data.inputs, stage, model, optimizer, step, state, first_loss=guard.first_loss)
        if stop:
            exit_for_signal(run, stage, step)
        t_log, t_loop = t_log + time.time() - t_aside, t_loop + time.time() - t_aside
    return model, step


def train_reward_model(cfg, run, data, policy, reference, val_ref, resumed):
    """RLHF step 2: a reward model, the SFT model with a scalar head (zero at first), on the pairs."""
    return train_on_pairs(cfg, run, data, ScalarGPT.from_model(policy), None, val_ref, resumed)


def no_training(cfg, run, data, policy, reference, val_ref, resumed):
    """Best-of-N: nothing to train; the evaluation samples the reference N times per prompt."""
    return policy, 0


# method: (its training stage, the setting that counts the stage's steps)
METHODS = dict(dpo=(train_on_pairs, "dpo_iters"), preferred_ft=(train_on_pairs, "dpo_iters"),
               unlikelihood=(train_on_pairs, "dpo_iters"), reward_model=(train_reward_model, "rm_iters"),
               ppo=(train_rl, "ppo_iters"), grpo=(train_rl, "ppo_iters"), rloo=(train_rl, "ppo_iters"),
               best_of_n=(no_training, None))


def precompute_reference(cfg, run, data, reference):
    """--precompute_ref: the reference's log-probs of every training pair, in data.train_ref; the
    reference itself is then dropped (freed for training; loaded again for the final evaluation)."""
    if not cfg.precompute_ref or reference is None:
        return reference
    t0 = time.time()
    data.train_ref = score_pairs(cfg, run, reference, data.train, data.eot)[:2]
    print0(f"precomputed reference log-probs of {len(data.train)} pairs in {time.time() - t0:.1f}s; reference dropped")
    return None


# ------------------------------------------------------------------------------------------------

def main(argv):
    cfg = parse_config(argv)
    with setup(cfg) as run:                                       # 1. processes, device, precision, out_dir
        data = load_data(cfg, verbose=run.master)                 # 2. the task, and its judge
        choose_judge(cfg, run, data)
        resumed, run.ref_sha256 = resume_point(cfg, run, data.inputs, DEFAULTS)  # None, None for a new run
        policy = build_policy(cfg, run, data.enc, resumed)        # 3. the policy
        tokenize(cfg, data, policy.config.block_size, verbose=run.master)
        check_inputs(cfg, run, data, policy)                      # a reward model, an export folder
        start_run(cfg, run, resumed)                              # every input is good: out_dir's files now
        run.mark("set-up")
        if not cfg.eval_only:
            resumed = make_reference(cfg, run, data, policy, resumed)  # 4. SFT -> ref.pt
            run.mark("sft")
        reference = load_reference(cfg, run, ref_path(cfg))
        val_ref = score_pairs(cfg, run, reference, data.val, data.eot)[:2]
        if cfg.eval_only:
            return eval_only(cfg, run, data, policy, reference, val_ref)
        reference = precompute_reference(cfg, run, data, reference)
        stage, iters = METHODS[cfg.method]                        # 5. training
        model, step = stage(cfg, run, data, policy, reference, val_ref, resumed)
        run.mark("training")
        result = None
        if run.master and step == (getattr(cfg, iters) if iters else 0):  # 6. evaluation, once training is done
            reference = reference or load_reference(cfg, run, ref_path(cfg))
            result = final_eval(cfg, run, data, model, reference, val_ref)
        if run.ddp:
            dist.barrier()
        return result


if __name__ == "__main__":
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        sys.exit("interrupted twice: stopped at once. Every checkpoint is written atomically, so the last one is whole; "
                 "continue with --init_from=resume")
