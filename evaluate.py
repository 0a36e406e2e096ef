"""
Evaluation, and the scoring and sampling it shares with training.

  held out pairs   the DPO loss, the implicit-reward accuracy and margin (preference_eval), or a
                   reward model's own accuracy (reward_model_eval)
  held out prompts samples of policy and reference, and what the task or a judge says of them:
                   win rate, mean reward, validity, length, and KL(pi || pi_ref) (sample_eval)
A judge compares two responses to one prompt: judge(prompt, a, b) -> 0 (a is better), 1 (b is
better) or None (a tie). It is the task's reward (the higher wins), a module:function of your own,
or a reward model's checkpoint (choose_judge).
"""
import json
import math
import os
import shutil
import sys
import time

import torch

import data as D
from checkpoint import load_model
from dpo import dpo_loss, response_logps
from model import ScalarGPT
from ppo import CRITIC_FREE, bradley_terry_loss, last_token_scores, predicting
from runtime import atomic_write, or_exit, print0, write_json
from task import call_task, load_object, prompt_ids, task_rewards, text


# ------------------------------------------------------------------------------------------------
# scoring and sampling, shared with training

def by_length(cfg, run, seqs, eot):
    """(prompt_ids, response_ids) sequences in batches of score_batch_size sequences of similar length
    (little padding to compute). -> (order, the batches' (ids, mask) on the device, lazily): sorted row
    k is input sequence order[k]; in_input_order puts rows back."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    size = cfg.score_batch_size
    return order, (tuple(x.to(run.device) for x in D.collate_sft([seqs[j] for j in order[i:i + size]], eot))
                   for i in range(0, len(seqs), size))


def in_input_order(order, rows):
    """Rows in by_length's order -> the same rows in the input order."""
    return torch.empty_like(rows).index_copy_(0, torch.tensor(order, device=rows.device), rows)


@torch.no_grad()
def score(cfg, run, model, seqs, eot):
    """Summed response log-probs and token counts of (prompt_ids, response_ids), in eval mode; a
    reward model's score at the last token instead when `model` is a ScalarGPT (then a list of
    one tensor). Batches hold sequences of similar length (by_length): little padding to compute."""
    was_training, out = model.training, []
    order, batches = by_length(cfg, run, seqs, eot)
    model.eval()
    with run.ctx:
        for ids, mask in batches:
            if isinstance(model, ScalarGPT):
                out.append([last_token_scores(model, ids, mask)])
            else:
                out.append([x.float() for x in response_logps(model, ids, mask)])
    model.train(was_training)
    return [in_input_order(order, x) for x in map(torch.cat, zip(*out))]


@torch.no_grad()
def kl_estimates(cfg, run, policy, reference, seqs, eot):
    """Two estimates of KL(pi || pi_ref)(x) = E_{y~pi(.|x)}[log pi(y|x) - log pi_ref(y|x)], one per
    (prompt, response) of seqs, whose responses must be the policy's own samples (temperature 1):
      sample:   log pi(y|x) - log pi_ref(y|x) = sum_t log pi(y_t|s_t) - log pi_ref(y_t|s_t), s_t = (x, y_<t);
      analytic: sum_t KL(pi(.|s_t) || pi_ref(.|s_t)), the sum over the whole vocabulary at every position.
    Same expectation (the chain rule: the sample term at t averages to the analytic term at t over
    y_t ~ pi(.|s_t)), and no analytic term is negative. It has averaged out each token's own draw,
    which usually lowers the variance (Figure 2's 54 runs: standard errors 1.06x to 4.7x smaller,
    median 2.2x), though not always: the later terms still depend on the earlier draws, and that
    dependence can add variance. -> (sample (B,), analytic (B,)) float64, on the CPU, in the order
    of seqs."""
    out, was = [], (policy.training, reference.training)
    policy.eval(), reference.eval()
    order, batches = by_length(cfg, run, seqs, eot)
    for ids, mask in batches:
        pred = predicting(mask)                                         # (B, T) positions that predict a response token
        with run.ctx:
            logp = torch.log_softmax(policy(ids, select=pred).float(), -1)     # (N, V)
            logq = torch.log_softmax(reference(ids, select=pred).float(), -1)  # (N, V)
        diff = logp - logq
        tokens = ids[:, 1:][mask[:, 1:]]                                 # (N,) the response tokens, row-major
        rows = pred.nonzero()[:, 0]                                      # (N,) the row of each
        per_token = torch.stack([diff.gather(1, tokens[:, None]).squeeze(1), (logp.exp() * diff).sum(-1)], 1)
        out.append(torch.zeros(len(mask), 2, dtype=torch.float64, device=run.device).index_add_(0, rows, per_token.double()))
    policy.train(was[0]), reference.train(was[1])
    kl = in_input_order(order, torch.cat(out)).cpu()
    return kl[:, 0], kl[:, 1]


