"""
How fast is a DPO step, against what this machine can do at most?

  python bench.py            # the full table (a few minutes on a 2-core CPU)
  python bench.py --quick    # a seconds-long subset (the test suite runs this)
  python bench.py --compile  # torch.compile the policy (worth it on a GPU)
  python bench.py --ppo      # only the PPO iteration
  python bench.py --real [--data=FILE --tokenizer=FILE --score_pairs=128]  # real pairs (HH-RLHF), block 512, gpt2-small shape
  python bench.py --checkpointing   # activation checkpointing's memory and time, gpt2-small shape

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
import os
import random
import statistics
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch

import data as D
from dpo import concatenated_logps, dpo_loss, response_logps
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


def bench_dpo_step(shape, dtype, precomputed, device, steps, compile_model, grad_checkpoint=False):
    L, H, C, V = SHAPES[shape]
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=V, block_size=PROMPT + RESPONSE, n_layer=L, n_head=H, n_embd=C)
    policy = GPT(cfg).to(device)
    policy.grad_checkpoint = grad_checkpoint
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
                grad_checkpoint=grad_checkpoint,
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
    """One PPO iteration as rlhf.py runs it (rollout: cached sampling, then scoring by policy,
    reference, value model and a reward model; then `epochs` passes of minibatch updates of the
    policy and the value model), timed part by part on a random-init model and random prompts."""
    import rlhf  # the real stage functions, not a copy
    import train
    from runtime import Guard
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
    guard = Guard(cfg, run, "ppo", [policy, value], "none")  # its checks are part of the cost
    ep = rlhf.rollout(cfg, run, data, policy, reference, value, scorer, prompts, 0, 0.1)  # warm-up
    times = []
    for i in range(2):
        t0 = time.perf_counter()
        ep = rlhf.rollout(cfg, run, data, policy, reference, value, scorer, prompts, i, 0.1)
        rlhf.update(cfg, run, policy, value, optimizers, ep, torch.Generator().manual_seed(i), guard, i + 1)
        sync(device)
        total = time.perf_counter() - t0
        times.append((ep.sample_s, ep.score_s, total - ep.sample_s - ep.score_s, total))
    sample_s, score_s, update_s, total = (statistics.mean(x) for x in zip(*times))
    return dict(shape=shape, prompts=n_prompts, new_tokens=n_new, epochs=epochs, sample_s=sample_s,
                score_s=score_s, update_s=update_s, total_s=total, sample_share=sample_s / total,
                mean_response=ep.lengths.mean().item())


HERE = os.path.dirname(os.path.abspath(__file__))
HH_TEST = os.path.join(HERE, "..", "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz")  # this repo's test data
GPT2_BPE = os.path.join(HERE, "..", "shared", "data", "gpt2-bpe", "gpt2.tiktoken")


def padding(batches, lengths):
    """-> (padded tokens, real tokens) of batches of indices; each padded to its longest row."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches), sum(lengths[i] for b in batches for i in b)


def tokenize_speed(enc, pairs, block):
    """Pairs per second: encoding one text at a time, tiktoken's threaded batch encoder, tokenize_pairs."""
    texts = [p[k] for p in pairs for k in ("prompt", "chosen", "rejected")]
    speed = {}
    for name, fn in (("one_by_one", lambda: [enc.encode_ordinary(t) for t in texts]),
                     ("tiktoken_batch", lambda: enc.encode_ordinary_batch(texts, num_threads=8)),
                     ("tokenize_pairs", lambda: D.tokenize_pairs(pairs, enc, block, verbose=False))):
        t0 = time.perf_counter()
        fn()
        speed[name] = len(pairs) / (time.perf_counter() - t0)
    return speed


