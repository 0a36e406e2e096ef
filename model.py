"""
A GPT-2 language model, small enough to read in one sitting.

Parameter names follow the Hugging Face GPT-2 layout (transformer.wte, transformer.h.0.attn.c_attn,
...), so `GPT.from_pretrained` maps a real GPT-2 checkpoint onto it with only a transpose of the
Conv1D weights. The model returns logits for every position: DPO scores whole responses, not just
the next token. `generate` samples a batch of prompts of different lengths with a key/value cache.
"""
import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime import atomic_write, write_json


@dataclass
class GPTConfig:
    vocab_size: int = 257      # 256 bytes + <|endoftext|>; 50257 for GPT-2's BPE
    block_size: int = 256      # longest sequence the position table covers
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True          # GPT-2 has biases in its Linear and LayerNorm layers


class CausalSelfAttention(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, attn_mask=None, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            # write this step's keys/values at their slots, then attend over everything so far
            t0 = cache["pos"]
            if cache["k"] is None:  # allocated on first use, in the dtype autocast gives k and v
                cache["k"] = k.new_empty(B, self.n_head, cache["size"], C // self.n_head)
                cache["v"] = torch.empty_like(cache["k"])
            cache["k"][:, :, t0:t0 + T] = k
            cache["v"][:, :, t0:t0 + T] = v
            k, v = cache["k"][:, :, :t0 + T], cache["v"][:, :, :t0 + T]
        dropout_p = self.dropout if self.training else 0.0
        dtype, fp32_attn = q.dtype, q.device.type == "cpu" and q.dtype == torch.bfloat16
        if fp32_attn:
            # PyTorch's CPU attention kernel is about 2x slower in bf16 than in fp32 (fwd+bwd,
            # measured here); autocast would cast back to bf16, so it is switched off for this op
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if fp32_attn else nullcontext():
            if attn_mask is None:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.to(dtype).transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's GELU


class Block(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, cache)  # pre-LayerNorm residual blocks
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings
        self.grad_checkpoint = False  # True: keep only each block's input for backward, recompute the rest
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                # each block adds two residual branches: shrink them so the residual stream's
                # variance does not grow with depth (GPT-2 paper, section 2.3)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def crop_block_size(self, block_size):
        """Keep the first `block_size` positions of the position table (as nanoGPT does): a loaded
        GPT-2 trained at 1024 then runs, and is saved, at a shorter context."""
        if block_size > self.config.block_size:
            raise ValueError(f"block_size {block_size} is longer than the model's {self.config.block_size}")
        self.config = replace(self.config, block_size=block_size)
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())  # the tied lm_head is counted once
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden(self, idx, pos=None, attn_mask=None, cache=None):
        """Final-LayerNorm hidden states (B, T, C). `pos`, `attn_mask` and `cache` are for generate."""
        B, T = idx.shape
        if pos is None:
            t0 = 0 if cache is None else cache[0]["pos"]
            if t0 + T > self.config.block_size:
                raise ValueError(f"sequence of length {t0 + T} is longer than block_size {self.config.block_size}")
            pos = torch.arange(t0, t0 + T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, use_reentrant=False)  # same dropout masks
            else:
                x = block(x, attn_mask, None if cache is None else cache[i])
        if cache is not None:
            for c in cache:
                c["pos"] += T
        return self.transformer.ln_f(x)

    def forward(self, idx, select=None):
        """Logits (B, T, vocab) for token ids (B, T); with a boolean `select` (B, T), only the
        logits of the selected positions, (N, vocab) in row-major order: DPO scores only the
        response, and the output layer is the costliest matmul for a 50k vocabulary.

        No padding mask is needed for right-padded batches: attention is causal, so a real token
        never sees the padding that comes after it, and the padded positions' own outputs are
        masked out of every loss."""
        h = self.hidden(idx)  # (B, T, C)
        return self.lm_head(h if select is None else h[select])

    # ----------------------------------------------------------------------------------------
    # sampling

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, eos_id=None,
                 use_cache=True, generator=None):
        """Sample continuations of a batch of token-id lists of different lengths.

        Prompts are left-padded so that every row's last prompt token sits in the same column;
        each row keeps its own positions (0, 1, ... from its first real token) and pad keys are
        masked out, so a row's result does not depend on the rest of the batch. A row stops at
        `eos_id` (which it keeps). temperature=0 means greedy. Returns a list of new-token lists.
        """
        device = self.transformer.wte.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token")
        total = P + max_new_tokens
        if total > self.config.block_size:
            raise ValueError(f"longest prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds block_size {self.config.block_size}")
        idx = torch.zeros(B, total, dtype=torch.long, device=device)
        valid = torch.zeros(B, total, dtype=torch.bool, device=device)  # which columns hold real tokens
        for b, p in enumerate(prompts):
            idx[b, P - len(p):P] = torch.tensor(p, dtype=torch.long)
            valid[b, P - len(p):] = True  # generated columns are all real
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, total) per-row positions
        causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
        # a query may attend to earlier real keys and always to itself (so an all-pad row is never empty)
        mask = (causal & valid[:, None, :]) | torch.eye(total, dtype=torch.bool, device=device)
        mask = mask[:, None]  # (B, 1, total, total)
        cache = [dict(k=None, v=None, pos=0, size=total) for _ in self.transformer.h] if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=device)
        t = 0  # columns already fed to the model (cached path)
        for cur in range(P, total):
            if use_cache:
                h = self.hidden(idx[:, t:cur], pos[:, t:cur], mask[:, :, t:cur, :cur], cache)
                t = cur
            else:
                h = self.hidden(idx[:, :cur], pos[:, :cur], mask[:, :, :cur, :cur])
            logits = self.lm_head(h[:, -1]).float()  # (B, vocab): only the last position is needed
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(1)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            idx[:, cur] = nxt
            if eos_id is not None:
                done |= nxt == eos_id
                if done.all():
                    total = cur + 1
                    break
        out = []
        for row in idx[:, P:total].tolist():
            if eos_id is not None and eos_id in row:
                row = row[:row.index(eos_id) + 1]
            out.append(row)
        return out

    # ----------------------------------------------------------------------------------------
    # loading a Hugging Face GPT-2 checkpoint folder, without the transformers package

    @classmethod
    def from_pretrained(cls, path, dropout=0.0):
        """Load `path/config.json` plus `model.safetensors` or `pytorch_model.bin`."""
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"{cfg_file}: not found (expected a Hugging Face GPT-2 folder)")
        try:
            with open(cfg_file) as f:
                hf = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
        if not isinstance(hf, dict):
            raise ValueError(f"{cfg_file}: expected a JSON object, got {type(hf).__name__}")
        for field in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"):
            if field not in hf:
                raise ValueError(f"{cfg_file}: missing field '{field}'")
            if type(hf[field]) is not int or hf[field] < 1:
                raise ValueError(f"{cfg_file}: field '{field}' is {hf[field]!r}, not a whole number > 0")
        if hf["n_embd"] % hf["n_head"]:
            raise ValueError(f"{cfg_file}: field 'n_head' ({hf['n_head']}) does not divide 'n_embd' ({hf['n_embd']})")
        cfg = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                        n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout, bias=True)
        st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
        if os.path.isfile(st):
            sd, src = load_safetensors(st), st
        elif os.path.isfile(pt):
            try:  # weights_only: never unpickle code
                sd, src = torch.load(pt, map_location="cpu", weights_only=True), pt
            except Exception as e:
                raise ValueError(f"{pt}: not a readable PyTorch weights file ({type(e).__name__})") from None
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise ValueError(f"{pt}: not a state dict of tensors")
        else:
            raise FileNotFoundError(f"{path}: neither model.safetensors nor pytorch_model.bin found")
        model = cls(cfg)
        ours = model.state_dict()
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        loaded = set()
        for key, w in sd.items():
            k = key if key.startswith("transformer.") or key == "lm_head.weight" else "transformer." + key
            if k.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # legacy causal-mask buffers, not weights
            if k == "lm_head.weight":
                continue  # tied to wte
            if k not in ours:
                raise ValueError(f"{src}: key '{key}' does not map onto any parameter of GPT")
            if k.endswith(transposed):
                w = w.t()  # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
            if w.shape != ours[k].shape:
                raise ValueError(f"{src}: '{key}' has shape {tuple(w.shape)}, expected {tuple(ours[k].shape)}")
            with torch.no_grad():
                ours[k].copy_(w.to(torch.float32))
            loaded.add(k)
        missing = [k for k in ours if k not in loaded and k != "lm_head.weight"]
        if missing:
            raise ValueError(f"{src}: no weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return model

    def save_pretrained(self, path):
        """Write a Hugging Face GPT-2 folder, the inverse of from_pretrained: config.json and
        model.safetensors with HF's names, the Conv1D weights transposed back to (in, out), the tied
        lm_head left out (HF ties it again). `transformers.GPT2LMHeadModel.from_pretrained(path)`
        reads it."""
        os.makedirs(path, exist_ok=True)
        c = self.config
        hf = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=c.vocab_size, n_positions=c.block_size,
                  n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, n_inner=None,
                  activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, bos_token_id=c.vocab_size - 1, eos_token_id=c.vocab_size - 1, tie_word_embeddings=True)
        write_json(os.path.join(path, "config.json"), hf)
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        sd = {k: (w.t() if k.endswith(transposed) else w) for k, w in self.state_dict().items() if k != "lm_head.weight"}
        save_safetensors(os.path.join(path, "model.safetensors"), sd)


