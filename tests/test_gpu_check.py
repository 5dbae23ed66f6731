"""benchmarks/gpu_check.py, the one-command GPU check, kept alive on a machine without CUDA: it
says so and exits 0; its CPU self-test (every check CPU against CPU) runs, prints JSON and exits
0; a comparison made to fail, or a check that raises, exits non-zero."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
SELF_TEST = ["--device", "cpu", "--quick", "--skip-throughput"]
CHECK_NAMES = {
    "cpu_stream_solves_mlp", "cpu_stream_solves_adm", "device_stream_normal", "device_stream_reproducible",
    "device_stream_solves_in_distribution", "autocast_bf16", "autocast_fp16", "channels_last", "grad_exact",
    "grad_exact_recomputed", "grad_exact_densepure", "grad_adjoint", "grad_ode_adjoint", "adjoint_vs_exact",
    "early_stop_vote", "certify_rows_cpu_stream", "no_sync_per_step", "torchrun_2_ranks"}


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so_and_exits_0(gpu_check, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as here, on any machine
    assert gpu_check.main([]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1
    result = json.loads(out)
    assert result["cuda"] is False and result["checks"] == {} and result["failed"] == []
    assert "no CUDA device" in err and "--device cpu" in err


def test_cpu_self_test_runs_every_check_prints_json_and_exits_0(gpu_check, capsys, tmp_path):
    out_file = tmp_path / "gpu_check.json"
    code = gpu_check.main([*SELF_TEST, "--out", str(out_file)])
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert code == 0, (result["failed"], err[-3000:])
    assert json.loads(out_file.read_text()) == result
    assert result["self_test"] is True and result["device"] == "cpu" and result["throughput"] is None
    checks = result["checks"]
    assert set(checks) == CHECK_NAMES
    for name, res in checks.items():
        assert {"pass", "difference", "tolerance", "what"} <= set(res), name
        if name == "torchrun_2_ranks":  # 2 processes on the CPU only without --quick
            assert res["pass"] is None and res["skipped"]
        else:
            assert res["pass"] is True, (name, res)
    # CPU against CPU agrees exactly where the device must only agree to rounding
    assert checks["cpu_stream_solves_mlp"]["difference"] == 0.0
    assert checks["device_stream_normal"]["equals_cpu_stream"] is True
    assert checks["grad_exact_recomputed"]["solver_grad"] == "exact"  # recomputation did run
    # the early stop saved classifier rows, with the full vote's labels
    rows = checks["early_stop_vote"]["classifier_rows"]
    assert rows["early"] < rows["full"]
    assert result["failed"] == [] and result["passed"] == len(CHECK_NAMES) - 1


def test_a_broken_comparison_exits_non_zero(gpu_check, capsys, monkeypatch):
    """Tolerance 0 and a difference injected into the measure: the check fails, the exit is 1."""
    real = gpu_check.max_abs
    monkeypatch.setitem(gpu_check.TOL, "solve_mlp", 0.0)
    monkeypatch.setattr(gpu_check, "max_abs", lambda a, b: real(a, b) + 1e-9)
    assert gpu_check.main([*SELF_TEST, "--only", "cpu_stream_solves"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["failed"] == ["cpu_stream_solves_mlp"]
    entry = result["checks"]["cpu_stream_solves_mlp"]
    assert entry["pass"] is False and entry["difference"] > entry["tolerance"] == 0.0


def test_a_check_that_raises_fails_and_the_others_still_run(gpu_check, capsys, monkeypatch):
    def broken(ctx):
        raise RuntimeError("injected")
    monkeypatch.setitem(gpu_check.CHECKS, "channels_last", (broken, True))
    assert gpu_check.main([*SELF_TEST, "--only", "channels_last,device_stream"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["failed"] == ["channels_last"]
    assert "RuntimeError: injected" in result["checks"]["channels_last"]["error"]
    assert result["checks"]["device_stream_normal"]["pass"] is True
