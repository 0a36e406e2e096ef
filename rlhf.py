"""
RLHF's last step: PPO against a reward, on ppo.py's math.

Each iteration samples one response per prompt from the policy itself (temperature 1), scores it
(rollout: the reward, the per-token KL penalty, values, GAE advantages), then takes ppo_epochs
passes of clipped policy and value updates over the batch (ppo_update). The reward is the task's
exact one (PPO-GT) or a reward model's (PPO-RM, --reward_model). The value model is a separate
ScalarGPT, initialised from the reward model (PPO-RM) or from the SFT reference with a zero head
(PPO-GT): the policy stays a plain GPT, and the value loss never pulls on the policy's features.
"""
import time
from types import SimpleNamespace

import torch

import data as D
import ppo as P
from checkpoint import restore_state, save_state
from evaluate import held_out_eval, load_scorer, sample
from model import ScalarGPT
from runtime import Guard, clip_and_step, exit_for_signal, lr_at, make_optimizer, or_exit, print0, set_lr, stop_requested
from task import task_rewards


@torch.no_grad()
def rollout(cfg, run, data, policy, reference, value, scorer, prompts, seed, kl_coef):
    """One response per prompt from the policy itself (temperature 1), scored, with everything PPO's
    update needs: old log-probs, values, per-token rewards, GAE advantages (whitened) and returns.
    A response cut at max_new_tokens without an end token is scored as it is, minus no_eos_penalty,
    and its last token is terminal (ppo.py's docstring says why)."""
    t0 = time.time()
    responses = sample(cfg, run, policy, prompts, seed, data.eot, temperature=1.0, top_k=0)
    t1 = time.time()
    ids, mask = (x.to(run.device) for x in D.collate_sft(list(zip(prompts, responses)), data.eot))
    n = mask.sum(1)
    rmask = torch.arange(int(n.max()), device=run.device) < n[:, None]  # (B, R)
    with run.ctx:
        old_logps, _ = P.token_logps(policy, ids, mask, rmask)
        ref_logps, _ = P.token_logps(reference, ids, mask, rmask)
        values = P.token_values(value, ids, mask, rmask).float()
        if scorer is None:  # PPO-GT: the task's exact reward
            scores = task_rewards(data, prompts, responses, run.device)
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
            stats.append(dict(policy_loss=pg_loss.detach(), value_loss=v_loss.detach(), **pg,
                              entropy=P.masked_mean(entropy.detach(), rmask), **vs, grad_norm=norms[0],
                              value_grad_norm=norms[1]))
    means = torch.stack([torch.stack(list(s.values())) for s in stats]).mean(0)  # (statistics,) over minibatch steps
    return dict(zip(stats[0], means.tolist()))


def log_ppo(cfg, run, step, rec, ep):
    print0(f"ppo {step}/{cfg.ppo_iters} | score {rec['score']:+.3f} | kl {rec['kl']:.3f} | "
           f"pg {rec['policy_loss']:+.4f} vf {rec['value_loss']:.4f} | clip {rec['clip_fraction']:.3f} | "
           f"approx_kl {rec['approx_kl']:.4f} | entropy {rec['entropy']:.3f} | len {rec['response_length']:.1f} | "
           f"ev {rec['explained_variance']:+.2f} | sample/score/update {ep.sample_s:.1f}/{ep.score_s:.1f}/"
           f"{rec['update_s']:.1f}s | {rec['elapsed']:.0f}s")
    run.log(rec)


def train_ppo(cfg, run, data, policy, reference, val_ref, resumed):
    """The PPO loop: rollout, update, log; held-out evaluations and checkpoints as in the pairs loop.
    Continues from `resumed` (ckpt.pt's content). -> (the policy, the last step taken)."""
    scorer = load_scorer(cfg, run, data, policy)
    value = ScalarGPT.from_model(scorer if scorer is not None else policy)
    # dropout stays off in both models: the ratio pi/pi_old must compare one function at two weights
    policy.eval(), value.eval()
    optimizers = [make_optimizer(cfg, m, cfg.ppo_lr) for m in (policy, value)]
    prompts = or_exit(D.Batches, sorted({tuple(p[-data.room:]) for p, _, _ in data.train}), cfg.rollout_batch, cfg.policy_seed)
    kl_ctl = P.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl else None
    step, last = 0, f"{cfg.out_dir}/ref.pt (the SFT model this stage starts from)"
    if resumed is not None:
        step, state = restore_state(policy, optimizers[0], resumed, run.rank)
        prompts.load_state_dict(state["prompts"])
        value.load_state_dict(resumed["value"])
        optimizers[1].load_state_dict(resumed["value_optimizer"])
        if kl_ctl:
            kl_ctl.load_state_dict(resumed["kl_controller"])
        last = f"{cfg.out_dir}/ckpt.pt (ppo step {step})"
    guard = Guard(cfg, run, "ppo", [policy, value], last)
    last_step = min(cfg.ppo_iters, cfg.stop_at or cfg.ppo_iters)
    while step < last_step:
        lr = lr_at(step, cfg.ppo_lr, cfg.warmup_iters, cfg.ppo_iters, cosine=False)
        set_lr(optimizers, lr)
        kl_coef = kl_ctl.value if kl_ctl else cfg.kl_coef
        batch = [list(p) for p in prompts.next()]
        ep = rollout(cfg, run, data, policy, reference, value, scorer, batch, hash((cfg.policy_seed, step)) % 2**31, kl_coef)
        t0 = time.time()
        stats = ppo_update(cfg, run, policy, value, optimizers, ep, torch.Generator().manual_seed(cfg.policy_seed + step),
                           guard, step + 1)
        step += 1
        rec = dict(stage="ppo", step=step, score=ep.scores.mean().item(), kl=ep.kl.mean().item(), kl_coef=kl_coef,
                   **stats, response_length=ep.lengths.mean().item(), truncated=ep.truncated.mean().item(),
                   explained_variance=P.explained_variance(ep.values, ep.returns, ep.rmask), lr=lr,
                   sample_s=ep.sample_s, score_s=ep.score_s, update_s=time.time() - t0, elapsed=time.time() - run.t_start)
        if kl_ctl:
            kl_ctl.update(rec["kl"], len(batch))
        if step % cfg.log_interval == 0 or step == last_step:
            log_ppo(cfg, run, step, rec, ep)
        if step % cfg.eval_interval == 0 or step == last_step:
            held_out_eval(cfg, run, data, policy, val_ref, step)
        stop = stop_requested(run)
        if step % cfg.ckpt_interval == 0 or step == last_step or stop:
            guard.last_ckpt = save_state(cfg, run, data.inputs, "ppo", policy, optimizers[0], step,
                                         dict(prompts=prompts.state_dict()), value=value.state_dict(),
                                         value_optimizer=optimizers[1].state_dict(),
                                         kl_controller=kl_ctl.state_dict() if kl_ctl else None)
        if stop:
            exit_for_signal(run, "ppo", step)
    return policy, step
