"""
Tests of model.py, in the order of its code: attention (causality, the bf16 speed path), the MLP's
GELU, initialisation, sampling (temperature, masks and positions of batched and cached
generation, eos), and loading a GPT-2 checkpoint. Expected values are derived in each docstring.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import float64_logps, tiny_model, token_bound
from dpo import concatenated_logps, dpo_loss, response_token_logps
from model import GPT, MLP, GPTConfig, load_safetensors




def sharp_model(seed):
    """tiny_model with every weight matrix redrawn with std 0.5 instead of 0.02: attention and the
    next-token distribution are peaked, so a wrong mask or position changes greedy tokens instead
    of vanishing in a near-uniform softmax."""
    m = tiny_model(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return m


def fixed_logits_model(logits):
    """A tiny GPT whose next-token logits are exactly `logits` (37,) at every position: the final
    LayerNorm's weight and bias are 0, so every hidden state is 0, and an untied lm_head with zero
    weight adds `logits` as its bias (0 @ W + b = b, exactly)."""
    m = tiny_model()
    with torch.no_grad():
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.zero_()
    m.lm_head = torch.nn.Linear(16, 37)
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.lm_head.bias.copy_(logits)
    return m


# ------------------------------------------------------------------------------------------------
# the model

def test_causality():
    """Changing the token at position 5 leaves the logits of positions 0-4 unchanged (they may
    only look back) and changes position 5's."""
    m = tiny_model()
    ids = torch.randint(0, 37, (2, 10), generator=torch.Generator().manual_seed(0))
    ids2 = ids.clone()
    ids2[:, 5] = (ids2[:, 5] + 1) % 37
    a, b = m(ids), m(ids2)
    assert torch.equal(a[:, :5], b[:, :5])  # exactly: each row of a matmul reads only its own row
    assert not torch.allclose(a[:, 5], b[:, 5], atol=1e-4)


def fp32_rule_worst():
    """The largest |float32 token log-prob - float64| / token_bound(max|logit|) (conftest's rule)
    over GPTs of 2 and 4 layers, width 16 to 128, vocabularies 37 and 257, with weights at their
    initial scale and 5x it (logits up to ~6), on 4 rows of random tokens each."""
    worst = 0.0
    for seed, (L, C, V, T) in enumerate([(2, 16, 37, 64), (2, 64, 257, 96), (4, 128, 257, 96)] * 2):
        m = tiny_model(seed=seed, n_layer=L, n_embd=C, vocab_size=V, block_size=T)
        if seed >= 3:
            with torch.no_grad():
                for p in m.parameters():
                    if p.dim() == 2:
                        p.mul_(5)
        ids = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(seed))
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, T // 3:] = True
        with torch.no_grad():
            tok32 = response_token_logps(m, ids, mask).double()
        _, _, zmax, tok64 = float64_logps(m, ids, mask)
        tok64 = tok64[mask[:, 1:]]
        worst = max(worst, ((tok32 - tok64).abs().max() / token_bound(zmax)).item())
    return worst


def test_fp32_rule_holds_on_every_cpu_kernel():
    """The tolerance rule every float32 comparison of the suite rests on (conftest.py): a float32
    token log-prob is within 64 u (1 + max|logit|) of its float64 value. Checked here on this CPU's
    own kernels and, in fresh processes, with ATEN_CPU_CAPABILITY=default (no vector kernels) and
    =avx2 (a CPU without AVX-512); a CPU whose kernels round worse fails this test by name. The
    measured worst is about 1/6 of the bound (11 u max|logit|); float64 error is ~1e-16, negligible."""
    assert fp32_rule_worst() < 1
    for capability in ("default", "avx2"):
        code = "import test_model; print(test_model.fp32_rule_worst())"
        p = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)), text=True,
                           capture_output=True, env=dict(os.environ, ATEN_CPU_CAPABILITY=capability), timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        assert float(p.stdout.split()[-1]) < 1, (capability, p.stdout)


