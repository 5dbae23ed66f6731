import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch




def test_certify_end_to_end_and_deterministic(tiny, tmp_path, run_cli):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        code, stdout, err = run_cli("certify", "--config", str(tiny), "--out", str(out), "--seed", "3")
        assert code == 0, err
        assert "radius" in stdout and "densepure" in stdout
        lines = (out / "certify.tsv").read_text().splitlines()
        # Cohen's six columns first, then the draws (n0 + n for fixed N) and network calls
        assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime\tdraws\tcalls"
        assert len(lines) == 4
        assert all(line.split("\t")[6] == str(4 + 12) for line in lines[1:])
        summary = json.loads((out / "summary.json").read_text())
        assert summary["images"] == 3 and summary["settings"]["purifier"]["votes"] == 3
        assert (out / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"
        outs.append([line.split("\t")[:5] for line in lines])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("method", ["none", "carlini", "diffpure"])
def test_certify_other_methods(tiny, tmp_path, run_cli, method):
    code, stdout, err = run_cli("certify", "--config", str(tiny), "--method", method,
                                "--out", str(tmp_path / method), "--stop", "2", "--solver", "ddpm")
    assert code == 0, err
    assert json.loads((tmp_path / method / "summary.json").read_text())["settings"]["purifier"]["votes"] == 1


@pytest.mark.parametrize("args", [["--solver", "ddim"], ["--solver", "ddim", "--eta", "0.5"],
                                  ["--solver", "dpm-solver-2m", "--precision", "bf16"]])
def test_certify_fast_samplers_and_precision(tiny, tmp_path, run_cli, args):
    out = tmp_path / "o"
    code, stdout, err = run_cli("certify", "--config", str(tiny), "--out", str(out), "--stop", "2", *args)
    assert code == 0, err
    purifier = json.loads((out / "summary.json").read_text())["settings"]["purifier"]
    given = dict(zip(args[::2], args[1::2]))
    assert purifier["solver"] == given["--solver"]
    assert purifier["eta"] == float(given.get("--eta", 0)) and purifier["precision"] == given.get("--precision", "fp32")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD = {
    "sigma zero": (["--sigma", "0"], "sigma"),
    "sigma negative": (["--sigma", "-0.5"], "sigma"),
    "sigma not a number": (["--sigma", "abc"], "sigma"),
    "alpha zero": (["--alpha", "0"], "alpha"),
    "alpha one": (["--alpha", "1"], "alpha"),
    "alpha above one": (["--alpha", "1.5"], "alpha"),
    "n0 zero": (["--n0", "0"], "n0"),
    "n zero": (["--n", "0"], "n"),
    "votes zero": (["--votes", "0"], "votes"),
    "steps zero": (["--steps", "0"], "steps"),
    "batch zero": (["--batch", "0"], "batch"),
    "skip zero": (["--skip", "0"], "skip"),
    "unknown method": (["--method", "purepure"], "unknown method"),
    "unknown solver": (["--solver", "rk45"], "unknown solver"),
    "votes with carlini": (["--method", "carlini", "--votes", "5"], "densepure only"),
    "no images": (["--start", "5000"], "no images"),
    "unknown device": (["--device", "tpu"], "device"),
    "unknown option": (["--sigmaa", "0.5"], "No such option"),
    "negative start": (["--start", "-1"], "start"),
    "missing model weights": (["--model-weights", "/nonexistent/eps.pt"], "not found"),
    "missing classifier weights": (["--classifier-weights", "/nonexistent/c.pt"], "not found"),
    "eta above one": (["--solver", "ddim", "--eta", "1.5"], "eta must be in [0, 1]"),
    "eta not a number": (["--solver", "ddim", "--eta", "x"], "eta"),
    "eta with euler": (["--eta", "0.5"], "eta applies to the ddim solver"),
    "unknown precision": (["--precision", "fp8"], "unknown precision"),
    "variance learned without a variance output": (["--solver", "ddpm", "--variance", "learned"],
                                                   "needs a diffusion model with a variance output"),
    "variance with euler": (["--variance", "posterior"], "applies to the ddpm solver"),
    "variance with carlini": (["--method", "carlini", "--variance", "beta"], "method carlini"),
    "unknown variance": (["--solver", "ddpm", "--variance", "learnt"], "unknown variance"),
    "unknown sampling": (["--sampling", "adaptive"], "unknown sampling"),
    "radius-tol zero": (["--sampling", "iss", "--radius-tol", "0"], "radius-tol must be > 0"),
    "radius-tol negative": (["--sampling", "iss", "--radius-tol", "-0.1"], "radius-tol must be > 0"),
    "radius-tol without iss": (["--radius-tol", "0.05"], "--sampling iss only"),
    "radii empty": (["--sampling", "sequential", "--radii", ","], "empty"),
    "radii unsorted": (["--sampling", "sequential", "--radii", "0.5,0.25"], "increase"),
    "radii negative": (["--sampling", "sequential", "--radii", "-0.25,0.5"], ">= 0"),
    "radii not numbers": (["--sampling", "sequential", "--radii", "a,b"], "radii"),
    "radii without sequential": (["--radii", "0.25"], "--sampling sequential only"),
    "sequential without radii": (["--sampling", "sequential"], "--radii"),
    "sequential cap below its first checkpoint": (["--sampling", "sequential", "--radii", "0.25", "--n", "5"],
                                                  "below its first checkpoint"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_certify_bad_input_one_line_error(tiny, tmp_path, cli_error, case):
    args, needle = BAD[case]
    out = tmp_path / "out"
    cli_error(needle, "certify", "--config", str(tiny), "--out", str(out), *args)
    assert not out.exists()


def _config_with(tiny: Path, tmp_path: Path, old: str, new: str) -> Path:
    return _write(tmp_path / "edited.toml", tiny.read_text().replace(old, new))


def test_missing_and_malformed_config(tiny, tmp_path, cli_error):
    cases = [
        (str(tmp_path / "nope.toml"), "not found"),
        ("no-such-config", "unknown config"),
        (str(_write(tmp_path / "broken.toml", "[model\nfamily = 3")), "malformed"),
        (str(_write(tmp_path / "nodata.toml", "[classifier]\nfamily='digits-cnn'\n")), "lacks the [data]"),
        (str(_config_with(tiny, tmp_path, 'kind = "linear"', 'kind = "quadratic"')), "schedule kind"),
    ]
    for spec, needle in cases:
        cli_error(needle, "certify", "--config", spec, "--out", str(tmp_path / "o"))
        assert not (tmp_path / "o").exists()


def test_missing_corrupt_and_mismatched_weights(tiny, tmp_path, cli_error):
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    torch.save({"format": "sdepure", "family": "digits-eps-mlp", "arch": {"width": 32, "blocks": 1},
                "state_dict": {"inp.weight": torch.zeros(32, 64)}}, tmp_path / "partial.pt")
    cases = [("missing.pt", "not found"), ("corrupt.pt", "corrupt"), ("partial.pt", "missing keys"),
             ("cls.pt", "holds family 'digits-cnn'")]
    for name, needle in cases:
        cfg = _config_with(tiny, tmp_path, str(tmp_path / "eps.pt"), str(tmp_path / name))
        cli_error(needle, "certify", "--config", str(cfg), "--out", str(tmp_path / "o"))
        assert not (tmp_path / "o").exists()


def test_existing_or_unwritable_output_is_refused(tiny, tmp_path, cli_error):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "certify.tsv").write_text("precious\n")
    cli_error("already exists", "certify", "--config", str(tiny), "--out", str(out))
    assert (out / "certify.tsv").read_text() == "precious\n"
    blocker = _write(tmp_path / "file", "x")
    cli_error("cannot write", "certify", "--config", str(tiny), "--out", str(blocker / "sub"))


def test_train_bad_input(tmp_path, cli_error):
    cli_error("already exists", "train", "digits", "--out", str(tmp_path))
    for args, needle in ((["--steps", "0"], "--steps"), (["--epochs", "0"], "--epochs"),
                         (["--threads", "-1"], "--threads")):
        cli_error(needle, "train", "digits", "--out", str(tmp_path / "x"), *args)
        assert not (tmp_path / "x").exists()


def test_console_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sdepure_cli", "certify", "--sigma", "-1",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["sdepure: error: sigma must be > 0, got -1.0"]


def test_fractional_count_in_config_refused_by_both_commands(tiny, tmp_path, cli_error):
    """`steps = 4.5` in a config is refused by certify and attack alike, never truncated."""
    cfg = _config_with(tiny, tmp_path, "steps = 4\n", "steps = 4.5\n")
    cli_error("steps must be an integer", "certify", "--config", str(cfg), "--out", str(tmp_path / "c"))
    cfg2 = _config_with(tiny, tmp_path, "steps = 2\n", "steps = 2.5\n")
    cli_error("steps must be an integer", "attack", "--autoattack", "--config", str(cfg2), "--out", str(tmp_path / "a"))
    assert not (tmp_path / "c").exists() and not (tmp_path / "a").exists()


def test_rng_and_full_vote_leave_cpu_rows_unchanged(tiny, tmp_path, run_cli):
    """On the CPU the device stream is the CPU stream, and the early-stopped vote is exact: the
    default, --rng cpu and --full-vote give the same rows."""
    rows = {}
    for name, extra in (("default", []), ("cpu", ["--rng", "cpu"]), ("full", ["--full-vote"])):
        code, _, err = run_cli("certify", "--config", str(tiny), "--out", str(tmp_path / name), *extra)
        assert code == 0, err
        rows[name] = [line.split("\t")[:5] for line in (tmp_path / name / "certify.tsv").read_text().splitlines()]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["settings"]["purifier"]["early_stop"] == (name != "full")
    assert rows["default"] == rows["cpu"] == rows["full"]


@pytest.mark.parametrize("command", ["certify", "attack"])
def test_bad_rng_refused(tiny, tmp_path, cli_error, command):
    extra = ["--autoattack"] if command == "attack" else []
    cli_error("unknown rng 'gpu'", command, *extra, "--config", str(tiny), "--rng", "gpu", "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", [[], ["--sampling", "sequential", "--radii", "0,0.25"]])
def test_plan_prints_the_cost_and_writes_nothing(tiny, tmp_path, run_cli, monkeypatch, mode):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, stdout, err = run_cli("certify", "--config", str(tiny), "--plan", *mode)
    assert code == 0, err
    assert list(work.iterdir()) == []  # no run directory, nothing else
    # tiny config: K = 3 runs of 4 euler steps per draw, n0 = 4, n = 12
    assert "network calls per draw: 12 with the full vote" in stdout
    assert "fixed 192;" in stdout and "projected wall time" in stdout and "probe: 3 images" in stdout


def test_plan_refuses_out_and_resume(tiny, tmp_path, cli_error):
    cli_error("--plan writes nothing", "certify", "--config", str(tiny), "--plan", "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
