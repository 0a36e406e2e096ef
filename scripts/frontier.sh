#!/usr/bin/env bash
# The DPO paper's Figure 2 on the embedded task, on a CPU: judge reward against KL to the reference
# for every method, all from one reference and evaluated on the same 256 held-out prompts:
#   DPO over beta, online DPO over beta, PPO-GT (the task's exact reward) over kl_coef, PPO-RM (a
#   reward model trained here), Unlikelihood over alpha, Preferred-FT, Best-of-N over N.
# Each point runs once per policy seed (--policy_seed: batch order, sampling; the same data,
# reference and reward model). The seeds are 1000 apart: train.py derives per-epoch, per-step and
# per-rank streams as policy_seed + a small count, so seeds 1 apart would share some of them.
# A finished run (one with an eval.json) is not run again and an interrupted one is resumed, so the
# sweep continues where it stopped. Then the table, and the picture if matplotlib is installed
# (scripts/frontier_report.py).
#   bash scripts/frontier.sh [runs_dir]                       # everything, SEEDS="1337 2337 3337"
#   SEEDS=1337 JOBS=2 bash scripts/frontier.sh                 # one seed, two runs at a time
#   BETAS="1" ONLINE_BETAS="" KLS="" RM_KLS="" bash scripts/frontier.sh    # a subset ("" skips a method)
#   JOBS=2 bash scripts/frontier.sh                            # two runs at a time, one thread each
#   PPO_ITERS=100 bash scripts/frontier.sh                     # PPO's steps (50 by default)
#   EXTRA="--eval_samples=64" bash scripts/frontier.sh         # settings for every run (a run's own win)
set -euo pipefail
if (( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404 )); then echo "needs bash >= 4.4 (this is $BASH_VERSION)"; exit 1; fi
cd "$(dirname "$0")/.."
runs=${1:-runs/frontier}
seeds=${SEEDS-"1337 2337 3337"}
betas=${BETAS-"0.5 1 2 4"}
online_betas=${ONLINE_BETAS-"1 2"}
kls=${KLS-"0.5 1"}
rm_kls=${RM_KLS-"1"}
# PPO's steps: train.py's default is 100, but in the 100-step runs the rollouts' score and KL stop
# rising by about step 50 (the README compares the two), and at 100 PPO was over half the sweep's time
ppo_iters=${PPO_ITERS-50}
alphas=${ALPHAS-"0.001 0.01"}
lrs=${PFT_LRS-"1e-4"}
ns=${BEST_OF-"2 4 16 64"}
jobs=${JOBS-1}
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || { echo "JOBS=$jobs: must be a whole number >= 1"; exit 1; }
read -r -a extra <<< "${EXTRA-}"
threads=()  # the reference trains alone, on every core
mkdir -p "$runs"
t0=$(date +%s)
failed=0
pids=()
# SIGTERM: pass it to the running trainings, which checkpoint and exit; the next call resumes them
trap 'for p in $(jobs -p); do pkill -TERM -P "$p"; done; wait; exit 143' TERM

run() {  # run NAME OUT_DIR ARGS...: one training run, resumed if it was interrupted, skipped if done
  local name=$1 out=$2; shift 2
  [ -f "$out/eval.json" ] && return 0
  local t=$(date +%s) rc=0
  mkdir -p "$(dirname "$out")"
  if [ -f "$out/ref.pt" ] || [ -f "$out/sft.pt" ]; then
    python train.py --out_dir="$out" --init_from=resume "${threads[@]}" >> "$out.log" 2>&1 || rc=$?
  else
    python train.py --out_dir="$out" --overwrite=True --show_samples=0 "${extra[@]}" "$@" "${threads[@]}" > "$out.log" 2>&1 || rc=$?
  fi
  if [ $rc -ne 0 ]; then echo "$name: FAILED (exit $rc), see $out.log"; return $rc; fi
  echo "$name: $(( $(date +%s) - t )) s"
}

spawn() {  # spawn NAME OUT_DIR ARGS...: run in the background, at most $jobs at once
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
  run "$@" &
  pids+=($!)
}

# the shared parts: the reference (SFT), then the reward model PPO-RM scores with
if [ -z "${REF:-}" ]; then
  run reference "$runs/reference" --dpo_iters=0 || exit 1  # evaluated against itself: the KL-0 point
  REF=$runs/reference/ref.pt
fi
if [ "$jobs" -gt 1 ]; then threads=(--threads=1); fi
ref=(--init_from="$REF" --sft_iters=0)
if [ -n "$rm_kls" ]; then spawn reward_model "$runs/reward_model" "${ref[@]}" --method=reward_model; rm_pid=$!; fi

for s in $seeds; do  # the longest runs first, so that JOBS=2 does not end on one long run alone
  p=(--policy_seed="$s")
  for k in $kls; do spawn "ppo_gt-kl$k s$s" "$runs/ppo_gt-kl$k/s$s" "${ref[@]}" "${p[@]}" --method=ppo --kl_coef="$k" --ppo_iters="$ppo_iters"; done
  if [ -n "$rm_kls" ]; then
    wait "$rm_pid" 2>/dev/null || [ -f "$runs/reward_model/eval.json" ] || { echo "no reward model: PPO-RM skipped"; failed=1; rm_kls=""; }
    for k in $rm_kls; do spawn "ppo_rm-kl$k s$s" "$runs/ppo_rm-kl$k/s$s" "${ref[@]}" "${p[@]}" --method=ppo --kl_coef="$k" --ppo_iters="$ppo_iters" --reward_model="$runs/reward_model/ckpt.pt"; done
  fi
  for b in $online_betas; do spawn "online-beta$b s$s" "$runs/online-beta$b/s$s" "${ref[@]}" "${p[@]}" --beta="$b" --online=True; done
  for b in $betas; do spawn "dpo-beta$b s$s" "$runs/dpo-beta$b/s$s" "${ref[@]}" "${p[@]}" --beta="$b"; done
  for a in $alphas; do spawn "unlikelihood-alpha$a s$s" "$runs/unlikelihood-alpha$a/s$s" "${ref[@]}" "${p[@]}" --method=unlikelihood --alpha="$a"; done
  for lr in $lrs; do spawn "preferred_ft-lr$lr s$s" "$runs/preferred_ft-lr$lr/s$s" "${ref[@]}" "${p[@]}" --method=preferred_ft --dpo_lr="$lr"; done
  for n in $ns; do spawn "best_of-$n s$s" "$runs/best_of-$n/s$s" "${ref[@]}" "${p[@]}" --method=best_of_n --best_of="$n"; done
done
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done  # every run's exit status, even one reaped above
echo "total $(( $(date +%s) - t0 )) s"
python scripts/frontier_report.py "$runs" --png "$runs/frontier.png"
exit $failed
