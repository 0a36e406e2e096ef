"""
Tests. Every expected number is worked out by hand in the docstring of its test; the model and the
fast paths are checked against an independent, slower computation. Run: python -m pytest -q
"""
import json
import math
import os

import numpy as np
import pytest
import torch

from dpo import concatenated_logps, dpo_loss, response_logps, sequence_logps
from model import GPT, GPTConfig, load_safetensors

HERE = os.path.dirname(os.path.abspath(__file__))


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=37, block_size=64, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


# ------------------------------------------------------------------------------------------------
# the loss family

def test_policy_equal_to_reference_gives_log2():
    """If pi == pi_ref both log-ratios are 0, so h = 0 and the loss is -log sigmoid(0) = log 2
    = 0.693147..., for any beta; both implicit rewards beta*(log pi - log pi_ref) are 0."""
    lp_c, lp_r = t(-12.0, -3.5), t(-7.0, -40.0)
    for beta in (0.1, 1.0):
        losses, rc, rr = dpo_loss(lp_c, lp_r, lp_c.clone(), lp_r.clone(), beta=beta)
        assert torch.allclose(losses, torch.full((2,), math.log(2), dtype=torch.float64))
        assert rc.abs().max() == 0 and rr.abs().max() == 0


def test_sigmoid_worked_case():
    """beta 0.1; chosen log-ratio -10 - (-11) = 1, rejected log-ratio -20 - (-20) = 0, so h = 1.
    sigmoid(0.1) = 1/(1+e^-0.1) = 0.5249792 and the loss is -log 0.5249792 = 0.6443967.
    Rewards: 0.1*1 = 0.1 and 0.1*0 = 0."""
    losses, rc, rr = dpo_loss(t(-10.0), t(-20.0), t(-11.0), t(-20.0), beta=0.1)
    assert losses.item() == pytest.approx(0.6443967, abs=1e-6)
    assert rc.item() == pytest.approx(0.1) and rr.item() == 0.0


def test_conservative_dpo_worked_case():
    """cDPO with eps = 0.1, beta 0.1, h = 1 (z = beta*h = 0.1):
    -(1-eps) log sigmoid(z) - eps log sigmoid(-z). Since log sigmoid(-z) = log sigmoid(z) - z,
    this is -log sigmoid(z) + eps*z = 0.6443967 + 0.01 = 0.6543967."""
    losses, _, _ = dpo_loss(t(-10.0), t(-20.0), t(-11.0), t(-20.0), beta=0.1, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.6543967, abs=1e-6)


def test_ipo_worked_case():
    """IPO uses per-token mean log-ratios. Chosen: policy -8, reference -12 over 4 tokens: mean
    log-ratio 4/4 = 1. Rejected: policy -9, reference -7 over 2 tokens: mean -2/2 = -1. h' = 2.
    beta 0.5: target 1/(2*0.5) = 1, loss (2-1)^2 = 1. beta 0.25: target 2, loss 0.
    The rewards stay on summed log-ratios: 0.5*4 = 2 and 0.5*(-2) = -1."""
    args = (t(-8.0), t(-9.0), t(-12.0), t(-7.0))
    lens = dict(chosen_lengths=t(4.0), rejected_lengths=t(2.0))
    losses, rc, rr = dpo_loss(*args, beta=0.5, loss_type="ipo", **lens)
    assert losses.item() == pytest.approx(1.0) and rc.item() == pytest.approx(2.0) and rr.item() == pytest.approx(-1.0)
    losses, _, _ = dpo_loss(*args, beta=0.25, loss_type="ipo", **lens)
    assert losses.item() == pytest.approx(0.0, abs=1e-12)


def test_hinge_worked_case():
    """SLiC hinge relu(1 - beta*h), beta 0.1. Pair 1: h = 4 gives 1 - 0.4 = 0.6.
    Pair 2: h = 20 gives 1 - 2 < 0, so 0 (a pair ranked by a wide margin stops contributing)."""
    losses, _, _ = dpo_loss(t(-1.0, 0.0), t(-5.0, -20.0), t(0.0, 0.0), t(0.0, 0.0), beta=0.1, loss_type="hinge")
    assert losses.tolist() == pytest.approx([0.6, 0.0])