def mean_se(x):
    """The mean of a float64 tensor and its standard error, std / sqrt(n) (n - 1 in the std; 0 for n = 1)."""
    return x.mean().item(), (x.std().item() / math.sqrt(len(x)) if len(x) > 1 else 0.0)


def score_pairs(cfg, run, model, pairs, eot):
    """-> (chosen logps, rejected logps, chosen lengths, rejected lengths); zeros without a model."""
    if model is None:
        z = torch.zeros(len(pairs), device=run.device)
        return z, z, z, z
    lp, n = score(cfg, run, model, [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], eot)
    B = len(pairs)
    return lp[:B], lp[B:], n[:B], n[B:]


def sample(cfg, run, model, prompts, seed, eot, temperature, top_k):
    """Responses (token lists, ending in eot unless cut at max_new_tokens) to token-id prompts.
    temperature 1 and top_k 0 sample the model's own distribution (PPO, Best-of-N, the KL);
    evaluation passes --temperature and --top_k."""
    was_training, outs = model.training, []
    model.eval()
    g = torch.Generator(device=run.device).manual_seed(seed)
    with run.ctx:
        for i in range(0, len(prompts), cfg.sample_batch_size):
            outs += model.generate(prompts[i:i + cfg.sample_batch_size], cfg.max_new_tokens, temperature,
                                   top_k or None, eot, generator=g)
    model.train(was_training)
    return outs


def load_scorer(cfg, run, data, model):
    """What PPO and Best-of-N maximise: None for the task's exact reward, or the reward model of
    --reward_model (PPO-RM), which must read `model`'s tokens at its block size."""
    scorer = or_exit(load_model, cfg.reward_model, run.device, kind="ScalarGPT").eval() if cfg.reward_model else None
    if scorer is None and data.task.reward is None:
        sys.exit(f"--method={cfg.method} needs a reward: a task with one, or --reward_model=<a --method=reward_model "
                 f"run's ckpt.pt>")
    if scorer is not None and (scorer.config.vocab_size, scorer.config.block_size) != \
            (model.config.vocab_size, model.config.block_size):
        sys.exit(f"--reward_model={cfg.reward_model}: vocabulary and block size {scorer.config.vocab_size}, "
                 f"{scorer.config.block_size} do not match the policy's {model.config.vocab_size}, {model.config.block_size}")
    return scorer


# ------------------------------------------------------------------------------------------------
# judges

def choose_judge(cfg, run, data):
    """data.judge: --judge (module:function, or a reward model's ckpt.pt), else the task's reward."""
    if cfg.judge.endswith(".pt"):
        data.judge, data.judge_name = reward_model_judge(cfg.judge, data.enc, run), cfg.judge
    elif cfg.judge:
        data.judge, data.judge_name = or_exit(load_object, cfg.judge, "judge"), cfg.judge
        if not callable(data.judge):
            sys.exit(f"--judge={cfg.judge}: not callable")
    elif data.task.reward is not None:
        data.judge, data.judge_name = judge_from_reward(data.task.reward), f"{data.task.name}.reward"
    if cfg.online and data.judge is None:
        sys.exit("--online=True needs a judge: a task with a reward, or --judge=module:function")