class ScalarGPT(GPT):
    """The GPT trunk with a scalar head in place of next-token logits (the tied lm_head stays, unused):
    a reward model reads it at the last token of prompt + response (Ouyang et al. 2022, arXiv:2203.02155),
    PPO's value function at every position that predicts a response token. The head starts at zero, so
    every score starts at 0 (a reward model's first Bradley-Terry loss is log 2)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.score_head = nn.Linear(cfg.n_embd, 1)
        nn.init.zeros_(self.score_head.weight)
        nn.init.zeros_(self.score_head.bias)

    def forward(self, idx, select=None):
        """Scores (B, T) for token ids (B, T), or (N,) at the positions `select` marks, in fp32."""
        h = self.hidden(idx)  # (B, T, C)
        h = (h if select is None else h[select]).float()
        with torch.autocast(h.device.type, enabled=False):  # a score of bf16 precision would make ties
            return self.score_head(h).squeeze(-1)

    @classmethod
    def from_model(cls, model):
        """A ScalarGPT with `model`'s weights: from a GPT with a new zero head (a reward or value model
        to train), from a ScalarGPT with its head (PPO-RM's value model starts as the reward model)."""
        out = cls(model.config).to(next(model.parameters()).device)
        missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("score_head.") for k in missing)
        return out