def test_reference_free_worked_case():
    """Reference-free DPO takes log pi_ref = 0: h = log pi(y_w) - log pi(y_l) = -3 - (-5) = 2.
    beta 1: -log sigmoid(2) = log(1 + e^-2) = 0.1269280. Rewards: -3 and -5."""
    losses, rc, rr = dpo_loss(t(-3.0), t(-5.0), None, None, beta=1.0)
    assert losses.item() == pytest.approx(0.1269280, abs=1e-6)
    assert (rc.item(), rr.item()) == (-3.0, -5.0)


def test_gradient_matches_closed_form():
    """d/d(log pi_w) of -log sigmoid(beta*h) = -beta*(1 - sigmoid(beta*h)) = -beta*sigmoid(-beta*h)
    and beta*h = r_hat_w - r_hat_l, so the weight is -beta*sigmoid(r_hat_l - r_hat_w); for log pi_l
    the sign flips. Checked against autograd on random log-probs and two betas."""
    g = torch.Generator().manual_seed(0)
    for beta in (0.1, 0.7):
        pc, pr, rc, rr = (-20 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(4))
        pc.requires_grad_(True)
        pr.requires_grad_(True)
        losses, rw, rl = dpo_loss(pc, pr, rc, rr, beta=beta)
        losses.sum().backward()
        weight = torch.sigmoid(rl - rw)
        assert torch.allclose(pc.grad, -beta * weight)
        assert torch.allclose(pr.grad, beta * weight)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=0.0), "beta"),
    (dict(beta=-1.0), "beta"),
    (dict(loss_type="kto"), "unknown loss_type"),
    (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(loss_type="hinge", label_smoothing=0.1), "sigmoid"),
    (dict(loss_type="ipo"), "chosen_lengths"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(t(-1.0), t(-2.0), t(-1.0), t(-2.0), **kwargs)


def test_bad_shapes_and_half_reference():
    with pytest.raises(ValueError, match="reference_rejected_logps must be a 1-D tensor of shape \\(2,\\)"):
        dpo_loss(t(-1.0, -2.0), t(-2.0, -3.0), t(-1.0, -1.0), t(-2.0))
    with pytest.raises(ValueError, match="None for both"):
        dpo_loss(t(-1.0), t(-2.0), t(-1.0), None)
    with pytest.raises(ValueError, match="> 0"):
        dpo_loss(t(-1.0), t(-2.0), t(-1.0), t(-2.0), loss_type="ipo", chosen_lengths=t(0.0), rejected_lengths=t(1.0))


# ------------------------------------------------------------------------------------------------
# log-probabilities of responses

def test_sequence_logps_by_hand():
    """Vocabulary {0, 1, 2}; every position's logits are log[1, 2, 1], so p = [1/4, 1/2, 1/4].
    Row ids [0, 1, 2, 1], prompt = positions 0-1, response = positions 2-3 (mask [F, F, T, T]).
    Token 2 is predicted by position 1 (p = 1/4), token 1 by position 2 (p = 1/2):
    sum = log(1/8) = -2.0794415, 2 response tokens. The logit at position 3 predicts nothing."""
    logits = torch.log(torch.tensor([1.0, 2.0, 1.0])).expand(1, 4, 3)
    ids = torch.tensor([[0, 1, 2, 1]])
    mask = torch.tensor([[False, False, True, True]])
    lp, n = sequence_logps(logits, ids, mask)
    assert lp.item() == pytest.approx(math.log(1 / 8)) and n.item() == 2
    # what the masked prompt tokens are does not matter (their targets are never scored)
    lp2, _ = sequence_logps(logits, torch.tensor([[2, 0, 2, 1]]), mask)
    assert lp2.item() == pytest.approx(math.log(1 / 8))


def test_sequence_logps_ignores_right_padding():
    """Appending padding (any token, mask False) to the right changes nothing: attention is
    causal, so real positions never see it, and the padded positions are not scored."""
    m = tiny_model()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[False, False, True, True, True, True]])
    lp, n = sequence_logps(m(ids), ids, mask)
    ids_p = torch.cat([ids, torch.full((1, 5), 11)], 1)
    mask_p = torch.cat([mask, torch.zeros(1, 5, dtype=torch.bool)], 1)
    lp_p, n_p = sequence_logps(m(ids_p), ids_p, mask_p)
    assert torch.allclose(lp, lp_p, atol=1e-5) and n.item() == n_p.item() == 4


