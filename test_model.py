"""
Tests of model.py: causality, initialisation, cached and batched generation, GPT-2 checkpoint
loading, and the bf16 speed path. Expected values are derived in each docstring.
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

import pytest
import tiktoken
import torch

from dpo import concatenated_logps, dpo_loss
from model import GPT, GPTConfig, load_safetensors


HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_model(seed=0, **kw):
    """A 2-layer, 16-wide GPT over a 37-token vocabulary, in eval mode (no dropout)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=37, block_size=64, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


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
