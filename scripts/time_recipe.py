"""
The default run, timed and checked against its bars: `python train.py` once per seed and precision,
each as its own process from nothing (the reference's SFT included), then a table of wall time,
where the time went (the run's own profile, `time:`) and the four figures with their bars.

  python scripts/time_recipe.py                                  # seeds 1337, 1, 2; this CPU's precision
  python scripts/time_recipe.py --seeds=1337 --dtypes=auto,float32   # bf16 (where the CPU has it) and fp32
  python scripts/time_recipe.py --seeds=1337 -- --method=ppo     # anything after -- goes to train.py
  python scripts/time_recipe.py --runs=runs/timing               # where the runs go (default: a temporary folder)

Bars (DPO and PPO alike): win rate >= 0.80, KL <= 3 nats, valid >= 0.85; DPO also held-out
implicit-reward accuracy >= 0.80. Ends with one JSON line of every figure.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BARS = dict(win_rate=(">=", 0.80), kl=("<=", 3.0), valid_fraction=(">=", 0.85), pref_accuracy=(">=", 0.80))


def passes(name, value, method):
    if name == "pref_accuracy" and method != "dpo":  # PPO's implicit reward is not what it trains
        return True
    op, bar = BARS[name]
    return value >= bar if op == ">=" else value <= bar


def main(argv):
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    opts = dict(a.removeprefix("--").split("=", 1) for a in (argv[:argv.index("--")] if "--" in argv else argv))
    seeds, dtypes = opts.get("seeds", "1337,1,2").split(","), opts.get("dtypes", "auto").split(",")
    runs = opts.get("runs") or tempfile.mkdtemp(prefix="time_recipe-")
    method = next((a.split("=", 1)[1] for a in extra if a.startswith("--method=")), "dpo")
    rows = []
    for dtype in dtypes:
        for seed in seeds:
            out = os.path.join(runs, f"{method}-{dtype}-s{seed}")
            cmd = [sys.executable, "train.py", f"--seed={seed}", f"--dtype={dtype}", f"--out_dir={out}",
                   "--overwrite=True", *extra]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if p.returncode:
                sys.exit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
            with open(os.path.join(out, "metrics.jsonl")) as f:
                final = [json.loads(line) for line in f][-1]
            resolved = next(line for line in p.stdout.splitlines() if '"resolved_dtype"' in line).split('"')[3]
            row = dict(seed=int(seed), dtype=resolved, wall_seconds=wall, seconds=final["seconds"],
                       **{k: final.get(k) for k in BARS})
            row["bars_met"] = all(passes(k, row[k], method) for k in BARS if row[k] is not None)
            rows.append(row)
            prof = " | ".join(f"{k} {v:.0f}s" for k, v in final["seconds"].items())
            print(f"seed {seed} {row['dtype']:<8} {wall:6.1f}s ({prof}) | win {row['win_rate']:.3f} kl {row['kl']:.2f} "
                  f"valid {row['valid_fraction']:.3f} acc {row['pref_accuracy']:.3f} | bars {'met' if row['bars_met'] else 'MISSED'}",
                  flush=True)
    print(json.dumps(dict(method=method, extra=extra, runs=rows)))


if __name__ == "__main__":
    main(sys.argv[1:])
