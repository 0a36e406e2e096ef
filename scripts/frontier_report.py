"""
The table and the picture of a scripts/frontier.sh sweep: every point's KL (both estimates), judge
reward, win rate, validity, held-out preference accuracy and wall time, as the mean and spread over its
policy seeds; with the sweep's optimum (scripts/frontier_optimum.py: RUNS/optimum/optimum.json) also the
optimum's reward at each point's KL and the share of the possible gain the point reached, and the
optimal frontier drawn as a line. Best-of-N's KL is its exact value from the same reference samples
(its bound beside it); without optimum.json, the bound.
The picture needs matplotlib (not a requirement of this project: without it, the table only).

  python scripts/frontier_report.py runs/frontier                       # the markdown table
  python scripts/frontier_report.py runs/frontier --png frontier.png    # and the picture
"""
import argparse
import glob
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optimum  # noqa: E402

# (folder prefix, label, marker, colour), in the table's order
METHODS = [("reference", "Reference (SFT)", "*", "black"), ("dpo-beta", "DPO", "o", "tab:blue"),
           ("online-beta", "Online DPO", "s", "tab:cyan"), ("ppo_gt-kl", "PPO-GT", "^", "tab:red"),
           ("ppo_rm-kl", "PPO-RM", "v", "tab:orange"), ("grpo-kl", "GRPO", "<", "tab:brown"),
           ("rloo-kl", "RLOO", ">", "tab:pink"), ("unlikelihood-alpha", "Unlikelihood", "D", "tab:purple"),
           ("preferred_ft-lr", "Preferred-FT", "P", "tab:green"), ("best_of-", "Best-of-N (exact reward)", "X", "tab:gray")]
# kl: the figure's KL axis, the analytic per-token estimate where the run has it (evaluate.kl_estimates: the
# same expectation as the sample estimate kl_sample, lower variance); Best-of-N: its exact KL
COLUMNS = [("kl", "KL (nats)"), ("kl_sample", "KL, sample est."), ("policy_reward", "judge reward"),
           ("win_rate", "win rate vs reference"),
           ("valid_fraction", "valid"), ("pref_accuracy", "held-out pref. accuracy"), ("wall_seconds", "wall s")]


def mean_std(xs):
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for one value)."""
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def collect(runs):
    """-> [point], each a dict: name, method (index into METHODS), param (float), evals (one per
    seed: runs/NAME/s*/eval.json, or runs/reference/eval.json), bound (its KL is Best-of-N's
    kl_bound), the reward model's eval apart."""
    points, rm = [], None
    for d in sorted(glob.glob(os.path.join(runs, "*"))):
        name = os.path.basename(d)
        if name == "reward_model" and os.path.isfile(os.path.join(d, "eval.json")):
            with open(os.path.join(d, "eval.json")) as f:
                rm = json.load(f)
            continue
        files = glob.glob(os.path.join(d, "eval.json" if name == "reference" else os.path.join("s*", "eval.json")))
        method = next((i for i, (prefix, *_) in enumerate(METHODS) if name.startswith(prefix)), None)
        try:
            param = float(name[len(METHODS[method][0]):] or 0) if method is not None else None
        except ValueError:
            param = None
        if param is None or not files:  # not a point of the sweep, or none of its runs finished yet
            continue
        evals = []
        for f in sorted(files):
            with open(f) as fh:
                evals.append(json.load(fh))
        points.append(dict(name=name, method=method, param=param, evals=evals, bound="kl_bound" in evals[0]))
    return sorted(points, key=lambda p: (p["method"], p["param"])), rm


