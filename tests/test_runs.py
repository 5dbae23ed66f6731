"""Run directories: the record, torn rows, resume checks, shards and merging (sdepure.runs), and
progress lines (sdepure.progress)."""
import io
import json
import os
import signal

import pytest

from sdepure import runs
from sdepure.errors import SdepureError
from sdepure.progress import Progress, format_seconds
from sdepure.smoothing import format_row

from helpers import kill_9_after

SETTINGS = {"purifier": {"method": "densepure", "sigma": 0.5, "votes": 3}, "n0": 4, "n": 12, "seed": 0}
CFG = {"name": "tiny", "source": "/x/tiny.toml", "model": {"family": "m", "weights": "/w.pt"},
       "classifier": {"family": "c"}, "data": {"dataset": "digits"}, "attack": {"eps": "1/2"}}


def row(i, label=1, predict=1, radius=0.25, correct=1, time=0.5, draws=16, calls=480):
    return {"idx": i, "label": label, "predict": predict, "radius": radius, "correct": correct, "time": time,
            "draws": draws, "calls": calls}


def record(images, shard=None, world_size=1, **changes):
    settings = json.loads(json.dumps(SETTINGS))
    settings.update(changes)
    return runs.make_record(settings, CFG, images, shard, world_size, device="cpu")


# -- shards ---------------------------------------------------------------------------------

def test_parse_shard_and_select():
    s = runs.parse_shard("1/3")
    assert (s.index, s.count, str(s), s.dirname) == (1, 3, "1/3", "shard-1-of-3")
    assert s.select([10, 11, 12, 13, 14, 15, 16]) == [11, 14]
    # the shards partition any selection, each image in exactly one
    images = list(range(5, 40, 3))
    parts = [runs.parse_shard(f"{i}/4").select(images) for i in range(4)]
    assert sorted(sum(parts, [])) == images
    assert runs.parse_shard("0/1").select(images) == images


@pytest.mark.parametrize("text, needle", [("1-3", "i/n"), ("a/b", "i/n"), ("1/", "i/n"), ("-1/3", "i/n"),
                                          ("3/3", "must be < 3"), ("5/2", "must be < 2"), ("0/0", ">= 1"),
                                          ("1.5/3", "i/n")])
def test_parse_shard_refuses(text, needle):
    with pytest.raises(SdepureError, match=needle.replace("/", "/").replace("(", r"\(")):
        runs.parse_shard(text)


# -- certify.tsv: torn last lines ---------------------------------------------------------------

def write_tsv(path, rows, tail=""):
    path.write_text(runs.TSV_HEADER_COST + "\n" + "".join(format_row(r) for r in rows) + tail)


def test_rows_round_trip(tmp_path):
    rows = [row(3, radius=0.123456, time=1.23456), row(7, predict=-1, radius=0.0, correct=0)]
    write_tsv(tmp_path / "t.tsv", rows)
    back, good, torn = runs.read_rows(tmp_path / "t.tsv")
    assert not torn and good == (tmp_path / "t.tsv").stat().st_size
    assert [r["idx"] for r in back] == [3, 7] and back[0]["radius"] == 0.1235 and back[1]["predict"] == -1


@pytest.mark.parametrize("tail", ["12\t3\t3\t0.2", "12\t3\t3\t0.2500\t1\t0.1", "1", "12\t3\t3\t0.25\t1\t0.1\t9\n",
                                  "12\t3\t3\tzz\t1\t0.1\n", "\n", "\x00\x00\x00"])
def test_torn_last_line_is_dropped(tmp_path, tail):
    """No trailing newline, or a last line with the wrong field count or an unparsable field."""
    path = tmp_path / "t.tsv"
    write_tsv(path, [row(0), row(4)])
    complete = path.stat().st_size
    path.write_text(path.read_text() + tail)
    rows, good, torn = runs.read_rows(path)
    assert [r["idx"] for r in rows] == [0, 4] and good == complete and torn