def bench_real(device, path, tokenizer, block=512, pairs_per_step=4, steps=2, n_score=128):
    """Real preference pairs through this project's data path and a gpt2-small-shaped model (random
    weights: speed does not depend on them), fp32. Tokenization one pair at a time against the
    batched encoder; the padding of training batches (16 pairs, shuffled against length-grouped)
    and of scoring batches (64 sequences, file order against sorted by length); then measured: a no-grad scoring pass over the first
    n_score pairs drawn at random and DPO steps of pairs_per_step pairs, each both ways. Useful tokens/s counts
    real tokens only."""
    enc = D.get_tokenizer(tokenizer)
    pairs = D.load_pairs(path, verbose=False)
    tok = D.tokenize_pairs(pairs, enc, block, verbose=False)
    res = dict(pairs=len(tok), tokenize_pairs_per_s=tokenize_speed(enc, pairs, block))
    rows = [(p, c) for p, c, _ in tok] + [(p, r) for p, _, r in tok]
    rlen = [len(p) + len(y) for p, y in rows]
    plen = [len(p) + max(len(c), len(r)) for p, c, r in tok]
    n = len(tok)
    for name, group in (("shuffled", 0), ("length_grouped", 50)):
        b = D.Batches(list(range(n)), 16, 0, lengths=plen, group=group)
        batches = [b.next() for _ in range(b.steps_per_epoch)]
        padded = sum(2 * len(x) * max(plen[i] for i in x) for x in batches)
        real = sum(rlen[i] + rlen[i + n] for x in batches for i in x)
        res[f"train_padding_{name}"] = padded / real
    order = sorted(range(len(rows)), key=rlen.__getitem__)
    for name, idx in (("file_order", list(range(len(rows)))), ("length_sorted", order)):
        res[f"score_padding_{name}"] = padding([idx[i:i + 64] for i in range(0, len(idx), 64)], rlen)[0] / sum(rlen)
    L, H, C, V = SHAPES["gpt2-small"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=block, n_layer=L, n_head=H, n_embd=C)).to(device)
    picked = sorted(random.Random(0).sample(range(n), min(n_score, n)))  # pairs in file order, chosen then rejected
    sub = [rows[i] for i in picked] + [rows[n + i] for i in picked]
    sub_len = [len(p) + len(y) for p, y in sub]
    for name, idx in (("file_order", list(range(len(sub)))), ("length_sorted", sorted(range(len(sub)), key=sub_len.__getitem__))):
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(idx), 64):
                ids, mask = (x.to(device) for x in D.collate_sft([sub[j] for j in idx[i:i + 64]], enc.eot_token))
                response_logps(model.eval(), ids, mask)  # what evaluate.score computes
        sync(device)
        dt = time.perf_counter() - t0
        res[f"score_{name}"] = dict(seconds=dt, useful_tokens_per_s=sum(sub_len) / dt)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for name, group in (("shuffled", 0), ("length_grouped", 50)):
        b = D.Batches(tok, pairs_per_step, 1, lengths=plen, group=group)
        real, t0 = 0, time.perf_counter()
        for _ in range(steps):
            ex = b.next()
            ids, mask = (x.to(device) for x in D.collate(ex, enc.eot_token))
            pc, pr, _, _ = concatenated_logps(model, ids, mask)
            (pc - pr).mean().backward()  # the policy's half of a step (a precomputed reference)
            opt.step()
            opt.zero_grad(set_to_none=True)
            real += sum(len(p) + len(c) + len(p) + len(r) for p, c, r in ex)
        sync(device)
        dt = time.perf_counter() - t0
        res[f"dpo_step_{name}"] = dict(sec_per_step=dt / steps, useful_tokens_per_s=real / dt)
    return res


def main_checkpointing(device, compile_model):
    """Activation checkpointing: its memory saved and its time cost."""
    print(f"device {device}; DPO step, gpt2-small shape, fp32, {PAIRS} pairs x {PROMPT + RESPONSE} tokens, "
          f"precomputed reference")
    rows = [bench_dpo_step("gpt2-small", "fp32", True, device, 3, compile_model, gc) for gc in (False, True)]
    for r in rows:
        print(f"grad_checkpoint={str(r['grad_checkpoint']):<5} {r['sec_per_step']:7.2f} s/step {r['peak_mem_mb']:8.0f} peak MB")
    print(f"checkpointing: {rows[1]['sec_per_step'] / rows[0]['sec_per_step']:.2f}x the time, "
          f"{rows[0]['peak_mem_mb'] - rows[1]['peak_mem_mb']:.0f} MB less at peak")
    print(json.dumps(dict(device=device, torch=torch.__version__, checkpointing=rows)))


def main_real(device, argv):
    """Real pairs through tokenization, batching and a gpt2-small-shaped model (bench_real)."""
    opts = dict(a.removeprefix("--").split("=", 1) for a in argv if "=" in a)
    path, tokenizer = opts.get("data", HH_TEST), opts.get("tokenizer", GPT2_BPE)
    if not os.path.isfile(path) or not os.path.isfile(tokenizer):
        sys.exit(f"--real needs a preference file and a .tiktoken file: pass --data=... --tokenizer=... "
                 f"(e.g. HH-RLHF's harmless-base test split and GPT-2's ranks); not found: {path}, {tokenizer}")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; {path}, block 512, "
          f"gpt2-small shape, fp32")
    r = bench_real(device, path, tokenizer, n_score=int(opts.get("score_pairs", 128)))
    t = r["tokenize_pairs_per_s"]
    print(f"tokenization: {t['one_by_one']:.0f} pairs/s encoding one text at a time, {t['tiktoken_batch']:.0f} "
          f"with tiktoken's threaded batch encoder, {t['tokenize_pairs']:.0f} for tokenize_pairs (encode each distinct "
          f"text once, then fit to the block); {r['pairs']} pairs")
    print(f"padded/real tokens: training batches of 16 pairs {r['train_padding_shuffled']:.2f} shuffled, "
          f"{r['train_padding_length_grouped']:.2f} length-grouped; scoring batches of 64 sequences "
          f"{r['score_padding_file_order']:.2f} in file order, {r['score_padding_length_sorted']:.2f} sorted")
    a, b = r["score_file_order"], r["score_length_sorted"]
    print(f"scoring {opts.get('score_pairs', 128)} pairs: {a['seconds']:.1f} s in file order, {b['seconds']:.1f} s sorted "
          f"({a['seconds'] / b['seconds']:.2f}x faster; {b['useful_tokens_per_s']:.0f} useful tokens/s)")
    a, b = r["dpo_step_shuffled"], r["dpo_step_length_grouped"]
    print(f"DPO step of 4 pairs (policy forward+backward, AdamW): {a['useful_tokens_per_s']:.0f} useful tokens/s "
          f"shuffled, {b['useful_tokens_per_s']:.0f} length-grouped ({b['useful_tokens_per_s'] / a['useful_tokens_per_s']:.2f}x)")
    print(json.dumps(dict(device=device, torch=torch.__version__, real=r)))


def main(argv):
    quick, compile_model, ppo_only = "--quick" in argv, "--compile" in argv, "--ppo" in argv
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if "--checkpointing" in argv:
        return main_checkpointing(device, compile_model)
    if "--real" in argv:
        return main_real(device, argv)
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