def judge_from_reward(reward):
    """A judge from a reward function: the higher reward wins, equal rewards tie."""
    def judge(prompt, a, b):
        ra, rb = reward(prompt, a), reward(prompt, b)
        return None if ra == rb else (0 if ra > rb else 1)
    return judge


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
            ra, rb = last_token_scores(rm, ids.to(run.device), mask.to(run.device)).tolist()
        return None if ra == rb else (0 if ra > rb else 1)
    return judge


def call_judge(data, prompt, a, b):
    try:
        verdict = data.judge(prompt, a, b)
    except Exception as e:
        raise SystemExit(f"judge {data.judge_name} raised {type(e).__name__}: {e} (prompt {prompt[:60]!r})") from None
    if verdict not in (0, 1, None):
        raise SystemExit(f"judge {data.judge_name} returned {verdict!r}; it must return 0, 1 or None")
    return verdict


def win_rate(verdicts):
    """Share of judge verdicts won by the policy (verdict 0); a tie (None) counts half."""
    return sum(1.0 if w == 0 else 0.5 if w is None else 0.0 for w in verdicts) / len(verdicts)


# ------------------------------------------------------------------------------------------------
# held-out pairs

def preference_eval(cfg, run, data, policy, val_ref):
    """The loss, implicit-reward accuracy (ties count as wrong) and margin on the held-out pairs."""
    pc, pr, nc, nr = score_pairs(cfg, run, policy, data.val, data.eot)
    losses, rw, rl = dpo_loss(pc, pr, *val_ref, cfg.beta, cfg.loss_type, cfg.label_smoothing, nc, nr)
    return dict(val_loss=losses.mean().item(), pref_accuracy=(rw > rl).float().mean().item(),
                val_margin=(rw - rl).mean().item())


def reward_model_eval(cfg, run, data, rm):
    """A reward model on the held-out pairs: Bradley-Terry loss, accuracy (ties count as wrong) and
    margin; with a task reward also the Pearson correlation of its scores with that reward, over
    every held-out response (chosen and rejected)."""
    rows = [(p, c) for p, c, _ in data.val] + [(p, r) for p, _, r in data.val]
    r, B = score(cfg, run, rm, rows, data.eot)[0], len(data.val)
    losses, accuracy = bradley_terry_loss(r[:B], r[B:])
    res = dict(rm_val_loss=losses.mean().item(), rm_accuracy=accuracy, rm_margin=(r[:B] - r[B:]).mean().item())
    if data.task.reward is not None:
        truth = task_rewards(data, *zip(*rows))
        res["reward_correlation"] = torch.corrcoef(torch.stack([r.cpu(), truth]))[0, 1].item()
    return res


def held_out_eval(cfg, run, data, model, val_ref, step):
    """The evaluation during training, on held-out pairs: a policy's implicit-reward metrics, or a
    reward model's own. Its time is counted apart, within the training's."""
    t0 = time.time()
    if cfg.method == "reward_model":
        rec = reward_model_eval(cfg, run, data, model)
        print0(f"eval {step}: val loss {rec['rm_val_loss']:.4f} | reward model accuracy {rec['rm_accuracy']:.3f} "
               f"| margin {rec['rm_margin']:+.3f}")
    else:
        rec = preference_eval(cfg, run, data, model, val_ref)
        print0(f"eval {step}: val loss {rec['val_loss']:.4f} | implicit-reward accuracy {rec['pref_accuracy']:.3f} "
               f"| margin {rec['val_margin']:+.3f}")
    run.log(dict(stage="eval", step=step, **rec))
    run.add_seconds("held-out evaluations (within training)", time.time() - t0)


# ------------------------------------------------------------------------------------------------
# held-out prompts: samples

