"""
How fast is a DPO step, against what this machine can do at most?

  python bench.py            # the full table (a few minutes on a 2-core CPU)
  python bench.py --quick    # a seconds-long subset (the test suite runs this)
  python bench.py --compile  # torch.compile the policy (worth it on a GPU)
  python bench.py --ppo      # only the PPO iteration

Measures, after warm-up, the median over steps of: the matmul ceiling (GFLOP/s of one large
matmul, fp32 and bf16); a full DPO training step (policy forward+backward on chosen and rejected
concatenated, reference forward or precomputed log-probs, the loss, an AdamW step) for two model
shapes, two dtypes and both kinds of reference; and KV-cached against uncached sampling.
MFU = useful FLOPs / (seconds x the measured ceiling of the dtype). Useful FLOPs per token: 6N + 12*L*T*C
for the trained policy and 2N + 4*L*T*C for the reference (N: the matmul weights of the blocks; the
attention terms as in the PaLM paper's appendix), plus 6*V*C (policy) and 2*V*C (reference) for the
output layer at each position that predicts a response token: the prompt's logits are never needed.
Ends with one JSON line of every figure.
"""
import json
import statistics
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch

from dpo import concatenated_logps, dpo_loss
from model import GPT, GPTConfig, ScalarGPT

SHAPES = {  # name: (n_layer, n_head, n_embd, vocab_size)
    "tiny": (4, 4, 128, 257),
    "gpt2-small": (12, 12, 768, 50257),
}
PAIRS, PROMPT, RESPONSE = 16, 32, 64


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, steps, warmup, device):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reset_peak_memory(device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory_mb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return float("nan")


def matmul_ceiling(dtype, device, n, steps):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_time(lambda: a @ b, steps, 2, device) / 1e9


def make_batch(vocab, device, seed=0):
    """16 pairs of 32 prompt + 64 response tokens, stacked (2B, T) as train.py feeds them."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (PAIRS, PROMPT), generator=g)
    ids = torch.cat([torch.cat([prompt, torch.randint(0, vocab, (PAIRS, RESPONSE), generator=g)], 1)
                     for _ in range(2)]).to(device)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, PROMPT:] = True
    return ids, mask


def dpo_step_flops(model, ids, mask, precomputed):
    """Useful FLOPs of one DPO step on ids/mask (2B, T): every matmul of the blocks (2 FLOPs per
    weight per token), attention's two T x T products (2*2*T*C per token and layer, as if not
    causal, as the PaLM paper counts), and the output layer only at the positions that predict a
    response token. The policy's forward and backward cost 3x a forward, a live reference 1x."""
    L, C, V = model.config.n_layer, model.config.n_embd, model.config.vocab_size
    N = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    tokens, T, scored = ids.numel(), ids.shape[1], int(mask[:, 1:].sum())
    fwd = 2 * (tokens * (N + 2 * L * T * C) + scored * V * C)
    return 3 * fwd + (0 if precomputed else fwd)


