"""`sdepure certify` under torchrun: 2 processes on the CPU (gloo), each certifying one shard,
rank 0 merging; the result equals the single-process run row for row, also after a resume."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from sdepure import runs

TIMEOUT = 600  # two processes importing torch on a loaded 2-core machine can be slow


def torchrun(args, cwd):
    """torchrun --standalone (a free port of its own) --nproc_per_node 2 -m sdepure_cli ..."""
    script = Path(sys.executable).parent / "torchrun"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([*launcher, "--standalone", "--nproc_per_node", "2", "-m", "sdepure_cli", "certify",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def cells(path):
    return [line.split("\t")[:5] for line in path.read_text().splitlines()]


def test_two_processes_equal_one_row_for_row_and_resume(tiny, tmp_path, run_cli):
    args = ["--config", str(tiny), "--stop", "9", "--seed", "4"]
    code, _, err = run_cli("certify", *args, "--out", str(tmp_path / "single"))
    assert code == 0, err
    single = cells(tmp_path / "single" / "certify.tsv")

    # no --out: rank 0 names the default directory (it carries a time stamp) for both processes
    proc = torchrun(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "sdepure-runs").iterdir()
    assert cells(run / "certify.tsv") == single
    assert sorted(p.name for p in run.iterdir()) == ["certified_accuracy.png", "certify.tsv", "run.json",
                                                     "shard-0-of-2", "shard-1-of-2", "summary.json"]
    for r in (0, 1):
        shard = cells(run / f"shard-{r}-of-2" / "certify.tsv")
        assert shard[1:] == single[1:][r::2]  # rank r certified images r, r+2, ...
    err_lines = proc.stderr.splitlines()
    assert "\r" not in proc.stderr
    for r in (0, 1):  # one log line per finished image, naming the process
        assert len([line for line in err_lines if line.startswith(f"[rank {r}/2] image ")]) == (5 if r == 0 else 4)
    assert "wrote" in proc.stdout and "[rank 1/2] shard 1/2 done" in proc.stdout

    # as after a kill: rank 1 never began, rank 0 has one row and a torn one, nothing merged yet
    shutil.rmtree(run / "shard-1-of-2")
    tsv0 = run / "shard-0-of-2" / "certify.tsv"
    lines = tsv0.read_text().splitlines(keepends=True)
    tsv0.write_text("".join(lines[:2]) + lines[2][:5])
    for name in ("certify.tsv", "summary.json", "certified_accuracy.png"):
        (run / name).unlink()
    proc = torchrun(["--resume", str(run)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cells(run / "certify.tsv") == single
    assert runs.load_record(run)["world_size"] == 2