def test_bf16_autocast_keeps_the_loss():
    """bf16 autocast (the CPU default where it is faster) against fp32 on the same seeded batch,
    with a policy that differs from its reference (the fp32 loss is log 2 + 0.028). Log-probs are
    summed in fp32 (cross_entropy on .float() logits), so the DPO losses agree closely: measured
    |0.7211164 - 0.7209369| = 1.8e-4 on an AVX2 CPU with torch 2.13 (about 7e-5 on another
    machine); the tolerance is 5e-4, below 2% of the policy's distance from log 2. The gradients
    point the same way: measured 1 - cosine = 8.7e-6, tolerance 5e-5."""
    ref = tiny_model(seed=8, n_embd=64, vocab_size=257)
    pol = tiny_model(seed=9, n_embd=64, vocab_size=257)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 257, (8, 40), generator=g)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 12:] = True
    out = {}
    for name, ctx in (("fp32", torch.autocast("cpu", enabled=False)), ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
        pol.zero_grad()
        with ctx:
            with torch.no_grad():
                rc, rr, _, _ = concatenated_logps(ref, ids, mask)
            pc, pr, _, _ = concatenated_logps(pol, ids, mask)
            loss = dpo_loss(pc.float(), pr.float(), rc.float(), rr.float(), beta=0.1)[0].mean()
        loss.backward()
        out[name] = (loss.item(), torch.cat([p.grad.flatten() for p in pol.parameters()]))
    assert out["fp32"][0] - math.log(2) > 0.02
    assert abs(out["fp32"][0] - out["bf16"][0]) < 5e-4
    assert 1 - torch.nn.functional.cosine_similarity(out["fp32"][1], out["bf16"][1], dim=0) < 5e-5


def test_mlp_uses_gpt2_tanh_gelu():
    """GPT-2's MLP is c_proj(gelu(c_fc(x))) with the tanh approximation
    gelu(u) = 0.5*u*(1 + tanh(sqrt(2/pi)*(u + 0.044715*u^3))), computed here by hand in float64
    from the layer's own weights (tolerance 1e-12: float64 rounding). Weights ~N(0, 1) spread the
    pre-activations over about [-8, 8], where the exact erf GELU differs from the tanh form by up
    to 4.7e-4 (at u = -2.7); the check asserts that the erf version's output is > 1e-4 away, so
    it can tell the two apart."""
    torch.manual_seed(0)
    mlp = MLP(GPTConfig(n_embd=8)).double().eval()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0.0, 1.0)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    u = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
    tanh_gelu = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
    erf_gelu = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
    expected = tanh_gelu @ mlp.c_proj.weight.T + mlp.c_proj.bias
    with torch.no_grad():
        assert torch.allclose(mlp(x), expected, rtol=0, atol=1e-12)
        assert (erf_gelu @ mlp.c_proj.weight.T + mlp.c_proj.bias - expected).abs().max() > 1e-4


def test_tied_embeddings_and_scaled_init():
    """lm_head shares wte's storage; residual projections are drawn with std 0.02/sqrt(2*n_layer)
    = 0.02/2 = 0.01 for 2 layers, other Linear weights with std 0.02. mlp.c_proj.weight and
    mlp.c_fc.weight hold 64*256 = 16,384 values each; a sample std's relative standard error is
    1/sqrt(2n) = 0.55%, so 3% is over 5 standard errors."""
    m = tiny_model(n_embd=64)
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    assert m.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.01, rel=0.03)
    assert m.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.03)


# ------------------------------------------------------------------------------------------------
# sampling

@pytest.mark.parametrize("temperature", [0.25, 1.0, 4.0])
def test_temperature_divides_the_logits(temperature):
    """Next-token logits fixed at l_v = 0.2*v (v = 0..36). At temperature T the token must be drawn
    from softmax(l/T). 1000 one-token prompts, one token each, with a seeded generator: generate's
    draws equal torch.multinomial on softmax(l/T) computed here with the same seed, draw for
    draw. As a check that does not rely on how the draws are made, the mean token is within 5
    standard errors of its expectation under softmax(l/T): 35.18 (sd 1.22) at T = 0.25, 31.51
    (sd 4.91) at T = 1, 23.40 (sd 9.84) at T = 4: the tolerances 5*sd/sqrt(1000) = 0.19, 0.78 and
    1.56 are each less than half the 3.7 and 8.1 gaps between these means.
    Greedy (T = 0) picks the argmax 36."""
    logits = 0.2 * torch.arange(37, dtype=torch.float32)
    m = fixed_logits_model(logits)
    n = 1000
    out = m.generate([[1]] * n, 1, temperature=temperature, generator=torch.Generator().manual_seed(0))
    drawn = torch.tensor([row[0] for row in out])
    probs = torch.softmax((logits / temperature).expand(n, 37).contiguous(), -1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0)).squeeze(1)
    assert torch.equal(drawn, expected)
    p = torch.softmax(logits.double() / temperature, -1)
    v = torch.arange(37, dtype=torch.float64)
    mean, sd = (p * v).sum(), (p * (v - (p * v).sum()) ** 2).sum().sqrt()
    assert abs(drawn.double().mean() - mean) < 5 * sd / math.sqrt(n)
    assert m.generate([[1], [2, 3]], 3, temperature=0) == [[36] * 3, [36] * 3]