# ---------------------------------------------------------------------------------------------------
# reading safetensors without the safetensors package

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def save_safetensors(path, tensors):
    """Write a .safetensors file (the layout load_safetensors reads), atomically."""
    names = {v: k for k, v in _ST_DTYPES.items()}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0  # transformers reads the format
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.int16 if t.dtype == torch.bfloat16 else t.dtype).numpy().tobytes()
        dtype = "BF16" if t.dtype == torch.bfloat16 else names[np.dtype(t.numpy().dtype).type]
        header[name] = dict(dtype=dtype, shape=list(t.shape), data_offsets=[offset, offset + len(raw)])
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header so the data starts 8-byte aligned

    def write(f):
        f.write(len(head).to_bytes(8, "little") + head)
        for raw in blobs:
            f.write(raw)
    atomic_write(path, write)


def load_safetensors(path):
    """Read a .safetensors file: an 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then the raw little-endian tensor bytes."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: too short to be a safetensors file")
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    body = memoryview(data)[8 + n:]
    return {name: _tensor(path, name, info, body) for name, info in header.items() if name != "__metadata__"}


def _tensor(path, name, info, body):
    """One tensor of a safetensors file from its header entry, every field checked."""
    where = f"{path}: tensor '{name}'"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise ValueError(f"{where}: its header entry needs dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype != "BF16" and dtype not in _ST_DTYPES:
        raise ValueError(f"{where} has unsupported dtype {dtype}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"{where}: field 'shape' is {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= len(body)):
        raise ValueError(f"{where}: field 'data_offsets' {offsets!r} is not a range of the file's {len(body)} data bytes")
    raw, width = body[offsets[0]:offsets[1]], 2 if dtype == "BF16" else np.dtype(_ST_DTYPES[dtype]).itemsize
    if len(raw) != width * math.prod(shape):
        raise ValueError(f"{where} has {len(raw)} bytes for shape {shape} of {dtype}")
    if dtype == "BF16":  # numpy has no bfloat16: read the raw 16 bits and reinterpret
        return torch.from_numpy(np.frombuffer(raw, dtype=np.int16).copy()).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.frombuffer(raw, dtype=_ST_DTYPES[dtype]).copy()).reshape(shape)
