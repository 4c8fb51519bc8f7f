"""The GPU rehearsal (tests/_gpu_rehearsal.py) catches what it is for, and passes GPU tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

PROBES = """
import torch


def test_a_cpu_reference_against_a_gpu_result():
    out = torch.randn(4, 3).cuda()
    ref = torch.randn(4, 3)
    out - ref


def test_assert_close_across_devices():
    torch.testing.assert_close(torch.ones(3, device="cuda"), torch.ones(3))


def test_numpy_of_a_gpu_tensor():
    torch.zeros(2).cuda().numpy()


def test_what_cuda_allows():
    x = torch.randn(4, 3, device="cuda")
    m = torch.nn.Linear(3, 2).cuda()
    w = torch.ones(4).to(x.device)  # on x's device, whichever it is
    y = m(x) * w[:, None] + torch.tensor(2.0)  # a 0-dim CPU tensor is allowed
    z = torch.empty_like(x).copy_(torch.randn(4, 3))  # copies move between devices
    torch.testing.assert_close(y.cpu(), y.detach().cpu().clone())
    assert torch.cuda.is_available() and x[torch.tensor([0, 2])].shape == (2, 3)
    assert isinstance(torch.Generator("cuda"), torch.Generator)
    assert z.numel() == 12 and isinstance(y.sum().item(), float)
"""


def rehearse(*args, cuda_as_cpu=False, record=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    env.pop("LRML_REHEARSE_CUDA_AS_CPU", None)
    env.pop("LRML_REHEARSE_RECORD", None)
    if cuda_as_cpu:
        env["LRML_REHEARSE_CUDA_AS_CPU"] = "1"
    if record:
        env["LRML_REHEARSE_RECORD"] = str(record)
    cmd = [sys.executable, "-m", "pytest", "-p", "_gpu_rehearsal", "-p", "no:cacheprovider"]
    return subprocess.run([*cmd, "-q", *args], capture_output=True, text=True, env=env,
                          cwd=TESTS.parent, timeout=600)  # fmt: skip


def test_the_rehearsal_fails_device_mixes_as_cuda_would(tmp_path):
    probes = tmp_path / "test_probes.py"
    probes.write_text(PROBES)
    r = rehearse(str(probes), "--rootdir", str(tmp_path))
    out = r.stdout + r.stderr
    assert "3 failed, 1 passed" in out, out
    assert "rehearsal: TensorBase.sub mixes CUDA tensors and CPU tensors [(4, 3)]" in out, out
    assert "rehearsal: assert_close of a CUDA and a CPU tensor" in out, out
    assert "rehearsal: can't convert a CUDA tensor to numpy" in out, out


def test_gpu_tests_pass_the_rehearsal():
    # one triton and one cuda case of the GPU matrix (fp32 at d = 37, N = 7, B = 1, C = 13); the
    # cuda backend is the C++ CPU library here
    case = "tests/test_gpu_matrix.py::test_kernel_variant_gpu[{}-l1-shared-fp32]"
    r = rehearse(case.format("triton"))
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr
    assert "ran on CPU rehearsal" in r.stdout
    r = rehearse(case.format("cuda"), cuda_as_cpu=True)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr


def test_recorded_launches_take_the_gpu_shapes_and_compile_for_sm90(tmp_path):
    # LRML_REHEARSE_RECORD: the launches of a GPU test with the GPU's launch shapes, which
    # kernel_report.py --launches compiles for sm_90 (fp32 at d = 37, N = 7, B = 1023, C = 1:
    # the shared forward and the backward)
    record = tmp_path / "launches.jsonl"
    case = "tests/test_gpu_matrix.py::test_kernel_variant_gpu[triton-l1-shared-fp32]"
    r = rehearse(case, record=record)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr
    launches = [json.loads(line) for line in record.read_text().splitlines()]
    kernels = {rec["name"]: rec for rec in launches}
    assert set(kernels) == {"_lrml_shared_forward_kernel", "_lrml_backward_kernel"}, kernels
    assert all(rec["test"] == case for rec in launches)
    fwd, bwd = kernels["_lrml_shared_forward_kernel"], kernels["_lrml_backward_kernel"]
    # block_config's GPU shapes (the interpreter's are 512-row blocks with no warps)
    assert (fwd["kwargs"]["BLOCK_B"], fwd["kwargs"]["num_warps"]) == (16, 4), fwd
    assert (bwd["kwargs"]["BLOCK_B"], bwd["kwargs"]["num_warps"]) == (16, 8), bwd
    assert fwd["grid"] == [64] and fwd["kwargs"]["BLOCK_C"] == 1
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "benchmarks/kernel_report.py", "--launches", str(record),
           "--json", str(out), "--quiet", "--jobs", "1"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=TESTS.parent,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads(out.read_text())["rows"]
    assert sorted(r["kernel"] for r in rows) == sorted(kernels), rows
    for row in rows:
        assert row["arch"].startswith("sm_90") and row["registers"] > 0, row
        assert row["tests"] == [case] and row["launches"] == 1
        assert not row["spills"], row
