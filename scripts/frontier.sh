#!/usr/bin/env bash
# The reward-vs-KL frontier on the embedded task (the DPO paper's first experiment, on a CPU):
# one reference, then offline DPO, online DPO, Preferred-FT, PPO-GT (PPO on the task's exact
# reward) and PPO-RM (PPO on a reward model trained here) from it, all evaluated on the same
# held-out prompts. Prints a markdown table of every run's eval.json. A finished run (one with an
# eval.json) is not run again, and an interrupted one is resumed, so a sweep continues where it stopped.
#   bash scripts/frontier.sh [runs_dir]
#   BETAS="1" ONLINE_BETAS="" PFT_LRS="" KLS="1" bash scripts/frontier.sh   # a subset
#   REF=out/ref.pt bash scripts/frontier.sh                                  # an existing reference
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/frontier}
betas=${BETAS-"0.1 0.5 1 2 4"}
online_betas=${ONLINE_BETAS-"$betas"}
lrs=${PFT_LRS-"3e-5 1e-4 3e-4"}
kls=${KLS-"0.5 1 2"}
mkdir -p "$runs"
t0=$(date +%s)
run() {
  local name=$1; shift
  [ -f "$runs/$name/eval.json" ] && return
  local t=$(date +%s)
  if [ -f "$runs/$name/ref.pt" ] || [ -f "$runs/$name/sft.pt" ]; then  # interrupted: continue it
    python train.py --out_dir="$runs/$name" --init_from=resume >> "$runs/$name.log"
  else                                                           # new, or stopped before any checkpoint
    python train.py --out_dir="$runs/$name" --overwrite=True --show_samples=0 "$@" > "$runs/$name.log"
  fi
  echo "$name: $(( $(date +%s) - t )) s"
}
if [ -z "${REF:-}" ]; then                           # REF=path/to/ref.pt reuses a reference
  run reference --dpo_iters=0                        # SFT only: the reference, evaluated against itself
  REF=$runs/reference/ref.pt
fi
ref="--init_from=$REF --sft_iters=0"
for b in $betas; do run "dpo-beta$b" $ref --beta=$b; done
for b in $online_betas; do run "online-beta$b" $ref --beta=$b --online=True; done
for lr in $lrs; do run "preferred_ft-lr$lr" $ref --method=preferred_ft --dpo_lr=$lr; done
for k in $kls; do run "ppo_gt-kl$k" $ref --method=ppo --kl_coef=$k; done
if [ -n "$kls" ]; then
  run reward_model $ref --method=reward_model
  run ppo_rm-kl1 $ref --method=ppo --reward_model="$runs/reward_model/ckpt.pt"
fi
echo "total $(( $(date +%s) - t0 )) s"
python - "$runs" <<'PY'
import glob, json, os, sys
print("| run | KL (nats) | judge reward | win rate vs reference | valid | held-out pref. accuracy | wall s |")
print("|---|---|---|---|---|---|---|")
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*", "eval.json")), key=os.path.getmtime):
    e, name = json.load(open(f)), os.path.basename(os.path.dirname(f))
    if "kl" not in e:  # the reward model: its own held-out figures
        print(f"| {name} | held-out accuracy {e['rm_accuracy']:.3f}, correlation with the exact reward "
              f"{e['reward_correlation']:.3f} | | | | | {e['wall_seconds']:.0f} |")
        continue
    print(f"| {name} | {e['kl']:.2f} | {e['policy_reward']:.2f} | {e['win_rate']:.3f} | "
          f"{e['valid_fraction']:.3f} | {format(e['pref_accuracy'], '.3f') if e['val_margin'] else '-'} | {e['wall_seconds']:.0f} |")
PY