def bench_dpo_step(shape, dtype, precomputed, device, steps, compile_model):
    L, H, C, V = SHAPES[shape]
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=V, block_size=PROMPT + RESPONSE, n_layer=L, n_head=H, n_embd=C)
    policy = GPT(cfg).to(device)
    reference = GPT(cfg).to(device).eval().requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5, fused=device == "cuda")
    model = torch.compile(policy) if compile_model else policy
    ids, mask = make_batch(V, device)
    ctx = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    with torch.no_grad(), ctx:
        ref_c, ref_r, _, _ = concatenated_logps(reference, ids, mask)
    losses = []

    def step():
        with ctx:
            if precomputed:
                rc, rr = ref_c, ref_r
            else:
                with torch.no_grad():
                    rc, rr, _, _ = concatenated_logps(reference, ids, mask)
            pc, pr, _, _ = concatenated_logps(model, ids, mask)
            loss = dpo_loss(pc.float(), pr.float(), rc.float(), rr.float(), beta=0.1)[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    reset_peak_memory(device)
    sec = median_time(step, steps, 1 if shape != "tiny" else 2, device)
    flops, tokens = dpo_step_flops(policy, ids, mask, precomputed), ids.numel()
    return dict(shape=shape, dtype=dtype, reference="precomputed" if precomputed else "live", sec_per_step=sec,
                pairs_per_s=PAIRS / sec, tokens_per_s=tokens / sec, tflop_per_step=flops / 1e12,
                peak_mem_mb=peak_memory_mb(device), first_losses=losses[:3])


def bench_sampling(shape, device, n_new, use_cache, dtype):
    L, H, C, V = SHAPES[shape]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=PROMPT + n_new, n_layer=L, n_head=H, n_embd=C)).to(device).eval()
    prompts = torch.randint(0, V, (16, PROMPT)).tolist()
    ctx = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def run():
        with ctx:
            model.generate(prompts, n_new, temperature=1.0, use_cache=use_cache,
                           generator=torch.Generator(device=device).manual_seed(0))

    sec = median_time(run, 1 if not use_cache else 3, 1, device)
    return dict(shape=shape, dtype=dtype, cache=use_cache, new_tokens=16 * n_new, sec=sec, tokens_per_s=16 * n_new / sec)


def bench_ppo_iteration(shape, device, n_prompts, n_new, epochs):
    """One PPO iteration as train.py runs it (rollout: cached sampling, then scoring by policy,
    reference, value model and a reward model; then `epochs` passes of minibatch updates of the
    policy and the value model), timed part by part on a random-init model and random prompts."""
    import train  # the real stage functions, not a copy
    L, H, C, V = SHAPES[shape]
    torch.manual_seed(0)
    cfg = train.parse_config([f"--max_new_tokens={n_new}", f"--rollout_batch={n_prompts}", f"--ppo_epochs={epochs}",
                              "--ppo_minibatch=16", "--dtype=float32", f"--sample_batch_size={n_prompts}"])
    run = SimpleNamespace(device=device, ctx=nullcontext(), ddp=False)
    policy = GPT(GPTConfig(vocab_size=V, block_size=PROMPT + n_new, n_layer=L, n_head=H, n_embd=C)).to(device)
    reference = GPT(policy.config).to(device).eval().requires_grad_(False)
    value, scorer = ScalarGPT.from_model(policy), ScalarGPT.from_model(policy).eval()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (policy, value)]
    prompts = torch.randint(0, V - 1, (n_prompts, PROMPT)).tolist()
    data = SimpleNamespace(eot=V - 1)
    guard = train.Guard(cfg, run, "ppo", [policy, value], "none")  # its checks are part of the cost
    ep = train.rollout(cfg, run, data, policy, reference, value, scorer, prompts, 0, 0.1)  # warm-up
    times = []
    for i in range(2):
        t0 = time.perf_counter()
        ep = train.rollout(cfg, run, data, policy, reference, value, scorer, prompts, i, 0.1)
        train.ppo_update(cfg, run, policy, value, optimizers, ep, torch.Generator().manual_seed(i), guard, i + 1)
        sync(device)
        total = time.perf_counter() - t0
        times.append((ep.sample_s, ep.score_s, total - ep.sample_s - ep.score_s, total))
    sample_s, score_s, update_s, total = (statistics.mean(x) for x in zip(*times))
    return dict(shape=shape, prompts=n_prompts, new_tokens=n_new, epochs=epochs, sample_s=sample_s,
                score_s=score_s, update_s=update_s, total_s=total, sample_share=sample_s / total,
                mean_response=ep.lengths.mean().item())