def test_a_table_from_before_the_cost_columns_reads_resumes_and_merges_in_its_form(tmp_path):
    """Cohen's six columns alone (runs written before issue 14): read, a torn row repaired, rows
    appended by a resume in the same six columns, shards merged into six columns."""
    old = [{k: v for k, v in row(j).items() if k not in ("draws", "calls")} for j in (0, 2)]
    path = tmp_path / "t.tsv"
    path.write_text(runs.TSV_HEADER + "\n" + "".join(format_row(r, cost=False) for r in old) + "4\t1\t")
    back, good, torn = runs.read_rows(path)
    assert [r["idx"] for r in back] == [0, 2] and torn and "draws" not in back[0]
    assert not runs.has_cost_columns(path) and runs.has_cost_columns(tmp_path / "new.tsv")
    run = tmp_path / "run"
    rec = record([0, 2, 4])
    runs.start(run, rec)
    (run / "certify.tsv").write_text(path.read_text())
    assert [r["idx"] for r in runs.resume(run, rec)] == [0, 2]
    assert (run / "certify.tsv").read_text().splitlines()[0] == runs.TSV_HEADER  # still Cohen's form
    runs.write_rows(tmp_path / "merged.tsv", old + [row(4)])  # a row without the columns: none get them
    assert (tmp_path / "merged.tsv").read_text().splitlines()[0] == runs.TSV_HEADER
    assert [r["idx"] for r in runs.read_rows(tmp_path / "merged.tsv")[0]] == [0, 2, 4]


def test_torn_or_missing_header_reads_as_empty(tmp_path):
    path = tmp_path / "t.tsv"
    assert runs.read_rows(path) == ([], 0, False)
    path.write_text(runs.TSV_HEADER_COST[:7])
    assert runs.read_rows(path) == ([], 0, True)


def test_malformed_middle_line_or_foreign_file_is_an_error(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text(runs.TSV_HEADER_COST + "\n" + format_row(row(0)) + "garbage\n" + format_row(row(1)))
    with pytest.raises(SdepureError, match="line 3 is malformed"):
        runs.read_rows(path)
    path.write_text("something else\n")
    with pytest.raises(SdepureError, match="header"):
        runs.read_rows(path)


# -- starting and resuming --------------------------------------------------------------------

def test_start_then_resume_repairs_a_torn_line_and_lists_pending(tmp_path):
    run = tmp_path / "run"
    rec = record([0, 2, 4, 6])
    runs.start(run, rec)
    assert runs.load_record(run) == rec
    assert (run / "certify.tsv").read_text() == runs.TSV_HEADER_COST + "\n"
    with open(run / "certify.tsv", "a") as fh:
        fh.write(format_row(row(0)) + format_row(row(2)) + "4\t1\t")
    done = runs.resume(run, rec)
    assert [r["idx"] for r in done] == [0, 2] and runs.pending(rec, done) == [4, 6]
    assert (run / "certify.tsv").read_text().endswith(format_row(row(2)))  # the torn line is gone
    with pytest.raises(SdepureError, match="already exists"):
        runs.start(run, rec)


def test_resume_refuses_other_settings_naming_them_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    rec = record([0, 1, 2])
    runs.start(run, rec)
    (run / "certify.tsv").write_text(runs.TSV_HEADER_COST + "\n" + format_row(row(0)) + "1\t")
    before = (run / "certify.tsv").read_bytes()
    other_sigma = json.loads(json.dumps(rec))
    other_sigma["settings"]["purifier"]["sigma"] = 0.25
    other_weights = json.loads(json.dumps(rec))
    other_weights["config"]["model"]["weights"] = "/other.pt"
    cases = [(other_sigma, "setting purifier.sigma differs: the run has 0.5, this command 0.25"),
             (record([0, 1, 2], n=100), "setting n differs"),
             (record([0, 1, 2, 3]), "setting images differs: the run has 3 images from 0 to 2"),
             (record([0, 1, 2], runs.Shard(0, 2)), "setting shard differs"),
             (other_weights, "setting config.model.weights differs"),
             (record([0, 1, 2], world_size=2), "started by 1 process(es)")]
    for current, needle in cases:
        with pytest.raises(SdepureError) as info:
            runs.resume(run, current)
        assert needle in str(info.value) and "\n" not in str(info.value)
    assert (run / "certify.tsv").read_bytes() == before
    # a change in what does not decide a row (config name, device, the [attack] table) is fine
    same = runs.make_record(json.loads(json.dumps(SETTINGS)), {**CFG, "name": "copy", "attack": {}}, [0, 1, 2],
                            device="cuda:0")
    assert [r["idx"] for r in runs.resume(run, same)] == [0]


def test_resume_of_something_that_is_not_a_run(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "certify.tsv").write_text("precious")
    (tmp_path / "file").write_text("x")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "run.json").write_text("{not json")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "run.json").write_text('{"format": "other"}')
    for name, needle in [("plain", "no run.json"), ("file", "not a directory"), ("missing", "does not exist"),
                         ("badjson", "not JSON"), ("foreign", "not a sdepure certify run record")]:
        with pytest.raises(SdepureError, match=needle):
            runs.resume(tmp_path / name, record([0]))
    assert (tmp_path / "plain" / "certify.tsv").read_text() == "precious"


