"""
Tests of bench.py: its FLOP count against torch's counter, and the quick benchmark's figures.
"""
import json

import pytest
import torch

import bench
from conftest import tiny_model
from dpo import concatenated_logps, dpo_loss


def test_dpo_step_flops_match_a_flop_counter():
    """bench's FLOP count of a DPO step against torch's FlopCounterMode on a real step (2 layers,
    C = 64, V = 257, 4 pairs of 32 + 64 tokens, live reference), where the count is exact: the
    counter sees every matmul (linear layers: 2 FLOPs per weight and token; the output layer only at
    the 4*2*64 positions that predict a response token; backward 2x forward), but has no formula
    for the CPU attention kernel, so attention's 2 * 2*B*T*T*C per layer and forward is added by
    hand: x3 for the policy's forward and backward, x1 for the reference."""
    from torch.utils.flop_counter import FlopCounterMode
    L, C, V, B, P, R = 2, 64, 257, 4, 32, 64
    pol, ref = tiny_model(n_layer=L, n_embd=C, vocab_size=V, block_size=P + R), tiny_model(n_layer=L, n_embd=C, vocab_size=V, block_size=P + R)
    ref.requires_grad_(False)
    ids = torch.randint(0, V, (2 * B, P + R))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, P:] = True
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            rc, rr, _, _ = concatenated_logps(ref, ids, mask)
        pc, pr, _, _ = concatenated_logps(pol, ids, mask)
        dpo_loss(pc, pr, rc, rr)[0].mean().backward()
    attention = L * 2 * 2 * (2 * B) * (P + R) ** 2 * C
    assert bench.dpo_step_flops(pol, ids, mask, precomputed=False) == counter.get_total_flops() + 4 * attention
    assert bench.dpo_step_flops(pol, ids, mask, precomputed=True) == 3 * (bench.dpo_step_flops(pol, ids, mask, False) // 4)


def test_bench_quick(capsys):
    """bench.py --quick runs and ends with one JSON line holding every figure; each MFU is the
    step's FLOPs over its time and the dtype's measured ceiling."""
    bench.main(["--quick"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    assert res["ceiling_gflops"]["fp32"] > 0 and len(res["dpo_step"]) == 2
    for r in res["dpo_step"]:
        assert r["mfu"] == pytest.approx(r["tflop_per_step"] * 1e3 / r["sec_per_step"] / res["ceiling_gflops"][r["dtype"]])
    assert [s["cache"] for s in res["sampling"]] == [True, False]
    p = res["ppo"][0]  # the PPO iteration's parts add up to its total
    assert p["sample_s"] + p["score_s"] + p["update_s"] == pytest.approx(p["total_s"])
    assert p["sample_share"] == pytest.approx(p["sample_s"] / p["total_s"])
