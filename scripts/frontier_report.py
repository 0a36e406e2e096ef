"""
The table and the picture of a scripts/frontier.sh sweep: every point's KL, judge reward, win rate,
validity, held-out preference accuracy and wall time, as the mean and spread over its policy seeds.
The picture needs matplotlib (not a requirement of this project: without it, the table only).

  python scripts/frontier_report.py runs/frontier                       # the markdown table
  python scripts/frontier_report.py runs/frontier --png frontier.png    # and the picture
"""
import argparse
import glob
import json
import math
import os

# (folder prefix, label, marker, colour), in the table's order
METHODS = [("reference", "Reference (SFT)", "*", "black"), ("dpo-beta", "DPO", "o", "tab:blue"),
           ("online-beta", "Online DPO", "s", "tab:cyan"), ("ppo_gt-kl", "PPO-GT", "^", "tab:red"),
           ("ppo_rm-kl", "PPO-RM", "v", "tab:orange"), ("unlikelihood-alpha", "Unlikelihood", "D", "tab:purple"),
           ("preferred_ft-lr", "Preferred-FT", "P", "tab:green"), ("best_of-", "Best-of-N (exact reward)", "X", "tab:gray")]
COLUMNS = [("kl", "KL (nats)"), ("policy_reward", "judge reward"), ("win_rate", "win rate vs reference"),
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


def summarise(point):
    """-> {column: (mean, std) or None}; Best-of-N's KL is its bound (kl_bound), which has no spread."""
    out = {}
    for key, _ in COLUMNS:
        field = "kl_bound" if key == "kl" and point["bound"] else key
        xs = [e[field] for e in point["evals"] if field in e]
        out[key] = mean_std(xs) if xs else None
    if all(e.get("val_margin", 0) == 0 for e in point["evals"]):
        out["pref_accuracy"] = None  # the policy is the reference: every implicit reward is 0
    return out


def table(points, rm):
    """The markdown table, one row per point: mean ± spread over its seeds."""
    lines = ["| point | seeds | " + " | ".join(h for _, h in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for p in points:
        s, cells = summarise(p), []
        for key, _ in COLUMNS:
            if s[key] is None:
                cells.append("-")
            elif key == "kl" and p["bound"]:
                cells.append(f"≤ {s[key][0]:.2f} (bound)")
            else:
                digits = 0 if key == "wall_seconds" else 3 if key in ("win_rate", "valid_fraction", "pref_accuracy") else 2
                m, sd = s[key]
                cells.append(f"{m:.{digits}f} ± {sd:.{digits}f}" if len(p["evals"]) > 1 else f"{m:.{digits}f}")
        lines.append(f"| {p['name']} | {len(p['evals'])} | " + " | ".join(cells) + " |")
    if rm:
        lines.append(f"\nreward model (PPO-RM's score): held-out accuracy {rm['rm_accuracy']:.3f}, correlation with "
                     f"the exact reward {rm['reward_correlation']:.3f}, {rm['wall_seconds']:.0f} s")
    return "\n".join(lines)


def plot(points, png):
    """Judge reward against KL (left) and valid share against KL (right), one marker and colour per
    method, error bars one standard deviation over seeds; Best-of-N at its KL bound, hollow."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so no picture ({png}); the table above is complete. "
              f"For the picture: pip install matplotlib")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m, (_, label, marker, colour) in enumerate(METHODS):
        pts = [p for p in points if p["method"] == m]
        if not pts:
            continue
        s = sorted((summarise(p) for p in pts), key=lambda x: x["kl"][0])
        bound = pts[0]["bound"]
        for ax, key in zip(axes, ("policy_reward", "valid_fraction")):
            ax.errorbar([x["kl"][0] for x in s], [x[key][0] for x in s], xerr=[x["kl"][1] for x in s],
                        yerr=[x[key][1] for x in s], marker=marker, color=colour, linestyle="--" if bound else "-",
                        linewidth=0.8, markersize=7, capsize=2, mfc="none" if bound else colour,
                        label=label + (" (KL: upper bound)" if bound else ""))
    axes[0].set(xlabel="KL(policy || reference), nats", ylabel="judge reward (held-out prompts)",
                title="reward against KL")
    axes[1].set(xlabel="KL(policy || reference), nats", ylabel="share of valid samples", title="validity against KL")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    seeds = sorted({len(p["evals"]) for p in points if p["name"] != "reference"})
    fig.suptitle(f"{'/'.join(map(str, seeds))} policy seeds per point; error bars: one standard deviation over them",
                 fontsize=9)
    fig.tight_layout()
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
    print(table(points, rm))
    if args.png:
        plot(points, args.png)


if __name__ == "__main__":
    main()
