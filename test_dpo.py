"""
Tests. Every expected number is worked out by hand in the docstring of its test; the model and the
fast paths are checked against an independent, slower computation. Run: python -m pytest -q
"""
import base64
import gzip
import json
import math
import os
import random
import re
import subprocess
import sys
import time

import pytest
import tiktoken
import torch

import data
import train
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


# ================================================================================================
# data.py: loading, tokenization, batches, the embedded task
# ================================================================================================
HH_PATH = os.path.join(HERE, "..", "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz")
GPT2_PATH = os.path.join(HERE, "..", "shared", "data", "gpt2-bpe", "gpt2.tiktoken")


# -----------------------------------------------------------------------------
# loading

EXPECTED = [
    {"prompt": "\n\nHuman: Hi there\n\nAssistant:", "chosen": " Hello! How can I help?", "rejected": " Go away."},
    {"prompt": "\n\nSystem: Be brief.\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: And 3+3?\n\nAssistant:",
     "chosen": " 6", "rejected": " 7"},
]


def _write(path, text):
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _jsonl(records):
    return "".join(json.dumps(r) + "\n" for r in records)


def _msgs(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


def test_three_formats_load_to_the_same_pairs(tmp_path):
    """The same two pairs in explicit (.jsonl), implicit HH (.jsonl.gz) and
    conversational (.json, once with a separate prompt, once as whole
    conversations using role "human") form. The HH prompt runs up to and
    including the last "\\n\\nAssistant:", so the responses keep their leading
    space; the template renders "system" as "\\n\\nSystem: ..." and a response as
    " " + the final assistant content. All four files give EXPECTED exactly."""
    explicit = _write(tmp_path / "a.jsonl", _jsonl(EXPECTED))
    implicit = _write(tmp_path / "b.jsonl.gz", _jsonl(
        [{"chosen": e["prompt"] + e["chosen"], "rejected": e["prompt"] + e["rejected"]} for e in EXPECTED]))
    head = [_msgs(("user", "Hi there")),
            _msgs(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("human", "And 3+3?"))]
    answers = [("Hello! How can I help?", "Go away."), ("6", "7")]
    conv = [{"prompt": h, "chosen": _msgs(("assistant", c)), "rejected": _msgs(("assistant", r))}
            for h, (c, r) in zip(head, answers)]
    whole = [{"chosen": h + _msgs(("assistant", c)), "rejected": h + _msgs(("assistant", r))}
             for h, (c, r) in zip(head, answers)]
    conv_path = _write(tmp_path / "c.json", json.dumps(conv))
    whole_path = _write(tmp_path / "d.json", json.dumps(whole))
    for path in (explicit, implicit, conv_path, whole_path):
        assert data.load_pairs(path, verbose=False) == EXPECTED, path


def test_hh_file_loads_with_counted_skips(capsys):
    """harmless-base-test has 2,312 pairs. 4 have an empty chosen response (just
    " ") and are skipped as empty_response, so 2,308 load. In 5 pairs one
    response holds a later "\\n\\nAssistant:" turn of its own (4 chosen, 1
    rejected); the prompt is the shared prefix, so they load and are counted.
    E.g. the pair about drag kings: the shared prompt ends "Isn't that drag
    kings?\\n\\nAssistant:" and the chosen response goes on past another turn."""
    if not os.path.exists(HH_PATH):
        pytest.skip(f"real HH data not found at {HH_PATH} (fresh clone without ../shared)")
    pairs = data.load_pairs(HH_PATH)
    summary = capsys.readouterr().out.strip()
    assert summary == ("loaded 2308 pairs from harmless-base-test.jsonl.gz (skipped 4: empty_response=4); "
                       "5 kept with a later Assistant turn inside a response")
    assert len(pairs) + 4 == 2312
    assert all(p["prompt"].endswith("\n\nAssistant:") for p in pairs)
    assert all(p["chosen"].strip() and p["rejected"].strip() and p["chosen"] != p["rejected"] for p in pairs)
    with_turn = [p for p in pairs if "\n\nAssistant:" in p["chosen"] + p["rejected"]]
    assert len(with_turn) == 5
    drag = [p for p in with_turn if p["prompt"].endswith("Isn't that drag kings?\n\nAssistant:")]
    assert len(drag) == 1 and drag[0]["chosen"].startswith(" No. Men who impersonate")
    assert drag[0]["rejected"].startswith(" A drag king is the opposite")


BAD_INPUTS = [  # (file name, content, substrings the error must contain)
    ("bad.jsonl", '{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": oops}\n',
     ["bad.jsonl", "line 2", "invalid JSON"]),
    ("missing.jsonl", '\n{"prompt": "a", "chosen": " b"}\n', ["missing.jsonl", "line 2", "'rejected'"]),
    ("nonstr.jsonl", '{"prompt": "a", "chosen": 5, "rejected": " c"}\n', ["nonstr.jsonl", "line 1", "'chosen'"]),
    ("prompt.jsonl", '{"prompt": 1, "chosen": " b", "rejected": " c"}\n', ["prompt.jsonl", "line 1", "'prompt'"]),
    ("unknown.jsonl", '{"question": "a", "answer": "b"}\n', ["unknown.jsonl", "line 1", "unknown record format"]),
    ("noturn.jsonl", '{"chosen": "Human: hi", "rejected": "Human: yo"}\n', ["noturn.jsonl", "line 1", "'chosen'"]),
    ("role.json", json.dumps([{"chosen": _msgs(("user", "a"), ("assistant", "b")),
                               "rejected": _msgs(("user", "a"), ("robot", "c"))}]),
     ["role.json", "record 0", "'rejected[1].role'"]),
    ("last.json", json.dumps([EXPECTED[0], {"chosen": _msgs(("user", "a")), "rejected": _msgs(("user", "a"))}]),
     ["last.json", "record 1", "'chosen'"]),
    ("notlist.json", '{"chosen": " b"}', ["notlist.json", "JSON list"]),
    ("empty.jsonl", "\n\n", ["empty.jsonl", "empty file"]),
    ("empty.json", "[]", ["empty.json", "empty file"]),
    ("pairs.csv", "prompt,chosen,rejected\n", ["pairs.csv", "unknown file type"]),
]


@pytest.mark.parametrize("name,content,needles", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_file_line_and_field(tmp_path, name, content, needles):
    """Each malformed file raises ValueError whose message names the file, the
    1-based line (or 0-based record index for a .json list) and the field, as
    listed per case in BAD_INPUTS (blank lines still count as lines)."""
    path = _write(tmp_path / name, content)
    with pytest.raises(ValueError) as err:
        data.load_pairs(path, verbose=False)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_missing_file_raises_file_not_found_naming_it(tmp_path):
    """A path that does not exist raises FileNotFoundError with the path in the message."""
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load_pairs(tmp_path / "nope.jsonl")


def test_empty_and_identical_responses_are_skipped_and_counted(tmp_path, capsys):
    """4 records: one good, one with a whitespace-only response, one with chosen
    == rejected, one HH pair whose dialogues differ in the first Human turn (no
    shared Assistant turn). 1 loads; the summary counts each skip by reason."""
    path = _write(tmp_path / "s.jsonl", _jsonl([
        EXPECTED[0],
        {"prompt": "p", "chosen": "  \n", "rejected": " no"},
        {"prompt": "p", "chosen": " same", "rejected": " same"},
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
    ]))
    assert data.load_pairs(path) == [EXPECTED[0]]
    assert capsys.readouterr().out.strip() == (
        "loaded 1 pairs from s.jsonl (skipped 3: empty_response=1, identical=1, prompt_mismatch=1)")


# -----------------------------------------------------------------------------
# tokenization and collation

def _toy_bpe():
    """256 byte ranks, then merges he=256, ll=257, hell=258, hello=259; eot=260."""
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({b"he": 256, b"ll": 257, b"hell": 258, b"hello": 259})
    return tiktoken.Encoding("toy", pat_str=data.GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 260})


def test_toy_bpe_ids_separate_encoding_and_appended_eot():
    """With the toy BPE, "hello" -> h,e,l,l,o -> he,l,l,o -> he,ll,o -> hell,o ->
    [259]; " hello" is one pre-token and -> [32, 259]. Pair prompt "hel",
    response "lo": encoded together "hello" would be [259], but separately
    "hel" -> [he, l] = [256, 108] and "lo" -> [108, 111], plus eot 260.
    An empty prompt becomes [eot]."""
    enc = _toy_bpe()
    assert enc.encode_ordinary("hello") == [259] and enc.encode_ordinary(" hello") == [32, 259]
    pairs = [{"prompt": "hel", "chosen": "lo", "rejected": "l"},
             {"prompt": "", "chosen": " hello", "rejected": "he"}]
    out = data.tokenize_pairs(pairs, enc, block_size=64, verbose=False)
    assert out == [([256, 108], [108, 111, 260], [108, 260]),
                   ([260], [32, 259, 260], [256, 260])]


def test_collate_exact_ids_and_mask():
    """Using the two triples above with pad_id 0: rows are [p+c for each] then
    [p+r for each]; lengths 5, 4, 4, 3 -> T = 5. Mask is True on response
    positions (incl. eot) only: row 0 = prompt 2 + response 3, row 1 = prompt
    1 + response 3, row 2 = prompt 2 + response 2, row 3 = prompt 1 + response 2."""
    ex = [([256, 108], [108, 111, 260], [108, 260]), ([260], [32, 259, 260], [256, 260])]
    ids, mask = data.collate(ex, pad_id=0)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.tolist() == [[256, 108, 108, 111, 260],
                            [260, 32, 259, 260, 0],
                            [256, 108, 108, 260, 0],
                            [260, 256, 260, 0, 0]]
    F, T = False, True
    assert mask.tolist() == [[F, F, T, T, T], [F, T, T, T, F], [F, F, T, T, F], [F, T, T, F, F]]
    ids, mask = data.collate_sft([([1, 2], [3]), ([4], [5, 6, 7])], pad_id=9)
    assert ids.tolist() == [[1, 2, 3, 9], [4, 5, 6, 7]]
    assert mask.tolist() == [[F, F, T, F], [F, T, T, T]]


def test_truncation_cuts_prompt_start_then_response_end(capsys):
    """Prompt "hello hello hello hello" -> [259, 32,259, 32,259, 32,259] (7 ids);
    chosen " hello hello" -> [32,259,32,259,260] (5); rejected " hell" ->
    [32,258,260] (3). block 10, min 3: keep max(10-5, 3) = 5 prompt ids (its
    end), responses fit. block 7: keep max(2, 3) = 3 prompt ids, room 4 -> the
    chosen loses its eot, the rejected fits. Then a pair that becomes identical
    after the cut (" hello hello" vs " hello hell", room 2 -> both [32, 259])
    and, with min_prompt_tokens >= block, one with no room left."""
    enc = _toy_bpe()
    pair = {"prompt": "hello hello hello hello", "chosen": " hello hello", "rejected": " hell"}
    assert data.tokenize_pairs([pair], enc, 10, min_prompt_tokens=3) == [
        ([259, 32, 259, 32, 259], [32, 259, 32, 259, 260], [32, 258, 260])]
    assert capsys.readouterr().out.strip() == \
        "tokenized 1 pairs (block_size 10): prompt cut in 1, responses cut in 0, skipped 0"
    assert data.tokenize_pairs([pair], enc, 7, min_prompt_tokens=3) == [
        ([259, 32, 259], [32, 259, 32, 259], [32, 258, 260])]
    assert capsys.readouterr().out.strip() == \
        "tokenized 1 pairs (block_size 7): prompt cut in 1, responses cut in 1, skipped 0"
    same = {"prompt": "hello hello hello hello", "chosen": " hello hello", "rejected": " hello hell"}
    assert data.tokenize_pairs([same], enc, 5, min_prompt_tokens=3) == []
    assert data.tokenize_pairs([pair], enc, 4, min_prompt_tokens=4) == []
    out = capsys.readouterr().out.strip().split("\n")
    assert out == ["tokenized 0 pairs (block_size 5): prompt cut in 1, responses cut in 1, skipped 1 (identical=1)",
                   "tokenized 0 pairs (block_size 4): prompt cut in 1, responses cut in 0, skipped 1 (no_room=1)"]


def test_get_tokenizer_bytes_and_offline_gpt2():
    """"bytes": ids are UTF-8 bytes ("hé" -> 104, 0xC3, 0xA9), eot 256, n_vocab
    257, and "<|endoftext|>" in text stays plain bytes. The offline GPT-2 file
    gives the known ids "Hello world" -> [15496, 995] and eot 50256. An unknown
    name fails with a hint at the offline .tiktoken path."""
    enc = data.get_tokenizer("bytes")
    assert (enc.n_vocab, enc.eot_token) == (257, 256)
    assert enc.encode_ordinary("hé") == [104, 0xC3, 0xA9]
    assert enc.encode_ordinary("<|endoftext|>") == list(b"<|endoftext|>")
    with pytest.raises(ValueError, match=r"\.tiktoken"):
        data.get_tokenizer("no-such-encoding")
    if not os.path.exists(GPT2_PATH):
        pytest.skip(f"offline GPT-2 BPE not found at {GPT2_PATH}")
    gpt2 = data.get_tokenizer(GPT2_PATH)
    assert gpt2.encode_ordinary("Hello world") == [15496, 995]
    assert (gpt2.eot_token, gpt2.n_vocab) == (50256, 50257)


# -----------------------------------------------------------------------------
# splits and batches

def test_split_by_prompt_keeps_prompts_whole_and_is_deterministic():
    """40 items over 10 prompts: ceil(0.25 * 10) = 3 prompts (12 items) go to
    val, the other 7 prompts to train; no prompt on both sides; same seed ->
    same split; with 2 prompts and a tiny fraction val still gets 1 prompt."""
    items = [{"prompt": f"p{i % 10}", "k": i} for i in range(40)]
    train, val = data.split_by_prompt(items, 0.25, seed=3)
    assert len({x["prompt"] for x in val}) == 3 and len(val) == 12 and len(train) == 28
    assert not {x["prompt"] for x in train} & {x["prompt"] for x in val}
    assert (train, val) == data.split_by_prompt(items, 0.25, seed=3)
    assert data.split_by_prompt(items, 0.25, seed=4) != (train, val)
    two = [{"prompt": "a"}, {"prompt": "b"}]
    assert [len(s) for s in data.split_by_prompt(two, 0.01, seed=0)] == [1, 1]
    assert data.split_by_prompt(two, 0.0, seed=0) == (two, [])


def test_batches_determinism_resume_and_rank_sharding():
    """10 examples, global batch 4 -> 2 steps an epoch, the last 2 dropped;
    each epoch reshuffles. Same seed -> same stream; a new Batches loaded with
    a state_dict continues exactly; ranks 0 and 1 with batch 2 concatenated
    (rank 0 first) equal one process with batch 4, batch by batch."""
    ex = list(range(10))
    def stream(b, n):
        return [b.next() for _ in range(n)]
    a = stream(data.Batches(ex, 4, seed=1), 6)
    assert a == stream(data.Batches(ex, 4, seed=1), 6) and a != stream(data.Batches(ex, 4, seed=2), 6)
    assert all(len(set(x)) == 4 for x in a) and a[:2] != a[2:4]
    assert len(set(a[0] + a[1])) == 8  # an epoch never repeats an example
    b = data.Batches(ex, 4, seed=1)
    stream(b, 3)
    state = b.state_dict()
    assert state == {"epoch": 1, "pos": 4}
    c = data.Batches(ex, 4, seed=1)
    c.load_state_dict(state)
    assert stream(c, 3) == a[3:]
    r0, r1 = (data.Batches(ex, 2, seed=1, rank=r, world_size=2) for r in (0, 1))
    assert [x + y for x, y in zip(stream(r0, 6), stream(r1, 6))] == a
    with pytest.raises(ValueError, match="global batch"):
        data.Batches(ex, 4, seed=0, world_size=3)


# -----------------------------------------------------------------------------
# the reviews task

def test_reward_by_hand_and_garbage():
    """funny +1, "not dull" -> -(-1) = +1: total +2. "very awful" -1, "not
    superb" -1, "boring" -1: -3. Case-insensitive words; "notfunny" is no word
    (0). Garbage scores finitely and is invalid; the grammar examples are valid."""
    assert data.reward("p", " funny, and the plot was not dull.") == 2.0
    assert data.reward("p", " very awful, but the acting was not superb and the cast was boring.") == -3.0
    assert data.reward("", "FUNNY funny notfunny") == 2.0
    for junk in ["", "\x00\ufffd garbage!!", "not not not", "🎬" * 50, " funny funny funny."]:
        assert math.isfinite(data.reward("p", junk)) and not data.is_valid(junk)
    assert data.is_valid(" funny, and the plot was not dull.")
    assert data.is_valid(" funny, and the plot was not dull.<|endoftext|>")


def test_make_task_is_deterministic_valid_and_ranked():
    """Same seed -> identical task, other seed -> different. Every generated
    response parses, every pair has chosen reward > rejected reward, counts
    match the arguments, and no val or eval prompt is ever a train or sft prompt."""
    t = data.make_task(seed=5, n_sft=500, n_pairs=400, n_val_pairs=100, n_eval_prompts=300)
    keys = ("sft", "train", "val", "eval_prompts")
    assert all(t[k] == v for k, v in zip(keys, (data.make_task(5, 500, 400, 100, 300)[k] for k in keys)))
    assert data.make_task(6, 500, 400, 100, 300)["train"] != t["train"]
    assert [len(t[k]) for k in keys] == [500, 400, 100, 300]
    responses = [r for _, r in t["sft"]] + [p[s] for p in t["train"] + t["val"] for s in ("chosen", "rejected")]
    assert all(t["is_valid"](r) for r in responses)
    assert all(t["reward"](p["prompt"], p["chosen"]) > t["reward"](p["prompt"], p["rejected"])
               for p in t["train"] + t["val"])
    seen = {p["prompt"] for p in t["train"]} | {p for p, _ in t["sft"]}
    assert not seen & ({p["prompt"] for p in t["val"]} | set(t["eval_prompts"]))
    assert all(p.endswith((" felt", " was", " seemed")) for p in seen)


def test_make_task_defaults_are_fast_and_varied():
    """The default task builds in < 5 s; latent tones give every reward from
    -4 to +4 (1 + up to 3 adjectives) in the sft data; eval prompts >= 256."""
    start = time.time()
    t = data.make_task()
    assert time.time() - start < 5
    assert {data.reward(p, r) for p, r in t["sft"]} == {float(x) for x in range(-4, 5)}
    assert len(t["eval_prompts"]) >= 256


def test_corrupted_responses_are_mostly_invalid():
    """Changing one random character breaks the grammar always (measured: 100%);
    dropping a word does unless the word was an optional "not"/"very"/"truly"
    (measured: ~92% invalid). Require >= 80% invalid for each corruption."""
    rng = random.Random(0)
    responses = [r for _, r in data.make_task(seed=1, n_sft=300, n_pairs=0, n_val_pairs=0)["sft"]]
    def change_char(r):
        i = rng.randrange(len(r))
        return r[:i] + rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz ,." if c != r[i]]) + r[i + 1:]
    def drop_word(r):
        words = r.split(" ")
        i = rng.randrange(1, len(words))
        return " ".join(words[:i] + words[i + 1:])
    for corrupt in (change_char, drop_word):
        bad = [not data.is_valid(corrupt(r)) for r in responses]
        assert sum(bad) >= 0.8 * len(bad), (corrupt.__name__, sum(bad))


# ================================================================================================
# the closed-form optimum, end to end
#
# The closed-form DPO optimum, checked by actually minimising the loss.
#
# Setting. A few prompts x, each with K candidate responses y; a tabular policy
# pi_theta(y|x) = softmax(theta[x]) with theta a free (n_prompts, K) table; a fixed, non-uniform
# reference pi_ref(y|x); known rewards r(x, y). Every ordered pair (y_i, y_j), i != j, of the same
# prompt is sampled with weight w_ij > 0 and labelled by Bradley-Terry: y_i wins with probability
# p_ij = sigmoid(r_i - r_j). The EXACT expected DPO loss is then
#
#     E(theta) = sum_{x, i != j} w_ij * [ p_ij * L(i beats j) + (1 - p_ij) * L(j beats i) ],
#
# with L(a beats b) = dpo_loss(log pi(a), log pi(b), log pi_ref(a), log pi_ref(b), beta), the
# project's own function, evaluated on all pairs at once.
#
# Why the minimiser is pi_ref * exp(r/beta) / Z. dpo_loss sees the policy only through the implicit
# reward margin m_ij = beta * [log(pi_i/ref_i) - log(pi_j/ref_j)]: L(i beats j) = -log sigmoid(m_ij)
# and L(j beats i) = -log sigmoid(-m_ij). Grouping the two orders of each unordered pair, the
# pair's term is a binary cross-entropy between the label distribution (p_ij, 1 - p_ij) and the
# model's (sigmoid(m_ij), 1 - sigmoid(m_ij)); by Gibbs' inequality it is smallest exactly when
# sigmoid(m_ij) = p_ij = sigmoid(r_i - r_j), i.e. m_ij = r_i - r_j. All pairs can meet this at once:
# it holds for every pair iff beta * log(pi/pi_ref) = r + c(x) for some per-prompt constant c(x).
# So pi = pi_ref * exp(r/beta) * exp(c(x)/beta), and normalising over y forces exp(-c(x)/beta) =
# Z(x) = sum_y pi_ref exp(r/beta). Since every pair's term is individually minimal there, this is
# the minimiser for ANY positive pair weights w_ij (the weights only matter when the policy
# class cannot match every margin). In theta the minimiser is unique only up to adding a
# per-prompt constant to theta[x] -- the same freedom as c(x) -- which softmax absorbs, so the
# probabilities are unique and that is what we compare.
#
# Problem chosen here: 2 prompts, K = 5, pair weights w_ij = pi_ref(y_i) pi_ref(y_j) (pairs drawn
# from the reference, as in practice). The rewards are in [-0.6, 0.9]; the optimum's probabilities
# lie in [0.038, 0.41] at beta = 0.5 and [0.098, 0.27] at beta = 2.0, up to 0.31 resp. 0.09 away
# from pi_ref and 0.21 resp. 0.10 away from uniform, so the check is neither trivial nor near a
# degenerate 0/1 corner (the helper below asserts this, so a later edit of the numbers can't
# quietly weaken the test). beta = 1 is deliberately avoided: there exp(r/beta) = exp(r*beta).

DTYPE = torch.float64
BETAS = (0.5, 2.0)


def make_problem():
    """(log pi_ref, rewards), both (2, 5) float64. Fixed numbers: nothing random to seed here."""
    ref = torch.tensor([[0.35, 0.25, 0.20, 0.12, 0.08],
                        [0.10, 0.30, 0.15, 0.25, 0.20]], dtype=DTYPE)
    rewards = torch.tensor([[-0.5, 0.2, 0.6, -0.3, 0.9],
                            [0.8, -0.6, 0.3, 0.0, -0.4]], dtype=DTYPE)
    return ref.log(), rewards


def closed_form(log_ref, rewards, beta):
    """pi_ref * exp(r/beta) / Z, per prompt."""
    return torch.softmax(log_ref + rewards / beta, dim=-1)


def expected_dpo_loss(theta, log_ref, rewards, beta):
    """Exact expected DPO loss of the tabular policy softmax(theta) over all ordered pairs i != j
    of each prompt, pairs weighted by pi_ref(y_i) pi_ref(y_j), labels by Bradley-Terry."""
    n, K = theta.shape
    log_pi = torch.log_softmax(theta, dim=-1)
    x, i, j = torch.meshgrid(torch.arange(n), torch.arange(K), torch.arange(K), indexing="ij")
    off = i != j
    x, i, j = x[off], i[off], j[off]                          # every ordered pair, flattened
    w = (log_ref[x, i] + log_ref[x, j]).exp()
    p_i_wins = torch.sigmoid(rewards[x, i] - rewards[x, j])
    loss_i_wins, _, _ = dpo_loss(log_pi[x, i], log_pi[x, j], log_ref[x, i], log_ref[x, j], beta)
    loss_j_wins, _, _ = dpo_loss(log_pi[x, j], log_pi[x, i], log_ref[x, j], log_ref[x, i], beta)
    return (w * (p_i_wins * loss_i_wins + (1 - p_i_wins) * loss_j_wins)).sum()


def minimise(log_ref, rewards, beta, seed=0):
    """Minimise the expected loss over theta from a seeded random start with float64 L-BFGS.
    The loss is convex in theta (a sum of -log sigmoid of linear functions of theta), so L-BFGS
    with a strong-Wolfe line search converges reliably (max |grad| ~1e-8, the loss's float64
    resolution, leaving ~1e-8 error in the probabilities); the flat direction (a per-prompt shift
    of theta) leaves the probabilities unchanged and does no harm."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(log_ref.shape, generator=g, dtype=DTYPE).requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, history_size=20,
                            tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = expected_dpo_loss(theta, log_ref, rewards, beta)
        loss.backward()
        return loss

    opt.step(closure)        # ~20 evaluations; stops when the loss stalls at float64 resolution
    assert theta.grad.abs().max() < 1e-6, "L-BFGS did not converge"
    return theta.detach()


def check_problem_is_informative(log_ref, rewards, beta):
    """Guard on the chosen numbers: the optimum is away from pi_ref, from uniform and from 0/1,
    and the wrong exponent exp(r*beta) would give clearly different probabilities."""
    target = closed_form(log_ref, rewards, beta)
    K = target.shape[-1]
    assert (target - log_ref.exp()).abs().max() > 0.05
    assert (target - 1 / K).abs().max() > 0.05
    assert target.min() > 0.03 and target.max() < 0.5
    assert (target - torch.softmax(log_ref + rewards * beta, -1)).abs().max() > 0.05
    return target


@pytest.mark.parametrize("beta", BETAS)
def test_minimiser_of_expected_dpo_loss_is_closed_form(beta):
    torch.manual_seed(0)
    log_ref, rewards = make_problem()
    target = check_problem_is_informative(log_ref, rewards, beta)
    theta = minimise(log_ref, rewards, beta)
    learned = torch.softmax(theta, dim=-1)
    err = (learned - target).abs().max().item()
    assert err < 1e-3, f"beta={beta}: max |pi_learned - pi_ref*exp(r/beta)/Z| = {err:.3e}"


@pytest.mark.parametrize("beta", BETAS)
def test_closed_form_is_stationary_and_beats_alternatives(beta):
    """The converse direction, without any optimiser: at theta* = log pi_ref + r/beta the gradient
    vanishes, the loss equals its theoretical floor (the weighted Bradley-Terry label entropy,
    reached because every pair's margin matches), and pi_ref or a perturbed optimum does worse."""
    torch.manual_seed(0)
    log_ref, rewards = make_problem()
    theta_star = (log_ref + rewards / beta).requires_grad_(True)
    loss_star = expected_dpo_loss(theta_star, log_ref, rewards, beta)
    (grad,) = torch.autograd.grad(loss_star, theta_star)
    assert grad.abs().max() < 1e-12

    # floor: sum_{x, i != j} w_ij * H(p_ij), the entropy of the labels themselves
    K = rewards.shape[-1]
    off = ~torch.eye(K, dtype=torch.bool)
    w = (log_ref[:, :, None] + log_ref[:, None, :]).exp()
    p = torch.sigmoid(rewards[:, :, None] - rewards[:, None, :])
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    floor = (w * entropy)[:, off].sum()
    torch.testing.assert_close(loss_star.detach(), floor, rtol=1e-12, atol=1e-12)

    # a per-prompt shift of theta changes nothing (the non-uniqueness that softmax absorbs)
    shifted = theta_star.detach() + torch.tensor([[3.0], [-7.0]], dtype=DTYPE)
    torch.testing.assert_close(expected_dpo_loss(shifted, log_ref, rewards, beta), loss_star.detach(),
                               rtol=1e-12, atol=1e-12)

    with torch.no_grad():
        assert expected_dpo_loss(log_ref, log_ref, rewards, beta) > loss_star + 1e-4
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            bump = 0.1 * torch.randn(theta_star.shape, generator=g, dtype=DTYPE)
            bump -= bump.mean(-1, keepdim=True)               # a real change of the probabilities
            assert expected_dpo_loss(theta_star + bump, log_ref, rewards, beta) > loss_star


# ================================================================================================
# train.py: a tiny end-to-end run, resume, DDP, configuration errors, online DPO and judges

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=160", "--batch_size=8", "--sft_batch_size=16",
        "--eval_pairs=32", "--eval_samples=8", "--max_new_tokens=24", "--show_samples=1", "--log_interval=1",
        "--dtype=float32", "--warmup_iters=2"]


def run_train(out, *args):
    return train.main(TINY + [f"--out_dir={out}", *args])


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run from scratch: SFT, DPO, evaluation. Its ref.pt serves the other tests."""
    out = str(tmp_path_factory.mktemp("tiny"))
    result = run_train(out, "--sft_iters=80", "--sft_lr=3e-3", "--dpo_iters=16", "--dpo_lr=5e-4", "--beta=0.5", "--eval_interval=8")
    return out, result


def test_train_smoke(tiny_run):
    """The files appear; at DPO step 1 the policy IS the reference, so every implicit reward is 0,
    the loss is exactly log 2 = 0.693147 and no pair is ranked right (accuracy 0, ties count as
    wrong). After 16 steps at a high learning rate the loss has fallen and the held-out accuracy
    is well above the 0.5 of a coin."""
    out, result = tiny_run
    for f in ("ref.pt", "ckpt.pt", "config.json", "metrics.jsonl", "eval.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    with open(os.path.join(out, "eval.json")) as f:
        ev = json.load(f)
    for k in ("policy_reward", "reference_reward", "win_rate", "kl", "valid_fraction", "pref_accuracy", "wall_seconds"):
        assert k in ev and math.isfinite(ev[k]), k
    dpo = [r for r in read_metrics(out) if r["stage"] == "dpo"]
    assert dpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert dpo[0]["rewards/accuracies"] == 0.0 and dpo[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert sum(r["loss"] for r in dpo[-4:]) / 4 < math.log(2) - 0.1
    assert ev["pref_accuracy"] > 0.6
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["step"] == 16 and ck["config"]["dpo_iters"] == 16
    assert not any(k.startswith("_orig_mod.") for k in ck["model"])


def test_resume_matches_uninterrupted_run(tiny_run, tmp_path):
    """6 DPO steps in one go, and 3 steps + stop + resume for 3 more, give the same per-step
    losses (same weights, optimizer state, batches and RNG after the restart)."""
    ref = os.path.join(tiny_run[0], "ref.pt")
    common = [f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=6", "--dpo_lr=1e-3", "--eval_samples=4"]
    run_train(tmp_path / "a", *common)
    run_train(tmp_path / "b", *common, "--stop_at=3")
    assert not os.path.exists(tmp_path / "b" / "eval.json")  # a stopped run does not evaluate
    run_train(tmp_path / "b", *common[1:], "--init_from=resume")
    la = [r["loss"] for r in read_metrics(tmp_path / "a") if r["stage"] == "dpo"]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b") if r["stage"] == "dpo"]
    assert len(la) == len(lb) == 6
    assert la == pytest.approx(lb, abs=1e-6)


def test_ddp_matches_single_process(tiny_run, tmp_path):
    """torchrun with 2 CPU processes (gloo), 4 pairs each, 1 micro-step, equals one process with
    4 pairs x 2 micro-steps: the same 8 pairs per step, gradients averaged the same way, so the
    updates after 3 steps agree to float tolerance: |w_ddp - w_single| / |w_single - w_0| < 1e-3.
    (Not elementwise: the key bias gets a gradient that is exactly 0 in exact arithmetic, since a
    constant added to every key's score cancels in the softmax; Adam divides the ~1e-10 rounding
    noise by its own tiny scale and turns it into updates of either sign.)"""
    ref = os.path.join(tiny_run[0], "ref.pt")
    common = [f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=3", "--dpo_lr=1e-3", "--batch_size=4",
              "--grad_accum=2", "--eval_samples=4"]
    run_train(tmp_path / "single", *common)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *TINY, *common, f"--out_dir={tmp_path / 'ddp'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    a = torch.load(tmp_path / "single" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["model"]
    start = torch.load(ref, weights_only=True)["model"]
    moved = sum(((a[k] - start[k]) ** 2).sum() for k in a).sqrt()
    apart = sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt()
    assert moved > 0.1 and apart / moved < 1e-3, (moved, apart)


@pytest.mark.parametrize("arg, message", [
    ("--beta", "use --key=value"),
    ("--betta=0.1", "unknown setting 'betta'; valid settings: data, tokenizer"),
    ("--beta=abc", "bad value for --beta: 'abc' is not a float"),
    ("--beta=0", "bad value for --beta: 0.0 (must be > 0)"),
    ("--online=maybe", "bad value for --online"),
    ("--loss_type=kto", "bad value for --loss_type"),
    ("--optimizer=sgd", "bad value for --optimizer"),
    ("--judge=nocolon", "bad value for --judge"),
])
def test_bad_config_values(arg, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.parse_config([arg])


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    shown = capsys.readouterr().out
    assert all(f"--{k}=" in shown for k in train.CONFIG)


def test_eval_only_samples_a_checkpoint(tiny_run, capsys):
    out = tiny_run[0]
    res = train.main(TINY + [f"--init_from={out}/ckpt.pt", "--eval_only=True", f"--out_dir={out}",
                             "--prompt=Honestly, the comedy felt"])
    shown = capsys.readouterr().out
    assert "policy: 'Honestly, the comedy felt' ->" in shown and "reference: " in shown
    assert 0 <= res["win_rate"] <= 1 and "kl" in res


def prefer_shorter(prompt, a, b):
    """A toy judge for the tests: the shorter response wins; equal lengths tie."""
    return None if len(a) == len(b) else (0 if len(a) < len(b) else 1)


def judge_that_raises(prompt, a, b):
    raise RuntimeError("reward model offline")


def test_online_dpo_with_a_pluggable_judge(tiny_run, tmp_path):
    """Online DPO: fresh pairs from the policy, labelled by a toy judge given as module:function.
    Every step logs how many pairs the judge labelled and how many ties it skipped; the run ends
    with the usual evaluation (win rate under that judge)."""
    ref = os.path.join(tiny_run[0], "ref.pt")
    res = run_train(tmp_path, f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=4", "--online=True",
                    "--judge=test_dpo:prefer_shorter", "--eval_samples=8")
    dpo = [r for r in read_metrics(tmp_path) if r["stage"] == "dpo"]
    assert len(dpo) == 4 and dpo[-1]["online_pairs"] + dpo[-1]["online_ties"] == 4 * 8
    assert dpo[-1]["online_pairs"] > 0 and 0 <= res["win_rate"] <= 1


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:judge", "--judge=no_such_module_xyz:judge: cannot load it"),
    ("test_dpo:no_such_function", "--judge=test_dpo:no_such_function: cannot load it"),
    ("test_dpo:judge_that_raises", "judge test_dpo:judge_that_raises raised RuntimeError: reward model offline"),
])
def test_bad_judges_name_themselves(tiny_run, tmp_path, spec, message):
    ref = os.path.join(tiny_run[0], "ref.pt")
    with pytest.raises(SystemExit, match=re.escape(message)):
        run_train(tmp_path, f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=2", "--online=True", f"--judge={spec}")


# ================================================================================================
# speed paths must not change the numbers

def test_bf16_autocast_keeps_the_loss():
    """bf16 autocast (the CPU default where it is faster) against fp32 on the same batch, with a
    policy that differs from its reference: log-probs are summed in fp32 (cross_entropy upcasts),
    so the DPO loss agrees to ~1e-2 and the gradient points the same way (cosine > 0.99)."""
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
    assert abs(out["fp32"][0] - out["bf16"][0]) < 1e-2
    assert torch.nn.functional.cosine_similarity(out["fp32"][1], out["bf16"][1], dim=0) > 0.99


def test_bench_quick(capsys):
    """bench.py --quick runs and ends with one JSON line holding every figure."""
    import bench
    bench.main(["--quick"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    assert res["ceiling_gflops"]["fp32"] > 0 and len(res["dpo_step"]) == 2
    assert all(r["sec_per_step"] > 0 and 0 < r["mfu"] < 1.5 for r in res["dpo_step"])
    assert [s["cache"] for s in res["sampling"]] == [True, False]


@pytest.mark.parametrize("args, first_loss", [
    (["--loss_type=sigmoid", "--label_smoothing=0.2", "--optimizer=rmsprop", "--precompute_ref=True"], math.log(2)),
    (["--loss_type=ipo", "--beta=0.5"], 1.0),
    (["--loss_type=hinge"], 1.0),
    (["--reference_free=True"], None),
    (["--method=preferred_ft"], None),
])
def test_every_loss_type_trains(tiny_run, tmp_path, args, first_loss):
    """At DPO step 1 the policy is the reference, so h = 0 and the first loss is known by hand:
    conservative DPO -(1-eps) log sigmoid(0) - eps log sigmoid(0) = log 2 whatever eps;
    IPO (0 - 1/(2*0.5))^2 = 1; hinge relu(1 - 0) = 1. Reference-free DPO and Preferred-FT start
    elsewhere (the policy's own log-likelihoods); for them the run must simply stay finite."""
    ref = os.path.join(tiny_run[0], "ref.pt")
    res = run_train(tmp_path, f"--init_from={ref}", "--sft_iters=0", "--dpo_iters=3", "--eval_samples=4", *args)
    dpo = [r for r in read_metrics(tmp_path) if r["stage"] == "dpo"]
    if first_loss is not None:
        assert dpo[0]["loss"] == pytest.approx(first_loss, abs=1e-5)
    assert all(math.isfinite(r["loss"]) for r in dpo) and math.isfinite(res["val_loss"])


def test_train_from_a_gpt2_folder(tmp_path):
    """--init_from=<Hugging Face GPT-2 folder> runs SFT, DPO and evaluation on the loaded weights,
    and a tokenizer whose vocabulary does not match the checkpoint's stops with a message."""
    m = tiny_model(seed=10, vocab_size=257, n_embd=64, block_size=160)
    folder = tmp_path / "gpt2-tiny"
    folder.mkdir()
    write_config(folder, m.config)
    write_safetensors(folder / "model.safetensors", hf_state_dict(m, True))
    res = run_train(tmp_path / "run", f"--init_from={folder}", "--sft_iters=3", "--dpo_iters=2", "--eval_samples=4")
    assert math.isfinite(res["kl"]) and 0 <= res["win_rate"] <= 1
    toy = tmp_path / "toy.tiktoken"  # tiktoken's format: base64 token, rank; 256 bytes + 2 merges -> 259 ids
    toy.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(
        [bytes([i]) for i in range(256)] + [b"th", b"the"])))
    with pytest.raises(SystemExit, match=r"vocabulary \(257\) does not match tokenizer .*toy.tiktoken.* \(259 tokens\)"):
        run_train(tmp_path / "run2", f"--init_from={folder}", f"--tokenizer={toy}")
    with pytest.raises(SystemExit, match="error: .*missing.tiktoken: no such .tiktoken file"):
        run_train(tmp_path / "run3", f"--tokenizer={tmp_path / 'missing.tiktoken'}")
    with pytest.raises(SystemExit, match="error: .*nope.jsonl"):
        run_train(tmp_path / "run4", f"--data={tmp_path / 'nope.jsonl'}")
