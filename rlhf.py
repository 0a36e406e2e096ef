"""
RLHF's last step: policy gradients against a reward, on ppo.py's math. Three methods share one loop:

  ppo   one response per prompt; a value model (a separate ScalarGPT, from the reward model for PPO-RM or
        from the SFT reference with a zero head for PPO-GT) gives per-token advantages by GAE
  grpo  group_size responses per prompt; each response's advantage is its score's z-score in its group
  rloo  the same groups; the advantage is the score minus the mean of the group's other scores

Each iteration samples rollout_batch responses from the policy itself (temperature 1), scores them
(rollout: the reward, the KL to the reference, the advantages), then takes ppo_epochs passes of clipped
updates over the batch (update). The reward is the task's exact one (PPO-GT) or a reward model's
(--reward_model). GRPO and RLOO build and train no value model: the group is their baseline.
"""
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data as D
import ppo as P
from checkpoint import restore_state, save_state
from evaluate import held_out_eval, load_scorer, sample
from model import ScalarGPT
from runtime import Guard, clip_and_step, exit_for_signal, lr_at, make_optimizer, or_exit, print0, set_lr, stop_requested
from task import task_rewards


def group_size(cfg):
    """Responses sampled per prompt: group_size for GRPO and RLOO, one for PPO."""
    return cfg.group_size if cfg.method in P.CRITIC_FREE else 1


@torch.no_grad()
def rollout(cfg, run, data, policy, reference, value, scorer, prompts, seed, kl_coef):
    """Responses from the policy itself (temperature 1), one per entry of `prompts` (GRPO and RLOO pass
    each prompt group_size times in a row: a group), scored, with everything the update needs: old
    and reference log-probs, advantages; for PPO also values, per-token rewards, GAE advantages
    (whitened) and returns. A response cut at max_new_tokens without an end token is scored as it
    is, minus no_eos_penalty, and its last token is terminal (ppo.py's docstring says why)."""
    t0 = time.time()
    responses = sample(cfg, run, policy, prompts, seed, data.eot, temperature=1.0, top_k=0)
    t1 = time.time()
    ids, mask = (x.to(run.device) for x in D.collate_sft(list(zip(prompts, responses)), data.eot))
    n = mask.sum(1)
    rmask = torch.arange(int(n.max()), device=run.device) < n[:, None]  # (B, R)
    with run.ctx:
        old_logps, _ = P.token_logps(policy, ids, mask, rmask)
        ref_logps, _ = P.token_logps(reference, ids, mask, rmask)
        values = P.token_values(value, ids, mask, rmask).float() if value is not None else None
        if scorer is None:  # the task's exact reward (PPO-GT)
            scores = task_rewards(data, prompts, responses, run.device)
        else:               # the reward model's score at the last token (PPO-RM)
            scores = P.last_token_scores(scorer, ids, mask).float()
    truncated = torch.tensor([r[-1] != data.eot for r in responses], device=run.device)
    scores = scores - cfg.no_eos_penalty * truncated
    if value is not None:   # PPO: the KL as a per-token reward, GAE over the value model's predictions
        rewards, kl = P.per_token_rewards(old_logps, ref_logps, rmask, scores, kl_coef)
        advantages, returns = P.gae(rewards, values, rmask, cfg.gamma, cfg.lam)
        advantages, tied = P.masked_whiten(advantages, rmask), None
    else:                   # GRPO, RLOO: one advantage per response, from its group's scores (ppo.py's (5))
        kl = (old_logps - ref_logps).masked_fill(~rmask, 0)                       # (B, R)
        total = scores - kl_coef * kl.sum(1) if cfg.kl_penalty == "reward" else scores
        groups = total.view(-1, cfg.group_size)                                   # (prompts, G)
        per_response = P.group_advantages(groups, cfg.method).view(-1)            # (B,)
        advantages, returns = per_response[:, None] * rmask, None                 # (B, R), 0 at pads
        tied = (groups.amax(1) == groups.amin(1)).float().mean()
    return SimpleNamespace(ids=ids, mask=mask, rmask=rmask, old_logps=old_logps, ref_logps=ref_logps, values=values,
                           returns=returns, advantages=advantages, scores=scores, kl=kl.sum(1), kl_coef=kl_coef, tied=tied,
                           lengths=n.float(), widths=torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses)]),
                           truncated=truncated.float(), sample_s=t1 - t0, score_s=time.time() - t1)