def greedy_by_forward(m, prompt, n):
    """n greedy tokens from the plain forward m(ids) on the unpadded prompt: SDPA's is_causal
    attention, positions 0, 1, ..., no mask tensor, no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(m(torch.tensor([seq]))[0, -1].argmax().item())
    return seq[len(prompt):]


def test_generation_matches_the_plain_causal_forward():
    """Greedy decoding must take, at every step, the argmax of the model's own causal forward over
    prompt + tokens so far. The reference is greedy_by_forward on each prompt alone; generate on
    the three prompts together (left-padded to 8 columns: the short rows have 6 and 4 pad keys
    that must be masked, and positions counted from their first real token) must give the same
    8 tokens per row, without the cache (the whole prefix recomputed under generate's causal
    mask every step) and with it: a row's result does not depend on the batch or the padding.
    The model is sharp_model, so a mask or position error changes tokens; the references differ
    between prompts and are not one repeated token."""
    m = sharp_model(seed=11)
    prompts = [[5, 6], [7, 8, 9, 10, 11, 12, 13, 14], [15, 16, 17, 18]]
    ref = [greedy_by_forward(m, p, 8) for p in prompts]
    assert len({tuple(r) for r in ref}) == 3 and all(len(set(r)) > 1 for r in ref)
    for use_cache in (False, True):
        assert m.generate(prompts, 8, temperature=0, use_cache=use_cache) == ref, use_cache


def test_cached_generation_equals_uncached():
    """Same seed, same prompts of different lengths: sampling with the key/value cache and by
    recomputing the whole prefix every step draws the same tokens (same logits, same uniforms),
    12 per row (no eos given)."""
    m = tiny_model(seed=3)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        outs.append(m.generate(prompts, 12, temperature=1.0, top_k=20, use_cache=use_cache, generator=g))
    assert outs[0] == outs[1]
    assert [len(o) for o in outs[0]] == [12, 12, 12]


def test_generation_stops_at_eos():
    """Logits 50 for token 9 and 0 for the other 36 at every position: p(9) = 1/(1 + 36 e^-50),
    so sampling at temperature 1 draws 9 first in both rows; each row keeps its eos and stops,
    and since every row is done, generation ends: [[9], [9]], not 10 tokens."""
    m = fixed_logits_model(torch.zeros(37).index_fill(0, torch.tensor([9]), 50.0))
    out = m.generate([[1, 2], [3]], 10, eos_id=9)
    assert out == [[9], [9]]


# ------------------------------------------------------------------------------------------------
# loading a GPT-2 layout checkpoint

def hf_state_dict(model, prefix):
    """The state dict a Hugging Face GPT2LMHeadModel would save for `model`: Conv1D weights are
    (in, out), so transposed; legacy causal-mask buffers included; lm_head tied."""
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            sd[k] = v.clone()
            continue
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()
        name = k if prefix else k[len("transformer."):]
        sd[name] = v.contiguous().clone()
    n = model.config.block_size
    for i in range(model.config.n_layer):
        p = "transformer." if prefix else ""
        sd[f"{p}h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        sd[f"{p}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def write_safetensors(path, tensors, dtype_names=None):
    """An independent writer of the format: u64 header length, JSON header, raw bytes."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    header, blobs, off = {}, [], 0
    for k, v in tensors.items():
        raw = v.contiguous().view(torch.uint8).numpy().tobytes() if v.dim() else v.reshape(1).view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": (dtype_names or {}).get(k, names[v.dtype]), "shape": list(v.shape),
                     "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def write_config(folder, cfg):
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_layer=cfg.n_layer,
                       n_head=cfg.n_head, n_embd=cfg.n_embd, model_type="gpt2"), f)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("prefix", [True, False])
def test_gpt2_checkpoint_round_trip(tmp_path, fmt, prefix):
    """A model saved in GPT-2's Hugging Face layout loads back to identical tensors and logits,
    from both file formats and with or without the `transformer.` key prefix. Every parameter is
    first moved off its initial value (LayerNorm weights 1 and biases 0, Linear biases 0 at init,
    in particular the final LayerNorm transformer.ln_f), so a tensor that from_pretrained fails
    to copy keeps its fresh-init value and differs."""
    m = tiny_model(seed=6)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fresh = GPT(m.config).state_dict()
    assert all(not torch.equal(v, fresh[k]) for k, v in m.state_dict().items())
    write_config(tmp_path, m.config)
    sd = hf_state_dict(m, prefix)
    if fmt == "safetensors":
        write_safetensors(tmp_path / "model.safetensors", sd)
    else:
        torch.save(sd, tmp_path / "pytorch_model.bin")
    m2 = GPT.from_pretrained(str(tmp_path)).eval()
    loaded = m2.state_dict()
    for k, v in m.state_dict().items():
        assert torch.equal(loaded[k], v), k
    assert torch.equal(m2.transformer.ln_f.weight, m.transformer.ln_f.weight)
    assert torch.equal(m2.transformer.ln_f.bias, m.transformer.ln_f.bias)
    ids = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(m(ids), m2(ids))


