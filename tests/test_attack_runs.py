"""Attack runs resume batch by batch: a real `sdepure attack` killed with SIGKILL mid-batch and
resumed gives an uninterrupted run's examples.tsv and summary (seconds and memory aside)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sdepure import report, runs

TIMING = {"seconds"}  # per-example columns that depend on the machine


def _rows(run):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in report.read_example_rows(run / "examples.tsv")]


def _summary(run):
    s = json.loads((run / "summary.json").read_text())
    for key in ("wall_seconds", "attack_seconds", "peak_memory_mb", "device"):
        s.pop(key, None)
    for row in s["table"]:
        row.pop("seconds"), row.pop("peak_memory_mb")
    return s


def _ok(run_cli, *args):
    code, stdout, err = run_cli("attack", *args)
    assert code == 0, err
    return stdout


ARGS = ["--pgd", "--pgd-steps", "3", "--eot", "2", "--n-examples", "8", "--batch", "2", "--score-draws", "3",
        "--eps", "0.1", "--seed", "6"]


def test_kill_9_mid_batch_then_resume_equals_an_uninterrupted_run(tiny, tmp_path, run_cli):
    run = tmp_path / "killed"
    args = ["--config", str(tiny), *ARGS, "--pgd-steps", "40"]  # batches long enough to be killed inside one
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sdepure_cli", "attack", *args, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            tsv = run / "examples.tsv"
            if tsv.exists() and tsv.read_bytes().count(b"\n") >= 3:  # header and the first batch
                break
            time.sleep(0.005)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = report.read_example_rows(run / "examples.tsv")
    assert 2 <= len(done) < 8 and not (run / "summary.json").exists()
    with open(run / "examples.tsv", "a") as fh:  # a batch torn mid-write: one whole row of it and a half
        fh.write("\t".join(report._cell(c, v) for c, v in {**done[0], "idx": 6, "batch": 3}.items()) + "\n6\t1\t")
    stdout = _ok(run_cli, "--resume", str(run))
    assert f"{len({r['batch'] for r in done})} of 4 batches done" in stdout
    _ok(run_cli, *args, "--out", str(tmp_path / "whole"))
    assert _rows(run) == _rows(tmp_path / "whole")
    assert [r["idx"] for r in _rows(run)] == list(range(8))
    assert _summary(run) == _summary(tmp_path / "whole")


def test_a_batch_attacked_alone_gives_the_rows_it_gets_in_the_whole_run(tiny, tmp_path, run_cli):
    """A batch's rows depend on (settings, batch) only: the last batch of a run, resumed after
    the others' rows were dropped, is the same whatever ran before it in the process."""
    whole = tmp_path / "whole"
    _ok(run_cli, "--config", str(tiny), *ARGS, "--out", str(whole))
    part = tmp_path / "part"
    _ok(run_cli, "--config", str(tiny), *ARGS, "--out", str(part))
    rows = report.read_example_rows(part / "examples.tsv")
    report.write_example_rows(part / "examples.tsv", [r for r in rows if r["batch"] in (0, 3)], False)
    _ok(run_cli, "--resume", str(part))
    assert _rows(part) == _rows(whole)


@pytest.mark.parametrize("case", ["certify run", "not a run", "flag with resume", "save-adv"])
def test_attack_resume_refusals_change_nothing(tiny, tmp_path, run_cli, cli_error, case):
    run = tmp_path / "run"
    if case == "certify run":
        code, _, err = run_cli("certify", "--config", str(tiny), "--out", str(run))
        assert code == 0, err
        needle, extra = "is a sdepure certify run, not a attack run", []
    elif case == "not a run":
        run.mkdir()
        (run / "notes.txt").write_text("x")
        needle, extra = "is not a sdepure attack run", []
    else:
        _ok(run_cli, "--config", str(tiny), *ARGS, "--out", str(run))
        (run / "summary.json").unlink()
        if case == "flag with resume":
            needle, extra = "drop --eps", ["--eps", "0.2"]
        else:
            needle, extra = "started without --save-adv", ["--save-adv"]
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    cli_error(needle, "attack", "--resume", str(run), *extra)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_library_resume_with_other_settings_is_refused_naming_the_setting(tiny, tmp_path, run_cli):
    from sdepure import experiments
    from sdepure.config import load_config
    from sdepure.errors import SdepureError
    from sdepure.settings import attack_from_config

    run = tmp_path / "run"
    _ok(run_cli, "--config", str(tiny), *ARGS, "--out", str(run))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    cfg = load_config(str(tiny))
    settings = attack_from_config(cfg, "pgd", {"pgd_steps": 3, "eot": 2, "n_examples": 8, "batch": 2,
                                               "score_draws": 3, "eps": "0.2", "seed": 6})
    with pytest.raises(SdepureError, match="setting eps differs"):
        experiments.attack(cfg, settings, "cpu", run, resume=True)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_one_log_line_per_finished_batch(tiny, tmp_path, run_cli):
    code, stdout, err = run_cli("attack", "--config", str(tiny), *ARGS, "--out", str(tmp_path / "run"))
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("attack: ")]
    assert [line.split(",")[0] for line in lines] == [f"attack: {k}/8 examples" for k in (2, 4, 6, 8)]
    assert all("robust so far attack" in line and "any-of-N" in line and "ETA" in line for line in lines)
    assert "\r" not in err  # not a terminal: lines only