def test_response_only_fast_path_equals_full_logits():
    """response_logps pushes only the scored positions through lm_head; it must equal
    sequence_logps on the full logits, values and gradients."""
    m = tiny_model(seed=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 37, (4, 12), generator=g)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    for b, (s, e) in enumerate([(3, 12), (5, 9), (1, 4), (8, 12)]):
        mask[b, s:e] = True
    full, n_full = sequence_logps(m(ids), ids, mask)
    full.sum().backward()
    g_full = m.transformer.wte.weight.grad.clone()
    m.zero_grad()
    fast, n_fast = response_logps(m, ids, mask)
    fast.sum().backward()
    assert torch.allclose(full, fast, atol=1e-5) and torch.equal(n_full, n_fast)
    assert torch.allclose(g_full, m.transformer.wte.weight.grad, atol=1e-5)


def test_concatenated_forward_equals_two_forwards():
    """Chosen and rejected stacked in one (2B, T) call give the same log-probs as scoring each
    half on its own (with its own, shorter padding)."""
    m = tiny_model(seed=2)
    chosen = torch.tensor([[1, 2, 3, 4, 5, 0, 0], [6, 7, 8, 9, 10, 11, 12]])
    rejected = torch.tensor([[1, 2, 3, 20, 0, 0, 0], [6, 7, 8, 21, 22, 0, 0]])
    mc = torch.tensor([[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    mr = torch.tensor([[0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    c, r, nc, nr = concatenated_logps(m, torch.cat([chosen, rejected]), torch.cat([mc, mr]))
    c1, nc1 = sequence_logps(m(chosen), chosen, mc)
    r1, nr1 = sequence_logps(m(rejected[:, :5]), rejected[:, :5], mr[:, :5])
    assert torch.allclose(c, c1, atol=1e-5) and torch.allclose(r, r1, atol=1e-5)
    assert nc.tolist() == [2, 4] and nr.tolist() == [1, 2]


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
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not torch.allclose(a[:, 5], b[:, 5], atol=1e-4)


def test_tied_embeddings_and_scaled_init():
    """lm_head shares wte's storage; residual projections are drawn with std 0.02/sqrt(2*n_layer)
    = 0.02/2 = 0.01 for 2 layers (sample std of 16*64 values is within ~10% of it)."""
    m = tiny_model(n_embd=64)
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    assert m.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert m.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_cached_generation_equals_uncached():
    """Same seed, same prompts of different lengths: sampling with the key/value cache and by
    recomputing the whole prefix every step draws the same tokens (same logits, same uniforms)."""
    m = tiny_model(seed=3)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        outs.append(m.generate(prompts, 25, temperature=1.0, top_k=20, use_cache=use_cache, generator=g))
    assert outs[0] == outs[1]
    assert [len(o) for o in outs[0]] == [25, 25, 25]


def test_greedy_output_does_not_depend_on_the_batch():
    """Greedy decoding of a prompt alone equals its row when batched with longer and shorter
    prompts: left padding is masked out and each row keeps its own positions."""
    m = tiny_model(seed=4)
    prompts = [[5, 6], [7, 8, 9, 10, 11, 12, 13, 14], [15, 16, 17, 18]]
    batched = m.generate(prompts, 15, temperature=0)
    alone = [m.generate([p], 15, temperature=0)[0] for p in prompts]
    assert batched == alone
    assert alone[0] != alone[1]  # the model is not ignoring its prompt


def test_generation_stops_at_eos():
    """A model whose output bias makes token 9 overwhelmingly likely after step 0 emits it and
    stops: every row ends with eos 9 and nothing follows it."""
    m = tiny_model(seed=5)
    with torch.no_grad():
        m.transformer.ln_f.bias.zero_()
        m.transformer.wte.weight[9] = 0.0
        m.transformer.ln_f.weight.zero_()  # all hidden states 0: every logit is 0 ...
    m.lm_head = torch.nn.Linear(16, 37)  # ... except through this untied bias
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.lm_head.bias.zero_()
        m.lm_head.bias[9] = 50.0
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
    """A model saved in GPT-2's Hugging Face layout loads back to identical logits, from both
    file formats and with or without the `transformer.` key prefix."""
    m = tiny_model(seed=6)
    write_config(tmp_path, m.config)
    sd = hf_state_dict(m, prefix)
    if fmt == "safetensors":
        write_safetensors(tmp_path / "model.safetensors", sd)
    else:
        torch.save(sd, tmp_path / "pytorch_model.bin")
    m2 = GPT.from_pretrained(str(tmp_path)).eval()
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