def load_optimum(runs):
    """RUNS/optimum/optimum.json (scripts/frontier_optimum.py), or None."""
    path = os.path.join(runs, "optimum", "optimum.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def exact_best_of(point, opt):
    """Best-of-N's exact KL row of optimum.json for this point's N, or None."""
    return next((b for b in opt["best_of"] if b["n"] == int(point["param"])), None) if opt and point["bound"] else None


def summarise(point, opt=None):
    """-> {column: (mean, std) or None}. kl: the analytic estimate where the evals have it, else the
    sample one; Best-of-N's: its exact KL from optimum.json (one number from the reference's samples,
    its spread the standard error over prompts), else its bound (no spread)."""
    out = {}
    kl = "kl_bound" if point["bound"] else "kl_analytic" if "kl_analytic" in point["evals"][0] else "kl"
    for key, _ in COLUMNS:
        field = dict(kl=kl, kl_sample="kl").get(key, key)  # Best-of-N's evals have no sample estimate
        xs = [e[field] for e in point["evals"] if field in e]
        out[key] = mean_std(xs) if xs else None
    exact = exact_best_of(point, opt)
    if exact:
        out["kl"] = (exact["kl"], exact["kl_se"])
    if all(e.get("val_margin", 0) == 0 for e in point["evals"]):
        out["pref_accuracy"] = None  # the policy is the reference: every implicit reward is 0
    return out


def share_of_gain(s, opt):
    """(R*(KL), (R - R_ref) / (R*(KL) - R_ref)) for a summarised point, R_ref the reference's reward on the
    optimum's samples; (None, None) without an optimum or beyond its trusted range."""
    if not opt or s["kl"] is None or s["policy_reward"] is None:
        return None, None
    ref = opt["reference_reward"]
    best = optimum.optimum_reward_at(opt["frontier"], s["kl"][0], ref)
    if best is None or best - ref <= 1e-9:
        return best, None
    return best, (s["policy_reward"][0] - ref) / (best - ref)


def cell(key, m, sd, n):
    digits = 0 if key == "wall_seconds" else 3 if key in ("win_rate", "valid_fraction", "pref_accuracy") else 2
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def table(points, rm, opt=None):
    """The markdown table, one row per point: mean ± spread over its seeds; with an optimum, its reward at
    the point's KL and the share of the possible gain reached."""
    extra = ["optimum at its KL", "share of gain"] if opt else []
    lines = ["| point | seeds | " + " | ".join([h for _, h in COLUMNS] + extra) + " |",
             "|---" * (len(COLUMNS) + 2 + len(extra)) + "|"]
    for p in points:
        s, cells, n = summarise(p, opt), [], len(p["evals"])
        for key, _ in COLUMNS:
            if s[key] is None:
                cells.append("-")
            elif key == "kl" and p["bound"]:
                bound = p["evals"][0]["kl_bound"]
                cells.append(f"{s[key][0]:.2f} ± {s[key][1]:.2f} (exact; bound {bound:.2f})" if exact_best_of(p, opt)
                             else f"≤ {s[key][0]:.2f} (bound)")
            else:
                cells.append(cell(key, *s[key], n))
        if opt:
            best, share = share_of_gain(s, opt) if p["name"] != "reference" else (None, None)
            cells += ["-" if best is None else f"{best:.2f}", "-" if share is None else f"{share:.2f}"]
        lines.append(f"| {p['name']} | {n} | " + " | ".join(cells) + " |")
    if rm:
        lines.append(f"\nreward model (PPO-RM's score): held-out accuracy {rm['rm_accuracy']:.3f}, correlation with "
                     f"the exact reward {rm['reward_correlation']:.3f}, {rm['wall_seconds']:.0f} s")
    if opt:
        lines.append(f"\noptimum: {opt['prompts']} held-out prompts x {opt['samples']} reference samples, reference "
                     f"reward {opt['reference_reward']:.3f}; R*(KL) is '-' past the last trusted point of the frontier")
    return "\n".join(lines)


def plot(points, png, opt=None):
    """Judge reward against KL (left) and valid share against KL (right), one marker and colour per
    method, error bars one standard deviation over seeds (Best-of-N's KL: the standard error over
    prompts of its exact value; hollow at its bound without an optimum). With an optimum, the optimal
    frontier on the left: solid where trusted, dotted past that, its band the 95% bootstrap interval."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so no picture ({png}); the table above is complete. "
              f"For the picture: pip install matplotlib")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4))
    if opt:
        f = opt["frontier"]
        trusted = [r for r in f if r["trusted"]]
        axes[0].fill_between([r["kl"] for r in trusted], [r["reward_lo"] for r in trusted],
                             [r["reward_hi"] for r in trusted], color="black", alpha=0.12, linewidth=0)
        axes[0].plot([r["kl"] for r in trusted], [r["reward"] for r in trusted], color="black", linewidth=1.2,
                     label=f"optimum pi* (from {opt['samples']} reference samples per prompt)")
        past = [r for r in f if r["kl"] >= trusted[-1]["kl"]] if trusted else f
        axes[0].plot([r["kl"] for r in past], [r["reward"] for r in past], color="black", linewidth=1, linestyle=":",
                     label="optimum, not trusted (few effective samples)")
    for m, (_, label, marker, colour) in enumerate(METHODS):
        pts = [p for p in points if p["method"] == m]
        if not pts:
            continue
        s = sorted((summarise(p, opt) for p in pts), key=lambda x: x["kl"][0])
        bound = pts[0]["bound"] and not exact_best_of(pts[0], opt)
        for ax, key in zip(axes, ("policy_reward", "valid_fraction")):
            ax.errorbar([x["kl"][0] for x in s], [x[key][0] for x in s], xerr=[x["kl"][1] for x in s],
                        yerr=[x[key][1] for x in s], marker=marker, color=colour, linestyle="--" if bound else "-",
                        linewidth=0.8, markersize=7, capsize=2, mfc="none" if bound else colour,
                        label=label + (" (KL: upper bound)" if bound else ""))
    axes[0].set(xlabel="KL(policy || reference), nats", ylabel="judge reward (held-out prompts)",
                title="reward against KL")
    axes[1].set(xlabel="KL(policy || reference), nats", ylabel="share of valid samples", title="validity against KL")
    if opt:
        axes[0].set_xlim(-0.1, max(max(summarise(p, opt)["kl"][0] for p in points) * 1.08, 1.0))
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4)  # below both panels: no point hidden
    seeds = sorted({len(p["evals"]) for p in points if p["name"] != "reference"})
    fig.suptitle(f"{'/'.join(map(str, seeds))} policy seeds per point; error bars: one standard deviation over them; "
                 f"KL: the analytic per-token estimate", fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(png, dpi=90)
    print(f"wrote {png}")
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="the sweep's folder (scripts/frontier.sh's runs_dir)")
    ap.add_argument("--png", default="", help="also draw the picture here (needs matplotlib)")
    args = ap.parse_args(argv)
    points, rm = collect(args.runs)
    if not points:
        raise SystemExit(f"{args.runs}: no finished run (no */s*/eval.json or reference/eval.json)")
    opt = load_optimum(args.runs)
    print(table(points, rm, opt))
    if args.png:
        plot(points, args.png, opt)


if __name__ == "__main__":
    main()