def test_rows_outside_the_run_are_refused(tmp_path):
    run = tmp_path / "run"
    rec = record([0, 1])
    runs.start(run, rec)
    (run / "certify.tsv").write_text(runs.TSV_HEADER_COST + "\n" + format_row(row(5)))
    with pytest.raises(SdepureError, match="image 5, which is not among"):
        runs.resume(run, rec)
    (run / "certify.tsv").write_text(runs.TSV_HEADER_COST + "\n" + format_row(row(1)) + format_row(row(1)))
    with pytest.raises(SdepureError, match="two rows for image 1"):
        runs.resume(run, rec)


def test_record_is_written_atomically(tmp_path):
    run = tmp_path / "run"
    runs.start(run, record([0]))
    assert sorted(p.name for p in run.iterdir()) == ["certify.tsv", "run.json"]  # no .tmp left behind


# -- merging --------------------------------------------------------------------------------------

def make_shards(tmp_path, images, count, finished=True, prefix="s", **changes):
    dirs = []
    for i in range(count):
        shard = runs.Shard(i, count)
        d = tmp_path / f"{prefix}{i}"
        runs.start(d, record(shard.select(images), shard, **changes))
        todo = shard.select(images) if finished else shard.select(images)[:1]
        with open(d / "certify.tsv", "a") as fh:
            fh.writelines(format_row(row(j, label=j % 10)) for j in todo)
        dirs.append(d)
    return dirs


def test_collect_merges_shards_sorted_by_idx(tmp_path):
    images = list(range(0, 30, 3))
    dirs = make_shards(tmp_path, images, 3)
    merged, rows = runs.collect(reversed(dirs))
    assert [r["idx"] for r in rows] == images and [r["label"] for r in rows] == [j % 10 for j in images]
    assert merged["shard"] is None and merged["images"] == images
    assert merged["settings"] == runs.full_settings(SETTINGS) and merged["settings"]["purifier"]["votes"] == 3


def test_collect_refuses_inconsistent_shards(tmp_path):
    images = list(range(12))
    a = make_shards(tmp_path, images, 2, prefix="a")
    b = make_shards(tmp_path, images, 2, prefix="b", n=100)
    c = make_shards(tmp_path, images, 3, prefix="c")
    d = make_shards(tmp_path, images, 2, prefix="d", finished=False)
    whole = tmp_path / "whole"
    runs.start(whole, record(images))
    cases = [([a[0], b[1]], "different runs: setting n differs (12 against 100)"),
             ([a[0], a[0]], "given twice"),
             ([a[0], a[1], b[1]], "different runs"),
             ([a[0]], "shard(s) 1/2 missing"),
             ([c[0], c[2]], "shard(s) 1/3 missing"),
             ([a[0], c[1]], "different splits"),
             ([a[0], d[1]], "unfinished (1 of 6 images)"),
             ([a[0], whole], "whole run, not a shard"),
             ([a[0], tmp_path], "no run.json")]
    for dirs, needle in cases:
        with pytest.raises(SdepureError) as info:
            runs.collect(dirs)
        assert needle in str(info.value), (needle, str(info.value))
    # two copies of one shard under different names overlap
    import shutil
    shutil.copytree(a[0], tmp_path / "copy")
    with pytest.raises(SdepureError, match="given twice"):
        runs.collect([a[0], a[1], tmp_path / "copy"])


