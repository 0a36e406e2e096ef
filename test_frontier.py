"""
Tests of the scripts: frontier.sh and frontier_report.py, the DPO paper's Figure 2 (the report's
means, spreads and bounds, and a toy-size dry run of the whole sweep); time_recipe.py, the default
run timed and checked against its bars.
"""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import torch

from conftest import HERE, TINY, read_metrics


def write_eval(path, **figures):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(figures, f)


def test_frontier_report_means_spreads_and_bounds(tmp_path, capsys, monkeypatch):
    """Two seeds of dpo-beta1 with sample KL 1 and 3, analytic KL 1.2 and 2.8, reward 2 and 4: the
    figure's KL is the analytic one, mean 2.00 and sample standard deviation sqrt((0.8^2 + 0.8^2) / 1)
    = 1.13; the sample estimate 2.00 ± 1.41 beside it; reward 3.00 ± 1.41. Best-of-4 shows its KL as
    the bound log 4 - 3/4 = 0.64, without spread; the reference (all implicit rewards 0) has no
    held-out accuracy. Rows in method order (reference, DPO, ..., Best-of-N). Then with an optimum
    (frontier points (KL, reward) (0, 0), (1, 3), (3, 5.2) trusted, (4, 6) not; reference reward 0;
    Best-of-4's exact KL 0.30 ± 0.02): DPO's optimum at KL 2 is 4.10, halfway from 3 to 5.2, and
    its share of the gain 3.00 / 4.10 = 0.73; Best-of-4 sits at its exact KL, where the optimum is
    0.90, and reaches 1.00 / 0.90 = 1.11 (above the line: the line is an estimate). Without
    matplotlib the picture is skipped with a message; with it, a PNG is written."""
    monkeypatch.syspath_prepend(os.path.join(HERE, "scripts"))
    import frontier_report
    base = dict(win_rate=0.5, valid_fraction=1.0, pref_accuracy=0.75, val_margin=1.0, wall_seconds=10.0)
    write_eval(tmp_path / "dpo-beta1" / "s1" / "eval.json", **{**base, "kl": 1.0, "kl_analytic": 1.2, "policy_reward": 2.0})
    write_eval(tmp_path / "dpo-beta1" / "s2" / "eval.json", **{**base, "kl": 3.0, "kl_analytic": 2.8, "policy_reward": 4.0})
    write_eval(tmp_path / "best_of-4" / "s1" / "eval.json", **{**base, "kl_bound": math.log(4) - 0.75, "policy_reward": 1.0,
                                                              "val_margin": 0.0})
    write_eval(tmp_path / "reference" / "eval.json", **{**base, "kl": 0.0, "policy_reward": 0.1, "val_margin": 0.0})
    frontier_report.main([str(tmp_path)])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and not r.startswith("| point")]
    assert [r.split(" | ")[0] for r in rows] == ["| reference", "| dpo-beta1", "| best_of-4"]
    assert rows[1].startswith("| dpo-beta1 | 2 | 2.00 ± 1.13 | 2.00 ± 1.41 | 3.00 ± 1.41 | 0.500 ± 0.000 |")
    assert "| ≤ 0.64 (bound) | - |" in rows[2] and rows[0].split(" | ")[7] == "-"
    point = lambda kl, reward, trusted=True: dict(kl=kl, reward=reward, trusted=trusted, reward_lo=reward - 0.1,
                                                  reward_hi=reward + 0.1)
    write_eval(tmp_path / "optimum" / "optimum.json", prompts=8, samples=4, reference_reward=0.0,
               frontier=[point(0, 0), point(1, 3), point(3, 5.2), point(4, 6, False)],
               best_of=[dict(n=4, kl=0.3, kl_se=0.02, reward=1.0, bound=math.log(4) - 0.75)])
    frontier_report.main([str(tmp_path)])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and not r.startswith("| point")]
    assert rows[1].endswith("| 4.10 | 0.73 |")
    assert "| 0.30 ± 0.02 (exact; bound 0.64) | - |" in rows[2] and rows[2].endswith("| 0.90 | 1.11 |")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert frontier_report.plot(*frontier_report.collect(str(tmp_path))[:1], str(tmp_path / "f.png")) is False
    assert "matplotlib is not installed" in capsys.readouterr().out
    monkeypatch.delitem(sys.modules, "matplotlib")
    if importlib.util.find_spec("matplotlib") is None:  # optional: the picture is checked where it is installed
        return
    opt = frontier_report.load_optimum(str(tmp_path))
    assert frontier_report.plot(frontier_report.collect(str(tmp_path))[0], str(tmp_path / "f.png"), opt)
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_frontier_sweep_dry_run_resumes_and_skips_finished_runs(tmp_path):
    """scripts/frontier.sh at toy size, two runs at a time: a reference, then DPO, PPO-GT, GRPO and
    Best-of-2 for two policy seeds, the optimum from 4 reference samples per prompt, and the table.
    EXTRA's settings reach every run but yield to the run's own: the reference trains 20 SFT steps
    and no DPO (its row: KL 0), every policy run starts from its weights (sft_iters=0: the ref.pt
    each writes holds the same weights), and DPO runs at its own beta 1, not EXTRA's 5. Every point
    has both seeds. Run again, it starts nothing (every run has its eval.json and the rewards are
    kept) and prints the same table."""
    env = dict(os.environ, SEEDS="1 2", BETAS="1", ONLINE_BETAS="", KLS="1", RM_KLS="", GRPO_KLS="1", RLOO_KLS="",
               ALPHAS="", PFT_LRS="", JOBS="2", BEST_OF="2", OPTIMUM_SAMPLES="4",
               EXTRA=" ".join(TINY + ["--sft_iters=20", "--dpo_iters=2", "--eval_samples=8", "--beta=5",
                                      "--ppo_iters=2", "--rollout_batch=8", "--ppo_minibatch=4", "--group_size=2"]))
    cmd = ["bash", os.path.join(HERE, "scripts", "frontier.sh"), str(tmp_path)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    started = [line for line in first.stdout.splitlines() if re.match(r"[\w.-]+( s\d+)?: \d+ s$", line)]
    assert len(started) == 1 + 4 * 2 + 1  # the reference, 4 points x 2 seeds, the optimum
    ref = torch.load(tmp_path / "reference" / "ref.pt", weights_only=True)["model"]
    for run_dir in (tmp_path / p / s for p in ("dpo-beta1", "ppo_gt-kl1", "grpo-kl1", "best_of-2") for s in ("s1", "s2")):
        weights = torch.load(run_dir / "ref.pt", weights_only=True)["model"]
        assert all(torch.equal(weights[k], v) for k, v in ref.items()), run_dir
    assert [r["stage"] for r in read_metrics(tmp_path / "reference")].count("dpo") == 0
    assert [r["step"] for r in read_metrics(tmp_path / "dpo-beta1" / "s1") if r["stage"] == "dpo"] == [1, 2]
    assert json.loads((tmp_path / "dpo-beta1" / "s1" / "config.json").read_text())["beta"] == 1.0
    assert [r["step"] for r in read_metrics(tmp_path / "ppo_gt-kl1" / "s2") if r["stage"] == "ppo"] == [1, 2]
    assert [r["step"] for r in read_metrics(tmp_path / "grpo-kl1" / "s2") if r["stage"] == "grpo"] == [1, 2]
    opt = json.loads((tmp_path / "optimum" / "optimum.json").read_text())
    assert (opt["prompts"], opt["samples"]) == (8, 4) and opt["frontier"][0]["kl"] < 0.01
    table = [line for line in first.stdout.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[:2] for r in table[1:]] == [["| reference", "1"], ["| dpo-beta1", "2"], ["| ppo_gt-kl1", "2"],
                                                 ["| grpo-kl1", "2"], ["| best_of-2", "2"]]
    assert table[0].endswith("| optimum at its KL | share of gain |")
    assert table[1].split(" | ")[2] == "0.00"  # the reference against itself
    assert re.search(r"\| \d\.\d\d ± \d\.\d\d \(exact; bound 0\.19\) \|", table[-1])
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and not [line for line in again.stdout.splitlines() if re.match(r".*: \d+ s$", line)]
    assert [line for line in again.stdout.splitlines() if line.startswith("| ")] == table


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "scripts", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_recipe_reports_each_run_and_its_bars(tmp_path):
    """scripts/time_recipe.py at toy size: one seed, fp32, the settings after `--` passed to train.py. It
    prints one row per run, then one JSON line whose row holds the run's own figures (equal to its
    eval.json), the precision the run resolved, the run's profile, a wall time at least the profile's
    sum, and bars_met as the rule gives it. The rule at its edges: win 0.80 and valid 0.85 pass, KL 3.0
    passes and 3.0001 does not; accuracy 0.1 fails DPO but not PPO, which does not train its implicit
    reward."""
    recipe = load_script("time_recipe")
    assert recipe.passes("win_rate", 0.80, "dpo") and recipe.passes("valid_fraction", 0.85, "dpo")
    assert recipe.passes("kl", 3.0, "dpo") and not recipe.passes("kl", 3.0001, "dpo")
    assert not recipe.passes("pref_accuracy", 0.1, "dpo") and recipe.passes("pref_accuracy", 0.1, "ppo")
    cmd = [sys.executable, os.path.join("scripts", "time_recipe.py"), "--seeds=5", "--dtypes=float32", f"--runs={tmp_path}",
           "--", *TINY, "--sft_iters=4", "--dpo_iters=2", "--eval_pairs=8"]
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("seed 5 float32")
    (row,) = json.loads(lines[-1])["runs"]
    with open(tmp_path / "dpo-float32-s5" / "eval.json") as f:
        figures = json.load(f)
    assert row["dtype"] == "float32" and row["seed"] == 5
    assert all(row[k] == figures[k] for k in recipe.BARS)
    assert row["wall_seconds"] >= sum(row["seconds"].values())
    assert row["bars_met"] == all(recipe.passes(k, figures[k], "dpo") for k in recipe.BARS)
