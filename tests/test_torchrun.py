"""`sdepure certify` under torchrun: 2 processes on the CPU (gloo), each certifying one shard,
rank 0 merging; the result equals the single-process run row for row, also after a resume.
The launch is the README's own command, so what the README tells users to type is what runs."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from sdepure import runs

TIMEOUT = 600  # two processes importing torch on a loaded 2-core machine can be slow
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_torchrun_commands():
    """The words after `torchrun` of every torchrun command in README.md's sh blocks."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "torchrun" in words:
                commands.append(words[words.index("torchrun") + 1:])
    return commands


def documented_launch():
    """The README's single-node launch up to the command (`... -m sdepure_cli --`), on 2 processes."""
    (words,) = [w for w in readme_torchrun_commands() if "--standalone" in w and "--resume" not in w]
    words = words[:words.index("certify")]
    (i,) = [i for i, w in enumerate(words) if w in ("--nproc_per_node", "--nproc-per-node")]
    words[i + 1] = "2"
    return words


def torchrun(args, cwd, command="certify"):
    """The documented torchrun --standalone (a free port of its own) command, 2 processes, COMMAND ARGS."""
    script = Path(sys.executable).parent / "torchrun"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([*launcher, *documented_launch(), command, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def cells(path):
    return [line.split("\t")[:5] for line in path.read_text().splitlines()]


def test_readme_torchrun_commands_put_double_dash_before_the_command():
    """Without `--`, torchrun refuses `--n` and `--start` as ambiguous abbreviations of its options."""
    commands = readme_torchrun_commands()
    assert len(commands) == 3  # the run, its resume, the SLURM job
    for words in commands:
        i = words.index("sdepure_cli")
        assert words[i - 1:i + 3] == ["-m", "sdepure_cli", "--", "certify"], words


def test_double_dash_before_the_command_is_accepted_and_errors_stay_one_line(tiny, run_cli, cli_error):
    """torchrun's argparse drops the `--` (Python 3.11); should another version pass it on, sdepure takes it."""
    code, out, err = run_cli("--", "certify", "--help")
    assert code == 0 and "--start" in out, err
    cli_error("n must be", "--", "certify", "--config", str(tiny), "--n", "0")


def test_two_processes_equal_one_row_for_row_and_resume(tiny, tmp_path, run_cli):
    # --start and --n are prefixes of torchrun's --start-method, --nnodes, ...: they must reach sdepure
    args = ["--config", str(tiny), "--start", "1", "--stop", "10", "--n", "10", "--seed", "4"]
    code, _, err = run_cli("certify", *args, "--out", str(tmp_path / "single"))
    assert code == 0, err
    single = cells(tmp_path / "single" / "certify.tsv")

    # no --out: rank 0 names the default directory (it carries a time stamp) for both processes
    proc = torchrun(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "sdepure-runs").iterdir()
    assert cells(run / "certify.tsv") == single
    settings = runs.load_record(run)["settings"]
    assert (settings["start"], settings["n"]) == (1, 10)
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


def test_attack_under_two_processes_equals_one_process_and_resumes(tiny, tmp_path, run_cli):
    """`sdepure attack` under torchrun: rank r attacks batches r, r+2, ...; rank 0 merges; the
    examples and the summary equal the single-process run's (seconds and memory aside)."""
    from sdepure import report

    def rows(run):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in report.read_example_rows(run / "examples.tsv")]

    args = ["--config", str(tiny), "--pgd", "--pgd-steps", "2", "--eot", "2", "--n-examples", "7", "--batch", "2",
            "--score-draws", "2", "--eps", "0.1", "--seed", "3"]
    code, _, err = run_cli("attack", *args, "--out", str(tmp_path / "single"))
    assert code == 0, err
    proc = torchrun([*args, "--out", str(tmp_path / "two")], cwd=tmp_path, command="attack")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "two"
    assert rows(run) == rows(tmp_path / "single")
    for r in (0, 1):
        assert {x["batch"] for x in rows(run / f"shard-{r}-of-2")} == {b for b in range(4) if b % 2 == r}
    a, b = (json.loads((d / "summary.json").read_text()) for d in (run, tmp_path / "single"))
    for key in ("scored_over_draws", "accuracy_after_each_attack", "max_perturbation", "robust_accuracy"):
        assert a[key] == b[key], key
    assert "[rank 1/2] shard 1/2 done" in proc.stdout
    # as after a kill: rank 1's shard lost its rows, nothing merged yet
    report.write_example_rows(run / "shard-1-of-2" / "examples.tsv", [], False)
    (run / "summary.json").unlink()
    proc = torchrun(["--resume", str(run)], cwd=tmp_path, command="attack")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rows(run) == rows(tmp_path / "single")
