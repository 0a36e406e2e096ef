"""
The optimal frontier of a Figure 2 sweep (optimum.py's math): N samples per held-out prompt from the
sweep's reference, their exact task rewards, then for each beta of a grid the optimum's reward and KL
with bootstrap intervals, and Best-of-N's exact KL beside its bound. Needs a task with a reward.

  python scripts/frontier_optimum.py runs/frontier                  # runs/frontier/optimum/{samples.npz,optimum.json}
  python scripts/frontier_optimum.py runs/frontier --samples=256     # fewer samples per prompt (faster)

Sampling is the cost: 256 prompts x 512 samples of the default reference took 465 s on a 2-core CPU,
the whole command 7 min 47 s (RESULTS.md); samples.npz (rewards, cut flags) is kept, so a second call
with the same --samples only recomputes the table.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optimum  # noqa: E402
import train  # noqa: E402
from checkpoint import load_model  # noqa: E402
from evaluate import sample  # noqa: E402
from runtime import print0, setup  # noqa: E402
from task import load_data, task_rewards, tokenize  # noqa: E402

BETAS = [round(float(b), 4) for b in np.geomspace(0.1, 100, 31)]  # KL from about 0 to past log N
BEST_OF = (2, 4, 16, 64)


def sample_rewards(runs, n, extra):
    """-> (rewards, cut, no_eos_penalty, seconds): rewards (P, n) float64, the exact rewards of n reference
    samples (temperature 1, no top-k: pi_ref itself) for each held-out prompt, sampled in chunks of 16
    prompts with seeds seed + 3 + chunk; cut (P, n) 1.0 where a sample ended at max_new_tokens without an
    end token (Best-of-N selects on reward - no_eos_penalty x cut, as the best_of_n runs do)."""
    out = os.path.join(runs, "optimum")
    cfg = train.parse_config([f"--out_dir={out}", f"--init_from={runs}/reference/ref.pt", "--sft_iters=0",
                              "--overwrite=True", *extra])
    with setup(cfg) as run:
        pass
    data = load_data(cfg)
    if data.task.reward is None:
        sys.exit(f"--data={cfg.data}: the task has no reward, so there is no exact optimum to estimate")
    reference = load_model(cfg.init_from, run.device).eval()
    tokenize(cfg, data, reference.config.block_size)
    rows, cuts, t0 = [], [], time.time()
    for c in range(0, len(data.eval_ids), 16):
        prompts = [p for p in data.eval_ids[c:c + 16] for _ in range(n)]    # each prompt n times in a row
        outs = sample(cfg, run, reference, prompts, cfg.seed + 3 + c, data.eot, temperature=1.0, top_k=0)
        rows.append(task_rewards(data, prompts, outs).double().view(-1, n).numpy())
        cuts.append(np.array([r[-1] != data.eot for r in outs], dtype=np.float64).reshape(-1, n))
        print0(f"sampled {c + len(prompts) // n}/{len(data.eval_ids)} prompts x {n} | {time.time() - t0:.0f}s")
    return np.concatenate(rows), np.concatenate(cuts), cfg.no_eos_penalty, time.time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="the sweep's folder: its reference/ref.pt is sampled")
    ap.add_argument("--samples", type=int, default=512, help="reference samples per held-out prompt (N)")
    args, extra = ap.parse_known_args(argv)  # the rest: train.py settings, e.g. --threads=2 (the sweep's task's)
    path = os.path.join(args.runs, "optimum", "samples.npz")
    saved = np.load(path) if os.path.isfile(path) else None
    if saved is not None and saved["rewards"].shape[1] == args.samples:
        rewards, cut, penalty, seconds = saved["rewards"], saved["cut"], float(saved["penalty"]), None
    else:
        rewards, cut, penalty, seconds = sample_rewards(args.runs, args.samples, extra)
        np.savez(path, rewards=rewards, cut=cut, penalty=penalty)
    P, N = rewards.shape
    frontier = optimum.optimal_frontier(rewards, BETAS)
    half = optimum.optimal_frontier(rewards[:, :N // 2], BETAS)  # the same at N/2: how far N has converged
    result = dict(prompts=P, samples=N, sample_seconds=seconds, reference_reward=float(rewards.mean()),
                  cut_share=float(cut.mean()), log_n=math.log(N), frontier=frontier, frontier_half=half,
                  best_of=optimum.best_of_n_table(rewards, BEST_OF, scores=rewards - penalty * cut))
    with open(os.path.join(args.runs, "optimum", "optimum.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{P} prompts x {N} reference samples (reward {result['reference_reward']:.3f}, "
          f"{100 * result['cut_share']:.2f}% cut at max_new_tokens)"
          + (f", sampled in {seconds:.0f} s" if seconds else ""))
    print("| beta | KL (nats) | optimum's reward | 95% interval | median ESS | at N/2: KL, reward | trusted |")
    print("|---|---|---|---|---|---|---|")
    for r, h in zip(frontier, half):
        print(f"| {r['beta']:g} | {r['kl']:.2f} | {r['reward']:.2f} | {r['reward_lo']:.2f}-{r['reward_hi']:.2f} | "
              f"{r['ess_median']:.1f} | {h['kl']:.2f}, {h['reward']:.2f} | {'yes' if r['trusted'] else 'no'} |")
    print("\n| Best-of-N | exact KL (± s.e.) | bound log N - (N-1)/N | reward from the samples |\n|---|---|---|---|")
    for b in result["best_of"]:
        print(f"| {b['n']} | {b['kl']:.3f} ± {b['kl_se']:.3f} | {b['bound']:.3f} | {b['reward']:.2f} |")


if __name__ == "__main__":
    main()