def test_safetensors_bf16_and_f16(tmp_path):
    """bf16 and f16 tensors decode to the same values torch holds (exactly representable inputs)."""
    x = torch.tensor([[1.5, -2.25], [0.0, 1024.0]])
    write_safetensors(tmp_path / "a.safetensors", {"a": x.bfloat16(), "b": x.half()})
    sd = load_safetensors(tmp_path / "a.safetensors")
    assert sd["a"].dtype == torch.bfloat16 and torch.equal(sd["a"].float(), x)
    assert sd["b"].dtype == torch.float16 and torch.equal(sd["b"].float(), x)


def test_checkpoint_errors(tmp_path):
    """Missing folder contents, an unknown dtype, a wrong shape and a key that maps nowhere each
    give a ValueError/FileNotFoundError naming the file and the tensor."""
    m = tiny_model()
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(str(tmp_path))
    write_config(tmp_path, m.config)
    with pytest.raises(FileNotFoundError, match="model.safetensors nor pytorch_model.bin"):
        GPT.from_pretrained(str(tmp_path))
    st = tmp_path / "model.safetensors"
    sd = hf_state_dict(m, True)
    write_safetensors(st, sd, dtype_names={"transformer.wte.weight": "F8_E4M3"})
    with pytest.raises(ValueError, match="wte.weight.*unsupported dtype F8_E4M3"):
        GPT.from_pretrained(str(tmp_path))
    bad = dict(sd)
    bad["transformer.wpe.weight"] = torch.zeros(3, 16)
    write_safetensors(st, bad)
    with pytest.raises(ValueError, match="model.safetensors.*wpe.weight.*shape \\(3, 16\\), expected \\(64, 16\\)"):
        GPT.from_pretrained(str(tmp_path))
    bad = dict(sd)
    bad["transformer.h.0.attn.q_proj.weight"] = torch.zeros(2)
    write_safetensors(st, bad)
    with pytest.raises(ValueError, match="q_proj.weight' does not map"):
        GPT.from_pretrained(str(tmp_path))
    bad = dict(sd)
    del bad["transformer.ln_f.bias"]
    write_safetensors(st, bad)
    with pytest.raises(ValueError, match="no weights for.*ln_f.bias"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"garbage, not a zip or a pickle")
    with pytest.raises(ValueError, match="pytorch_model.bin: not a readable PyTorch weights file"):
        GPT.from_pretrained(str(tmp_path))












# ------------------------------------------------------------------------------------------------
# export, a shorter context, activation checkpointing

def test_save_pretrained_round_trip(tmp_path):
    """save_pretrained writes what from_pretrained reads: the same tensors and logits back. The file
    is in Hugging Face's layout, read here with json alone: names with the transformer. prefix, no
    lm_head (tied), Conv1D weights (in, out): c_attn (16, 48) for n_embd 16, and config.json with
    GPT-2's field names."""
    m = tiny_model(seed=3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m.save_pretrained(str(tmp_path / "hf"))
    m2 = GPT.from_pretrained(str(tmp_path / "hf")).eval()
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m.state_dict().items())
    ids = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(m.eval()(ids), m2(ids))
    raw = (tmp_path / "hf" / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["transformer.h.0.attn.c_attn.weight"]["shape"] == [16, 48] and "lm_head.weight" not in header
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["n_positions"], cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"], cfg["model_type"]) == (64, 16, 2, 37, "gpt2")


def test_crop_block_size_keeps_the_first_positions():
    """Cropping a block-64 model to 20 keeps wpe rows 0..19, so on a 20-token input its logits equal
    the uncropped model's; a longer input is now refused, and so is growing the block."""
    m = tiny_model(seed=4).eval()
    ids = torch.randint(0, 37, (2, 20), generator=torch.Generator().manual_seed(1))
    before = m(ids)
    m.crop_block_size(20)
    assert m.config.block_size == 20 and m.transformer.wpe.weight.shape == (20, 16)
    assert torch.equal(m(ids), before)
    with pytest.raises(ValueError, match="longer than block_size 20"):
        m(torch.zeros(1, 21, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size 30 is longer than the model's 20"):
        m.crop_block_size(30)


def test_activation_checkpointing_gives_the_same_gradients():
    """With grad_checkpoint the blocks' activations are recomputed in backward, with the same dropout
    masks (the RNG state is replayed): every gradient equals the plain run's exactly, dropout 0.1:
    the recomputation runs the same kernels on the same inputs, so no rounding can differ."""
    grads = []
    for ckpt in (False, True):
        m = tiny_model(seed=5, dropout=0.1).train()
        m.grad_checkpoint = ckpt
        torch.manual_seed(0)
        ids = torch.randint(0, 37, (3, 12), generator=torch.Generator().manual_seed(2))
        m(ids).logsumexp(-1).sum().backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])  # the same ops on the same inputs