def main(argv):
    quick, compile_model, ppo_only = "--quick" in argv, "--compile" in argv, "--ppo" in argv
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 1024 if quick else (8192 if device == "cuda" else 2048)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, quick={quick}, compile={compile_model}")
    # (--quick steps only in fp32; a CPU without native bf16 takes long over a bf16 matmul)
    ceiling = {dt: float("nan") if ppo_only or (quick and dt == "bf16") else matmul_ceiling(d, device, n, 3 if quick else 10)
               for dt, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"matmul ceiling ({n}x{n}): fp32 {ceiling['fp32']:.0f} GFLOP/s, bf16 {ceiling['bf16']:.0f} GFLOP/s")

    rows, sampling = [], []
    shapes = [] if ppo_only else ["tiny"] if quick else list(SHAPES)
    dtypes = ["fp32"] if quick else ["fp32", "bf16"]
    print(f"\nDPO step: {PAIRS} pairs x ({PROMPT} prompt + {RESPONSE} response tokens), AdamW")
    print(f"{'shape':<11} {'dtype':<5} {'reference':<11} {'s/step':>8} {'pairs/s':>8} {'tokens/s':>9} {'peak MB':>8} {'MFU':>6}")
    for shape in shapes:
        for dtype in dtypes:
            for pre in (False, True):
                r = bench_dpo_step(shape, dtype, pre, device, 2 if quick else (3 if shape != "tiny" else 10), compile_model)
                r["mfu"] = r["tflop_per_step"] * 1e3 / r["sec_per_step"] / ceiling[dtype]
                rows.append(r)
                print(f"{shape:<11} {dtype:<5} {r['reference']:<11} {r['sec_per_step']:8.3f} {r['pairs_per_s']:8.1f} "
                      f"{r['tokens_per_s']:9.0f} {r['peak_mem_mb']:8.0f} {r['mfu']:6.1%}")
    for shape in shapes:  # the same first steps in both dtypes: bf16 must not change the loss
        a = next(r for r in rows if r["shape"] == shape and r["dtype"] == "fp32" and r["reference"] == "live")
        b = next((r for r in rows if r["shape"] == shape and r["dtype"] == "bf16" and r["reference"] == "live"), None)
        if b:
            diff = max(abs(x - y) for x, y in zip(a["first_losses"], b["first_losses"]))
            print(f"{shape}: bf16 step {a['sec_per_step'] / b['sec_per_step']:.2f}x faster than fp32; "
                  f"first losses {a['first_losses'][0]:.5f} vs {b['first_losses'][0]:.5f}, max |diff| over 3 steps {diff:.5f}")
        p = next(r for r in rows if r["shape"] == shape and r["dtype"] == a["dtype"] and r["reference"] == "precomputed")
        print(f"{shape}: precomputed reference {a['sec_per_step'] / p['sec_per_step']:.2f}x the step rate of a live one (fp32)")

    n_new = 32 if quick else 256
    print(f"\nsampling: 16 prompts x {n_new} new tokens")
    for shape in [] if ppo_only else ["tiny"] if quick or device == "cpu" else list(SHAPES):
        for use_cache in (True, False):
            s = bench_sampling(shape, device, n_new, use_cache, "fp32")
            sampling.append(s)
            print(f"{shape:<11} cache={str(use_cache):<5} {s['sec']:7.2f} s {s['tokens_per_s']:9.0f} new tokens/s")
        print(f"{shape}: the KV cache samples {sampling[-2]['tokens_per_s'] / sampling[-1]['tokens_per_s']:.1f}x faster")
    n_prompts, n_new = (16, 32) if quick else (64, 160)
    print(f"\nPPO iteration: {n_prompts} prompts x up to {n_new} new tokens (random-init model: no early stops), "
          f"4 epochs of minibatches of 16, policy + value model")
    ppo_rows = []
    for shape in ["tiny"] if quick or device == "cpu" else list(SHAPES):
        p = bench_ppo_iteration(shape, device, n_prompts, n_new, 4)
        ppo_rows.append(p)
        print(f"{shape:<11} sample {p['sample_s']:6.2f} s | score (policy, reference, value, reward) {p['score_s']:6.2f} s "
              f"| update {p['update_s']:6.2f} s | total {p['total_s']:6.2f} s | cached sampling {p['sample_share']:.0%} of it")
    print(json.dumps(dict(device=device, torch=torch.__version__, quick=quick, compile=compile_model,
                          ceiling_gflops=ceiling, dpo_step=rows, sampling=sampling, ppo=ppo_rows)))


if __name__ == "__main__":
    main(sys.argv[1:])