def update(cfg, run, policy, value, optimizers, ep, generator, guard, step):
    """ppo_epochs passes over the rollout in shuffled minibatches: one clipped policy step each (through
    `policy`, the model or its DDP wrapper), and for PPO one clipped value step, each step checked by
    `guard`. -> the mean of each statistic over all of them."""
    stats, models = [], [m for m in (policy, value) if m is not None]
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(len(ep.ids), generator=generator).split(cfg.ppo_minibatch):
            width = int(ep.widths[mb].max())  # the minibatch's own padding, not the rollout's
            ids, mask, rmask = ep.ids[mb, :width], ep.mask[mb, :width], ep.rmask[mb]
            with run.ctx:
                logps, entropy = P.token_logps(policy, ids, mask, rmask, entropy=True)
            pg_loss, pg = P.policy_loss(logps, ep.old_logps[mb], ep.advantages[mb], rmask, cfg.clip_range)
            rec = dict(policy_loss=pg_loss.detach(), **pg, entropy=P.masked_mean(entropy.detach(), rmask))
            if value is None and cfg.kl_penalty == "loss":  # GRPO's k3 in the loss (ppo.py's (5))
                kl_loss = P.masked_mean(P.k3_kl(logps, ep.ref_logps[mb]), rmask)
                pg_loss = pg_loss + ep.kl_coef * kl_loss
                rec.update(kl_loss=kl_loss.detach())
            pg_loss.backward()
            if value is not None:
                with run.ctx:
                    v = P.token_values(value, ids, mask, rmask)
                v_loss, vs = P.value_loss(v.float(), ep.values[mb], ep.returns[mb], rmask, cfg.clip_range_value)
                v_loss.backward()
                rec.update(value_loss=v_loss.detach(), **vs)
            norms = [clip_and_step(m.parameters(), opt, cfg.grad_clip) for m, opt in zip(models, optimizers)]
            guard.after_step(step, *norms)
            stats.append(dict(rec, **dict(zip(("grad_norm", "value_grad_norm"), norms))))
    means = torch.stack([torch.stack(list(s.values())) for s in stats]).mean(0)  # (statistics,) over minibatch steps
    return dict(zip(stats[0], means.tolist()))


def log_rl(cfg, run, step, rec, ep):
    """One line per log_interval iterations. score: the rollouts' mean reward (no-eos penalty included);
    kl: their mean sum_t log pi/pi_ref; clip: the share of tokens whose ratio was clipped; approx_kl: how
    far the updates moved the policy from the rollouts' (k3); PPO: the value loss and its explained
    variance; GRPO/RLOO: tied, the share of groups whose totals (score, minus the KL with kl_penalty=reward)
    all tie: their advantages are 0, no signal."""
    critic = (f"vf {rec['value_loss']:.4f} | ev {rec['explained_variance']:+.2f}" if "value_loss" in rec
              else f"tied {rec['tied_groups']:.2f}" + (f" | k3 {rec['kl_loss']:.4f}" if "kl_loss" in rec else ""))
    print0(f"{cfg.method} {step}/{cfg.ppo_iters} | score {rec['score']:+.3f} | kl {rec['kl']:.3f} | "
           f"pg {rec['policy_loss']:+.4f} | {critic} | clip {rec['clip_fraction']:.3f} | "
           f"approx_kl {rec['approx_kl']:.4f} | entropy {rec['entropy']:.3f} | len {rec['response_length']:.1f} | "
           f"sample/score/update {ep.sample_s:.1f}/{ep.score_s:.1f}/{rec['update_s']:.1f}s | {rec['elapsed']:.0f}s")
    run.log(rec)


def rollout_record(cfg, run, step, ep, kl_coef, lr):
    """The logged facts of one rollout, averaged over every process: score, kl (so that an adaptive
    kl_coef moves alike on every rank), length, truncated share, GRPO/RLOO's share of tied groups; PPO's
    explained variance (rank 0's own)."""
    tied = ep.tied if ep.tied is not None else torch.zeros(())
    means = torch.stack([ep.scores.mean(), ep.kl.mean(), ep.lengths.mean(), ep.truncated.mean(), tied.to(ep.kl.dtype)])
    if run.ddp:
        dist.all_reduce(means)
        means /= run.world
    score, kl, length, truncated, tied = means.tolist()
    rec = dict(stage=cfg.method, step=step, score=score, kl=kl, kl_coef=kl_coef, response_length=length,
               truncated=truncated, lr=lr)
    if ep.values is not None:
        rec["explained_variance"] = P.explained_variance(ep.values, ep.returns, ep.rmask)
    else:
        rec["tied_groups"] = tied
    return rec


