"""On a CUDA device (skipped elsewhere; scripts/gpu_check.sh runs these on a lent GPU): the compiled
Triton kernels against the torch path, the merge certificate exactly 0.0 through the whole chain, and
a training run stopped by SIGTERM resuming bit for bit, all with kernels=triton on the GPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from layers import random_qlinear

from lotaqaf_cli.core.ternary import TernaryLinear

pytestmark = pytest.mark.cuda


def _layer(d_in, d_out, bits, gs, act_order, seed):
    return random_qlinear(d_in, d_out, bits, gs, seed=seed, act_order=act_order, bias=True, zeros="fractional",
                          scales=(0.005, 0.02)).cuda()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("rows", [1, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qmm_cuda_against_torch(bits, act_order, rows, dtype, mode):
    q = _layer(1024, 1000, bits, 64, act_order, seed=bits)
    x = torch.randn(rows, 1024, device="cuda").to(dtype)
    mode("triton")
    y = q(x)
    mode("torch")
    ref = (x.double() @ q.dequantize().double() + q.bias.double())
    err = (y.double() - ref).abs().max().item() / ref.abs().max().item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ternary_step_cuda_against_torch(bits, mode):
    base = _layer(512, 384, bits, 64, act_order=True, seed=10 + bits)
    layer = TernaryLinear(base, 16, 4.0, generator=torch.Generator().manual_seed(bits)).cuda()
    with torch.no_grad():
        layer.B_T.copy_(torch.randint(-1, 2, layer.B_T.shape, generator=torch.Generator().manual_seed(1)).float())
    mode("torch")
    i_ref, v_ref, mu_ref, b_ref = layer._markers_mu(layer.A_T, layer.B_T)
    mode("triton")
    i, v, mu, b = layer._markers_mu(layer.A_T, layer.B_T)
    assert i_ref.numel() > 0 and int(b) == int(b_ref)
    o, o_ref = torch.argsort(i), torch.argsort(i_ref)
    assert torch.equal(i[o], i_ref[o_ref]) and torch.equal(v[o], v_ref[o_ref])
    torch.testing.assert_close(mu, mu_ref, rtol=0, atol=0)  # omega 4: integer sums either way


def _train(run_dir, *extra):
    return [sys.executable, "-m", "lotaqaf_cli", "train", "recipe=smoke", f"run.dir={run_dir}", "device=cuda",
            "kernels=triton", "optim.steps=60", "optim.save_every=3", *extra]


def test_chain_certificate_and_resume_on_cuda(tmp_path):
    """The whole smoke chain on the GPU (quantize, train, merge): certificate exactly 0.0 in memory and
    from disk; a run stopped by SIGTERM after its first checkpoint resumes to the same adapter."""
    import json

    from lotaqaf_cli.io.adapter import read_adapter

    env = {**os.environ, "LOTAQAF_QUIET": "1"}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(_train("runs/full", "stages=[quantize,train,merge]"), env=env, cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cert = json.loads((tmp_path / "runs/full/merge_certificate.json").read_text())
    assert cert["max_abs_logit_diff"] == 0.0 and cert["max_abs_layer_diff_from_disk"] == 0.0
    assert cert["probe"]["device"] == "cuda" and cert["probe"]["kernels"] == "triton"

    proc = subprocess.Popen(_train("runs/termed", "stages=[quantize,train]"), env=env, cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True)
    ckpts = tmp_path / "runs/termed/checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(ckpts.glob("step_*/state.pt")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 143, err
    r = subprocess.run(_train("runs/termed", "stages=[quantize,train]", "resume=true"), env=env, cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _, full = read_adapter(tmp_path / "runs/full/adapter.safetensors")
    _, resumed = read_adapter(tmp_path / "runs/termed/adapter.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
