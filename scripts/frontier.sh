#!/usr/bin/env bash
# The reward-vs-KL frontier on the embedded task (the DPO paper's first experiment, on a CPU):
# one reference, then offline DPO, online DPO and Preferred-FT from it, evaluated on the same
# held-out prompts. Prints a markdown table of every run's eval.json.
#   bash scripts/frontier.sh [runs_dir]        (about 25 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/frontier}
betas=${BETAS:-"0.1 0.5 1 2 4"}
lrs=${PFT_LRS:-"3e-5 1e-4 3e-4"}
mkdir -p "$runs"
t0=$(date +%s)
run() { local name=$1; shift; [ -f "$runs/$name/eval.json" ] || python train.py --out_dir="$runs/$name" --show_samples=0 "$@" > "$runs/$name.log"; }
run reference --dpo_iters=0                          # SFT only: the reference, evaluated against itself
ref="--init_from=$runs/reference/ref.pt --sft_iters=0"
for b in $betas; do
  run "dpo-beta$b" $ref --beta=$b
  run "online-beta$b" $ref --beta=$b --online=True
done
for lr in $lrs; do
  run "preferred_ft-lr$lr" $ref --method=preferred_ft --dpo_lr=$lr
done
echo "total $(( $(date +%s) - t0 )) s"
python - "$runs" <<'PY'
import glob, json, os, sys
print("| run | KL (nats) | judge reward | win rate vs reference | valid | held-out pref. accuracy | wall s |")
print("|---|---|---|---|---|---|---|")
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*", "eval.json")), key=os.path.getmtime):
    e = json.load(open(f))
    print(f"| {os.path.basename(os.path.dirname(f))} | {e['kl']:.2f} | {e['policy_reward']:.2f} | {e['win_rate']:.3f} | "
          f"{e['valid_fraction']:.3f} | {format(e['pref_accuracy'], '.3f') if e['val_margin'] else '-'} | {e['wall_seconds']:.0f} |")
PY