def train_rl(cfg, run, data, policy, reference, val_ref, resumed):
    """The policy-gradient loop of PPO, GRPO and RLOO: rollout, update, log; held-out evaluations and
    checkpoints as in the pairs loop. Continues from `resumed` (ckpt.pt's content). Under torchrun
    (GRPO, RLOO) each process samples its own prompts and the gradients are averaged.
    -> (the policy, the last step taken)."""
    scorer = load_scorer(cfg, run, data, policy)
    value = ScalarGPT.from_model(scorer if scorer is not None else policy) if cfg.method == "ppo" else None
    # dropout stays off: the ratio pi/pi_old must compare one function at two weights
    models = [m.eval() for m in (policy, value) if m is not None]
    optimizers = [make_optimizer(cfg, m, cfg.ppo_lr) for m in models]
    wrapped = DDP(policy) if run.ddp else policy  # the update's forward passes go through it
    G = group_size(cfg)
    prompts = or_exit(D.Batches, sorted({tuple(p[-data.room:]) for p, _, _ in data.train}), cfg.rollout_batch // G,
                      cfg.policy_seed, run.rank, run.world)
    kl_ctl = P.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl else None
    step, last = 0, f"{cfg.out_dir}/ref.pt (the SFT model this stage starts from)"
    if resumed is not None:
        step, state = restore_state(policy, optimizers[0], resumed, run.rank)
        prompts.load_state_dict(state["prompts"])
        if value is not None:
            value.load_state_dict(resumed["value"])
            optimizers[1].load_state_dict(resumed["value_optimizer"])
        if kl_ctl:
            kl_ctl.load_state_dict(resumed["kl_controller"])
        last = f"{cfg.out_dir}/ckpt.pt ({cfg.method} step {step})"
    guard = Guard(cfg, run, cfg.method, models, last)
    last_step = min(cfg.ppo_iters, cfg.stop_at or cfg.ppo_iters)
    while step < last_step:
        lr = lr_at(step, cfg.ppo_lr, cfg.warmup_iters, cfg.ppo_iters, cosine=False)
        set_lr(optimizers, lr)
        kl_coef = kl_ctl.value if kl_ctl else cfg.kl_coef
        batch = [list(p) for p in prompts.next() for _ in range(G)]  # each prompt G times in a row: a group
        seed = hash((cfg.policy_seed, step) + ((run.rank,) if run.rank else ())) % 2**31  # rank 0 as one process
        ep = rollout(cfg, run, data, policy, reference, value, scorer, batch, seed, kl_coef)
        t0 = time.time()
        stats = update(cfg, run, wrapped, value, optimizers, ep, torch.Generator().manual_seed(cfg.policy_seed + step),
                       guard, step + 1)
        step += 1
        rec = rollout_record(cfg, run, step, ep, kl_coef, lr)
        rec.update(stats, sample_s=ep.sample_s, score_s=ep.score_s, update_s=time.time() - t0,
                   elapsed=time.time() - run.t_start)
        if kl_ctl:
            kl_ctl.update(rec["kl"], len(batch) * run.world)
        if step % cfg.log_interval == 0 or step == last_step:
            log_rl(cfg, run, step, rec, ep)
        if run.master and (step % cfg.eval_interval == 0 or step == last_step):
            held_out_eval(cfg, run, data, policy, val_ref, step)
        stop = stop_requested(run)
        if step % cfg.ckpt_interval == 0 or step == last_step or stop:
            extra = dict(value=value.state_dict(), value_optimizer=optimizers[1].state_dict()) if value is not None else {}
            guard.last_ckpt = save_state(cfg, run, data.inputs, cfg.method, policy, optimizers[0], step,
                                         dict(prompts=prompts.state_dict()), **extra,
                                         kl_controller=kl_ctl.state_dict() if kl_ctl else None)
        if stop:
            exit_for_signal(run, cfg.method, step)
    return policy, step