def test_collect_detects_duplicate_rows_across_shards(tmp_path):
    images = list(range(6))
    a = make_shards(tmp_path, images, 2)
    rec = runs.load_record(a[1])
    rec["images"] = rec["images"] + [0]
    runs.write_record(a[1], rec)
    with open(a[1] / "certify.tsv", "a") as fh:
        fh.write(format_row(row(0)))
    with pytest.raises(SdepureError, match="image 0 appears in both"):
        runs.collect(a)


def test_torchrun_run_directory_stands_for_its_shards(tmp_path):
    images = list(range(8))
    top = tmp_path / "top"
    runs.start(top, record(images, world_size=2))
    assert not (top / "certify.tsv").exists()
    for i, d in enumerate(runs.shard_dirs(top, 2)):
        shard = runs.Shard(i, 2)
        runs.start(d, record(shard.select(images), shard))
        with open(d / "certify.tsv", "a") as fh:
            fh.writelines(format_row(row(j)) for j in shard.select(images))
    merged, rows = runs.collect([top])
    assert [r["idx"] for r in rows] == images


# -- progress ---------------------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_log_has_no_carriage_returns_and_a_line_per_image():
    stream, clock = io.StringIO(), Clock()
    p = Progress(total=4, draws_per_image=100, done=1, stream=stream, every=25, clock=clock)
    for k in range(3):  # 3 images of 100 draws, 10 s each, in steps of 20 draws
        for _ in range(5):
            clock.t += 2
            p.draws(20)
        p.image(row(k, time=10.0))
    p.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    image_lines = [line for line in lines if line.startswith("image ")]
    assert image_lines[0] == "image 0: label 1 predict 1 radius 0.2500 correct 1 (10.00 s) [2/4]"
    assert len(image_lines) == 3 and image_lines[-1].endswith("[4/4]")
    status = [line for line in lines if line.startswith("certify: ") and "ETA" in line]
    # one status line 25 s or more after the start: at 26 s, 1 + 2 images done, 260 draws in
    # 26 s (10/s), 300 - 260 = 40 left: ETA 4 s
    assert status == ["certify: 3/4 images, 10 draws/s, ETA 0:00:04"]
    assert lines[-1] == "certify: 4/4 images, 10 draws/s, 0:00:30 in this process"


def test_progress_status_rate_and_eta():
    clock = Clock()
    p = Progress(total=10, draws_per_image=50, stream=io.StringIO(), clock=clock, every=1e9)
    clock.t = 20.0
    p.draws(100)
    assert p.status() == "certify: 0/10 images, 5 draws/s, ETA 0:01:20"  # 400 draws left at 5/s
    assert format_seconds(3 * 3600 + 61) == "3:01:01" and format_seconds(None) == "?"


def test_progress_eta_follows_the_draws_images_actually_take():
    """With adaptive sampling an image takes fewer draws than the cap: once images finish, the
    ETA uses their mean draws, not the cap."""
    class Clock:
        t = 0.0

        def __call__(self):
            return self.t
    clock = Clock()
    p = Progress(total=10, draws_per_image=500, stream=io.StringIO(), clock=clock, every=1e9)
    for k in range(2):  # two images of 100 draws each, at 10 draws/s
        clock.t += 10
        p.draws(100)
        p.image(row(k))
    # 8 images left at 100 draws (not 500) each: 800 draws at 10/s
    assert p.status() == "certify: 2/10 images, 10 draws/s, ETA 0:01:20"
    clock.t += 5
    p.draws(50)  # half of the next image drawn
    assert p.status().endswith("ETA 0:01:15")  # (800 - 50) draws at 250 / 25 s