@torch.no_grad()
def best_of_n(cfg, run, data, reference):
    """The Best-of-N baseline: best_of responses per held-out prompt sampled from the reference's own
    distribution (temperature 1, the condition of the KL bound), and the highest-scored kept (the
    first of equals) by the score PPO maximises: the task's exact reward (an oracle, as for PPO-GT) or
    the reward model of --reward_model, minus no_eos_penalty for a response cut without an end token.
    No training; it costs N samples per prompt at inference."""
    scorer = load_scorer(cfg, run, data, reference)
    n, prompts = cfg.best_of, [p for p in data.eval_ids for _ in range(cfg.best_of)]  # each prompt n times in a row
    outs = sample(cfg, run, reference, prompts, cfg.policy_seed + 1, data.eot, temperature=1.0, top_k=0)
    if scorer is None:
        scores = task_rewards(data, prompts, outs)
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
    t0, mean, task = time.time(), lambda xs: sum(xs) / len(xs), data.task
    bon = cfg.method == "best_of_n"
    pol = best_of_n(cfg, run, data, reference) if bon else \
        sample(cfg, run, policy, data.eval_ids, cfg.policy_seed + 1, data.eot, cfg.temperature, cfg.top_k)
    res = {"policy_mean_length": mean(list(map(len, pol)))}
    pol_t, ref_t = [text(data, r) for r in pol], None
    if reference is not None:
        ref = sample(cfg, run, reference, data.eval_ids, cfg.seed + 2, data.eot, cfg.temperature, cfg.top_k)
        # KL(pi || pi_ref) = E_{y~pi}[log pi(y) - log pi_ref(y)], estimated on the policy's own samples:
        # an estimate of that KL only when the samples come from pi itself (temperature 1, no top-k)
        if cfg.temperature != 1.0 or cfg.top_k:
            print0("note: kl is measured on tempered/top-k samples, so it is not KL(pi || pi_ref)")
        if bon:
            res["kl_bound"] = math.log(cfg.best_of) - (cfg.best_of - 1) / cfg.best_of
        else:
            sample_kl, analytic_kl = kl_estimates(cfg, run, policy, reference, list(zip(data.eval_ids, pol)), data.eot)
            res["kl"], res["kl_se"] = mean_se(sample_kl)
            res["kl_analytic"], res["kl_analytic_se"] = mean_se(analytic_kl)
        res["reference_mean_length"] = mean(list(map(len, ref)))
        ref_t = [text(data, r) for r in ref]
        if data.judge is not None:
            res["win_rate"] = win_rate([call_judge(data, p, a, b) for p, a, b in zip(data.eval_prompts, pol_t, ref_t)])
    on = lambda fn, texts: mean([call_task(data, fn, p, r) for p, r in zip(data.eval_prompts, texts)])  # its mean
    if task.reward is not None:
        res["policy_reward"] = on(task.reward, pol_t)
        if ref_t:
            res["reference_reward"] = on(task.reward, ref_t)
    if task.is_valid is not None:
        res["valid_fraction"] = on(task.is_valid, pol_t)
        if ref_t:
            res["reference_valid_fraction"] = on(task.is_valid, ref_t)
    for i in range(min(cfg.show_samples, len(pol_t))):
        print0(f"--- prompt: {data.eval_prompts[i]!r}\n    reference: {ref_t[i] if ref_t else '-'!r}\n    policy:    {pol_t[i]!r}")
    res["sample_seconds"] = time.time() - t0
    return res


def evaluate(cfg, run, data, model, reference, val_ref):
    """Both evaluations of a policy: held-out preferences, then samples; a reward model's own."""
    if cfg.method == "reward_model":
        return reward_model_eval(cfg, run, data, model)
    return {**preference_eval(cfg, run, data, model, val_ref), **sample_eval(cfg, run, data, model, reference)}


def collapse(cfg, result):
    """A policy destroyed without a non-finite number or a loss blow-up (the divergence guard's
    cases): its final KL to the reference per response token is above --collapse_kl (0.25 nats).
    Sane runs stay far below: the default run about 0.02, every Figure-2 point under 0.1; with the
    divergence guard off (--diverge=0), --dpo_lr=0.3 ends at 8.5 (KL 1366 nats over 160 tokens).
    -> the reason, or None."""
    if not cfg.collapse_kl or "kl" not in result:
        return None
    per_token = result["kl"] / max(result["policy_mean_length"], 1.0)
    if per_token > cfg.collapse_kl:
        return f"KL {result['kl']:.1f} nats over {result['policy_mean_length']:.0f} tokens: {per_token:.2f} per token > --collapse_kl={cfg.collapse_kl:g}"
    return None


