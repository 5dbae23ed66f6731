"""Attack runs resume batch by batch: a real `sdepure attack` killed with SIGKILL mid-batch and
resumed gives an uninterrupted run's examples.tsv and summary (seconds and memory aside)."""
import json
import signal

import pytest
import torch

from sdepure import report, runs

from helpers import kill_9_after

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
    # killed once the first batch's rows are on disk, inside the second batch
    assert kill_9_after(["attack", *args, "--out", str(run)], run / "examples.tsv", 3) == -signal.SIGKILL
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
        needle, extra = "is a sdepure certify run, not an attack run", []
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


def test_shards_merge_to_the_whole_run(tiny, tmp_path, run_cli):
    """Shards attack every n-th batch; merged, rows (sorted by example), summary and table equal
    the whole run's, recomputed from the rows; adversarial.pt too."""
    args = ["--config", str(tiny), *ARGS, "--n-examples", "10", "--save-adv"]  # 5 batches, the last of 2
    _ok(run_cli, *args, "--out", str(tmp_path / "whole"))
    for i in (1, 0, 2):
        _ok(run_cli, *args, "--shard", f"{i}/3", "--out", str(tmp_path / f"s{i}"))
        assert {r["batch"] for r in _rows(tmp_path / f"s{i}")} == {b for b in range(5) if b % 3 == i}
    code, stdout, err = run_cli("merge", *(str(tmp_path / f"s{i}") for i in (2, 0, 1)), "--out", str(tmp_path / "m"))
    assert code == 0, err
    assert "10 examples" in stdout
    assert _rows(tmp_path / "m") == _rows(tmp_path / "whole")
    merged, whole = _summary(tmp_path / "m"), _summary(tmp_path / "whole")
    assert merged.pop("merged_from") and merged == whole
    a, b = (torch.load(tmp_path / d / "adversarial.pt") for d in ("m", "whole"))
    assert torch.equal(a["x_adv"], b["x_adv"]) and torch.equal(a["idx"], b["idx"]) and torch.equal(a["y"], b["y"])


@pytest.mark.parametrize("case", ["unfinished shard", "missing shard", "certify with attack", "other settings"])
def test_attack_merge_refusals(tiny, tmp_path, run_cli, cli_error, case):
    args = ["--config", str(tiny), *ARGS]
    _ok(run_cli, *args, "--shard", "0/2", "--out", str(tmp_path / "s0"))
    dirs = [tmp_path / "s0"]
    if case == "missing shard":
        needle = "shard(s) 1/2 missing"
    elif case == "certify with attack":
        code, _, err = run_cli("certify", "--config", str(tiny), "--out", str(tmp_path / "c"))
        assert code == 0, err
        dirs.append(tmp_path / "c")
        needle = "one is an attack run, the other a certify run"
    else:
        extra = ["--eps", "0.2"] if case == "other settings" else []
        _ok(run_cli, *args, *extra, "--shard", "1/2", "--out", str(tmp_path / "s1"))
        dirs.append(tmp_path / "s1")
        if case == "unfinished shard":
            rows = report.read_example_rows(tmp_path / "s1" / "examples.tsv")
            report.write_example_rows(tmp_path / "s1" / "examples.tsv", rows[:2], False)
            needle = "is unfinished (1 of 2 batches)"
        else:
            needle = "setting eps differs (0.1 against 0.2)"
    cli_error(needle, "merge", *map(str, dirs), "--out", str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("shard,needle", [("3/2", "shard index must be < 2"), ("x", "--shard")])
def test_attack_bad_shard_is_one_line_and_writes_nothing(tiny, tmp_path, cli_error, shard, needle):
    cli_error(needle, "attack", "--config", str(tiny), *ARGS, "--shard", shard, "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