def test_progress_on_a_terminal_draws_a_bar_and_keeps_image_lines():
    stream = TTY()
    with Progress(total=2, draws_per_image=10, stream=stream, prefix="[rank 1/2] ") as p:
        for k in range(2):
            p.draws(10)
            p.image(row(k))
    text = stream.getvalue()
    assert "\r" in text and "draw" in text  # tqdm's bar
    assert "[rank 1/2] image 0: label 1 predict 1 radius 0.2500 correct 1 (0.50 s) [1/2]\n" in text
    assert "[rank 1/2] image 1:" in text


# -- the command line: kill and resume, shards, merge, bad input ---------------------------------

def cells(run_dir):
    """certify.tsv without the time column: what must match row for row."""
    return [line.split("\t")[:5] for line in (run_dir / "certify.tsv").read_text().splitlines()]


def certify_ok(run_cli, *args):
    code, stdout, err = run_cli("certify", *args)
    assert code == 0, err
    return stdout, err


def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny, tmp_path, run_cli):
    """A real `sdepure certify` process is killed with SIGKILL after its first rows; a torn half
    row is appended as if the kill had come mid-write; `--resume DIR` alone finishes the run, and
    its certify.tsv equals an uninterrupted run's on idx label predict radius correct."""
    args = ["--config", str(tiny), "--stop", "16", "--n", "100", "--seed", "5"]
    run = tmp_path / "killed"
    # killed once the header and one complete row are on disk
    assert kill_9_after(["certify", *args, "--out", str(run)], run / "certify.tsv", 2) == -signal.SIGKILL
    rows, _, _ = runs.read_rows(run / "certify.tsv")
    assert 1 <= len(rows) < 16, len(rows)  # killed mid-run
    assert not (run / "summary.json").exists() and (run / "run.json").exists()  # summary only at the end
    next_idx = len(rows)
    with open(run / "certify.tsv", "a") as fh:
        fh.write(f"{next_idx}\t3\t3\t0.2")  # a row torn mid-write
    stdout, _ = certify_ok(run_cli, "--resume", str(run))
    assert f"{len(rows)} of 16 images done" in stdout
    certify_ok(run_cli, *args, "--out", str(tmp_path / "whole"))
    assert cells(run) == cells(tmp_path / "whole")
    assert len(cells(run)) == 17 and [c[0] for c in cells(run)[1:]] == [str(i) for i in range(16)]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["images"] == 16 and summary["certified_accuracy"] == \
        json.loads((tmp_path / "whole" / "summary.json").read_text())["certified_accuracy"]


def test_resume_a_finished_run_rewrites_its_summary(tiny, tmp_path, run_cli):
    run = tmp_path / "run"
    certify_ok(run_cli, "--config", str(tiny), "--out", str(run))
    before = cells(run)
    (run / "summary.json").unlink()
    stdout, _ = certify_ok(run_cli, "--resume", str(run), "--config", str(tiny), "--seed", "0")
    assert "already complete (3 images)" in stdout
    assert cells(run) == before and json.loads((run / "summary.json").read_text())["images"] == 3