def final_eval(cfg, run, data, model, reference, val_ref):
    """The evaluation at the end of training, written to eval.json and metrics.jsonl. A collapsed
    policy is marked there (collapsed: its reason) and the run exits with 1."""
    result = dict(evaluate(cfg, run, data, model, reference, val_ref), wall_seconds=time.time() - run.t_start)
    why = collapse(cfg, result)
    if why:
        result["collapsed"] = why
    run.mark("evaluation")
    or_exit(write_json, os.path.join(cfg.out_dir, "eval.json"), result)
    run.log(dict(stage="final", **result, seconds=run.seconds))
    print0("final: " + " | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    print0("time: " + " | ".join(f"{k} {v:.1f}s" for k, v in run.seconds.items()))
    if why:
        sys.exit(f"the policy collapsed ({why}): its samples are far from anything the reference would write; "
                 f"lower the learning rate or raise beta (eval.json has the figures)")
    return result


def eval_only(cfg, run, data, policy, reference, val_ref):
    """Evaluate a checkpoint (and sample --prompt three times from each model), no training."""
    policy.eval()
    if cfg.prompt:
        ids = [prompt_ids(data.enc, cfg.prompt, data.room)] * 3
        for who, m in (("reference", reference), ("policy", policy)):
            if m is not None:
                for r in sample(cfg, run, m, ids, cfg.seed, data.eot, cfg.temperature, cfg.top_k):
                    print0(f"{who}: {cfg.prompt!r} -> {text(data, r)!r}")
    res = evaluate(cfg, run, data, policy, reference, val_ref)
    print0(json.dumps(res, indent=1))
    if cfg.export:
        export(cfg, data, policy)
    return res


EXPORTED = ("config.json", "model.safetensors", "TOKENIZER.txt")


def export(cfg, data, policy):
    """--export: the policy as a Hugging Face GPT-2 folder, whole or not at all: written into
    EXPORT.tmp, which then takes the place of EXPORT (an earlier export there is replaced)."""
    path = cfg.export.rstrip("/")
    shutil.rmtree(path + ".tmp", ignore_errors=True)
    try:
        policy.save_pretrained(path + ".tmp")
        tokenizer = (f"tokenizer: {cfg.tokenizer} (tiktoken; 'bytes' is UTF-8 bytes, id 256 = <|endoftext|>); "
                     f"end-of-text id {data.eot}\n")  # HF has no file for tiktoken's encodings
        atomic_write(os.path.join(path + ".tmp", "TOKENIZER.txt"), lambda f: f.write(tokenizer.encode()))
    except OSError as e:
        shutil.rmtree(path + ".tmp", ignore_errors=True)
        sys.exit(f"error: {e}; --export={path} is as it was")
    if os.path.isdir(path):
        os.replace(path, path + ".old")
    os.replace(path + ".tmp", path)
    shutil.rmtree(path + ".old", ignore_errors=True)
    print0(f"exported the policy as a Hugging Face GPT-2 folder: {path}")


def check_inputs(cfg, run, data, policy):
    """What can be checked before any training: the reward model PPO or Best-of-N will use (loaded
    and dropped), and the export folder (its parent can be written; if it exists, it holds an
    earlier export and nothing else, since it will be replaced)."""
    if cfg.method in ("ppo", *CRITIC_FREE, "best_of_n") and not cfg.eval_only:
        with torch.random.fork_rng(devices=[]):  # building it must not move the seeded RNG
            load_scorer(cfg, run, data, policy)
    if cfg.export:
        path, parent = cfg.export.rstrip("/"), os.path.dirname(os.path.abspath(cfg.export.rstrip("/")))
        if os.path.exists(path) and (not os.path.isdir(path) or set(os.listdir(path)) - set(EXPORTED)):
            sys.exit(f"--export={path} exists and is not an earlier export (it would be replaced); choose a new folder")
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            sys.exit(f"--export={path}: cannot write in {parent}")