def test_shards_equal_the_matching_rows_of_the_whole_run_and_merge_back(tiny, tmp_path, run_cli):
    args = ["--config", str(tiny), "--stop", "11", "--skip", "2", "--seed", "7"]
    certify_ok(run_cli, *args, "--out", str(tmp_path / "whole"))
    whole = cells(tmp_path / "whole")
    by_idx = {c[0]: c for c in whole[1:]}
    images = [str(i) for i in range(0, 11, 2)]
    for i in (2, 0, 1):  # any order
        certify_ok(run_cli, *args, "--shard", f"{i}/3", "--out", str(tmp_path / f"s{i}"))
        part = cells(tmp_path / f"s{i}")
        assert [c[0] for c in part[1:]] == images[i::3]
        assert part[1:] == [by_idx[k] for k in images[i::3]]
    code, stdout, err = run_cli("merge", str(tmp_path / "s2"), str(tmp_path / "s0"), str(tmp_path / "s1"),
                                "--out", str(tmp_path / "merged"))
    assert code == 0, err
    assert cells(tmp_path / "merged") == whole
    merged = json.loads((tmp_path / "merged" / "summary.json").read_text())
    assert merged["certified_accuracy"] == json.loads((tmp_path / "whole" / "summary.json").read_text())[
        "certified_accuracy"]
    assert (tmp_path / "merged" / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    # a shard resumed without flags keeps its shard and settings
    stdout, _ = certify_ok(run_cli, "--resume", str(tmp_path / "s1"))
    assert "already complete (2 images)" in stdout


def test_log_mode_progress_has_no_carriage_returns_and_one_line_per_image(tiny, tmp_path, run_cli):
    _, err = certify_ok(run_cli, "--config", str(tiny), "--out", str(tmp_path / "run"))  # stderr: not a TTY
    assert "\r" not in err
    image_lines = [line for line in err.splitlines() if line.startswith("image ")]
    assert [line.split(":")[0] for line in image_lines] == ["image 0", "image 1", "image 2"]
    for line, cell in zip(image_lines, cells(tmp_path / "run")[1:]):
        assert f"label {cell[1]} predict {cell[2]} radius {cell[3]} correct {cell[4]}" in line


@pytest.mark.parametrize("flags", [["--rng", "cpu"], ["--full-vote"], ["--solver", "ddpm", "--variance", "beta"]])
def test_a_run_resumes_with_resume_alone_whatever_its_settings(tiny, tmp_path, run_cli, flags):
    """Every setting comes back from run.json (settings serialise themselves), so a run started
    with non-default flags resumes with --resume DIR alone and ends as the uninterrupted run."""
    whole, run = tmp_path / "whole", tmp_path / "run"
    certify_ok(run_cli, "--config", str(tiny), *flags, "--out", str(whole))
    certify_ok(run_cli, "--config", str(tiny), *flags, "--out", str(run))
    text = (run / "certify.tsv").read_text()
    (run / "certify.tsv").write_text(text[:text.rindex("2\t")] + "2\t")  # the last row torn, as after a kill
    (run / "summary.json").unlink()
    certify_ok(run_cli, "--resume", str(run))
    assert cells(run) == cells(whole)


@pytest.mark.parametrize("mode", [["--sampling", "iss", "--radius-tol", "0.1"],
                                  ["--sampling", "sequential", "--radii", "0,0.25", "--batch", "4"]])
def test_adaptive_sampling_rows_equal_across_shards_and_resume(tiny, tmp_path, run_cli, mode):
    """Each image's draws are addressed by (seed, image) in every sampling mode: shards merged,
    and a run resumed after a torn row, give the whole run's rows and draws. (Network calls follow
    the early-stopped vote's cost model, measured in each process, as time does.)"""
    args = ["--config", str(tiny), "--stop", "6", "--n", "40", "--seed", "2", *mode]
    certify_ok(run_cli, *args, "--out", str(tmp_path / "whole"))
    whole = (tmp_path / "whole" / "certify.tsv").read_text().splitlines()
    assert whole[0].endswith("\tdraws\tcalls")
    drawn = [int(line.split("\t")[6]) for line in whole[1:]]
    assert all(4 <= d <= 4 + 40 for d in drawn)  # n0 = 4 plus at most the cap
    for i in (0, 1):
        certify_ok(run_cli, *args, "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}"))
    code, _, err = run_cli("merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m"))
    assert code == 0, err
    assert cells(tmp_path / "m") == cells(tmp_path / "whole")
    merged = (tmp_path / "m" / "certify.tsv").read_text().splitlines()
    assert [line.split("\t")[6] for line in merged] == [line.split("\t")[6] for line in whole]
    run = tmp_path / "run"
    certify_ok(run_cli, *args, "--out", str(run))
    text = (run / "certify.tsv").read_text()
    (run / "certify.tsv").write_text(text[:text.rindex("4\t")] + "4\t")
    certify_ok(run_cli, "--resume", str(run))
    assert cells(run) == cells(tmp_path / "whole")


@pytest.fixture
def partial_run(tiny, tmp_path, run_cli):
    """A run of 3 images with its last row removed and torn, as after a kill."""
    run = tmp_path / "partial"
    certify_ok(run_cli, "--config", str(tiny), "--out", str(run))
    text = (run / "certify.tsv").read_text()
    (run / "certify.tsv").write_text(text[:text.rindex("2\t")] + "2\t")
    (run / "summary.json").unlink()
    return run


@pytest.mark.parametrize("args, needle", [
    (["--sigma", "0.25"], "setting purifier.sigma differs: the run has 0.5, this command 0.25"),
    (["--n", "13"], "setting n differs"),
    (["--seed", "1"], "setting seed differs"),
    (["--stop", "2"], "setting stop differs"),
    (["--method", "carlini"], "differs"),
    (["--shard", "0/2"], "setting shard differs"),
    (["--out", "elsewhere"], "drop --out"),
])
def test_resume_with_other_settings_is_refused_and_changes_nothing(partial_run, cli_error, args, needle):
    before = {p.name: p.read_bytes() for p in partial_run.iterdir()}
    cli_error(needle, "certify", "--resume", str(partial_run), *args)
    assert {p.name: p.read_bytes() for p in partial_run.iterdir()} == before


def test_resume_with_another_config_file_names_the_differing_table_key(partial_run, tiny, tmp_path, cli_error):
    edited = tmp_path / "edited.toml"
    edited.write_text(tiny.read_text().replace('dataset = "digits"', 'dataset = "digits"\nsplit = "train"'))
    cli_error("setting config.data.split differs: the run has \"<unset>\", this command \"train\"", "certify",
              "--resume", str(partial_run), "--config", str(edited))


def test_resume_with_a_config_whose_method_differs_is_refused(partial_run, tiny, tmp_path, cli_error):
    edited = tmp_path / "edited.toml"
    edited.write_text(tiny.read_text().replace("sigma = 0.5", "sigma = 0.25"))
    cli_error("setting purifier.sigma differs: the run has 0.5, this command 0.25", "certify",
              "--resume", str(partial_run), "--config", str(edited))


def test_resume_with_another_solver_names_the_solver(tiny, tmp_path, run_cli, cli_error):
    """The recorded variance went with the recorded ddpm solver: another solver is refused by name,
    not as a variance that does not apply to it."""
    run = tmp_path / "run"
    certify_ok(run_cli, "--config", str(tiny), "--solver", "ddpm", "--variance", "posterior", "--out", str(run))
    cli_error("setting purifier.solver differs", "certify", "--resume", str(run), "--solver", "euler")


def test_resume_of_a_directory_that_is_not_a_run(tmp_path, cli_error):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "certify.tsv").write_text("precious\n")
    (tmp_path / "file").write_text("precious\n")
    for target, needle in [(plain, "not a sdepure certify run"), (tmp_path / "missing", "does not exist"),
                           (tmp_path / "file", "not a directory")]:
        cli_error(needle, "certify", "--resume", str(target))
    assert (plain / "certify.tsv").read_text() == "precious\n" and sorted(os.listdir(plain)) == ["certify.tsv"]
    assert (tmp_path / "file").read_text() == "precious\n" and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("shard, needle", [("a/b", "i/n"), ("1-3", "i/n"), ("3/3", "must be < 3"),
                                           ("5/2", "must be < 2"), ("0/0", ">= 1"), ("-1/2", "i/n"), ("", "i/n")])
def test_malformed_shard_is_refused(tiny, tmp_path, cli_error, shard, needle):
    cli_error(needle, "certify", "--config", str(tiny), "--shard", shard, "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_merge_refuses_inconsistent_shards(tiny, tmp_path, run_cli, cli_error):
    for name, extra in [("a0", ["--shard", "0/2"]), ("a1", ["--shard", "1/2"]),
                        ("b1", ["--shard", "1/2", "--sigma", "0.25"]), ("c1", ["--shard", "1/3"])]:
        certify_ok(run_cli, "--config", str(tiny), *extra, "--out", str(tmp_path / name))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "certify.tsv").write_text("precious\n")
    a0, a1, b1, c1 = (str(tmp_path / n) for n in ("a0", "a1", "b1", "c1"))
    out = str(tmp_path / "out")
    cases = [([a0, b1], "different runs: setting purifier.sigma differs (0.5 against 0.25)"),
             ([a0], "shard(s) 1/2 missing"),
             ([a0, a0, a1], "given twice"),
             ([a0, c1], "different"),
             ([a0, str(tmp_path / "nope")], "does not exist"),
             ([a0, str(taken)], "not a sdepure certify or attack run")]
    for dirs, needle in cases:
        cli_error(needle, "merge", *dirs, "--out", out)
        assert not (tmp_path / "out").exists()
    cli_error("already exists", "merge", a0, a1, "--out", str(taken))
    assert (taken / "certify.tsv").read_text() == "precious\n"
    cli_error("Missing option '--out'", "merge", a0, a1)
    cli_error("Missing argument", "merge", "--out", out)


def test_merge_refuses_an_unfinished_shard(tiny, tmp_path, run_cli, cli_error):
    for i in (0, 1):
        certify_ok(run_cli, "--config", str(tiny), "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}"))
    text = (tmp_path / "s1" / "certify.tsv").read_text()
    (tmp_path / "s1" / "certify.tsv").write_text(text[:text.rindex("1\t")])
    cli_error("unfinished (0 of 1 images)", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"),
              "--out", str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def torchrun_env(monkeypatch, rank, world):
    for key, value in {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, str(value))


def test_resume_under_torchrun_with_another_world_size_is_refused(partial_run, monkeypatch, cli_error):
    """Checked before the processes meet (so this process alone, with no peers, gets the error)."""
    before = {p.name: p.read_bytes() for p in partial_run.iterdir()}
    torchrun_env(monkeypatch, 0, 2)
    cli_error("started by 1 process(es) (it has no per-process shard files); this run has WORLD_SIZE=2",
              "certify", "--resume", str(partial_run))
    assert {p.name: p.read_bytes() for p in partial_run.iterdir()} == before


def test_shard_under_torchrun_and_bad_torchrun_environment_are_refused(tiny, tmp_path, monkeypatch, cli_error):
    torchrun_env(monkeypatch, 1, 2)
    cli_error("--shard and torchrun", "certify", "--config", str(tiny), "--shard", "0/2", "--out", str(tmp_path / "o"))
    monkeypatch.setenv("RANK", "2")
    cli_error("RANK must be in 0..1", "certify", "--config", str(tiny), "--out", str(tmp_path / "o"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR")
    cli_error("MASTER_ADDR", "certify", "--config", str(tiny), "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_certified_curves_read_from_run_directories(tiny, tmp_path, run_cli):
    """Several runs' curves, read back from their directories with the library's reader, give the
    certified accuracy each run's summary reports, and draw as one PNG."""
    import numpy as np

    from sdepure import report

    curves = {}
    for method in ("none", "carlini"):
        run = tmp_path / method
        certify_ok(run_cli, "--config", str(tiny), "--method", method, "--out", str(run), "--stop", "3")
        label, radius, correct = runs.certified_curve(run)
        assert label.startswith(method) and "sigma" in label
        summary = json.loads((run / "summary.json").read_text())
        radii = [float(r) for r in summary["certified_accuracy"]]
        assert report.certified_accuracy(np.array(radius), np.array(correct), radii) == \
            pytest.approx(list(summary["certified_accuracy"].values()))
        curves[label] = (np.array(radius), np.array(correct))
    report.plot_curve(tmp_path / "curves.png", curves, "tiny")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "none" / "certify.tsv").write_text((tmp_path / "none" / "certify.tsv").read_text().splitlines()[0] + "\n")
    with pytest.raises(SdepureError, match="unfinished"):
        runs.certified_curve(tmp_path / "none")
