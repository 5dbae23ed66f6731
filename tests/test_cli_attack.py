import json

import pytest





def test_attack_autoattack_end_to_end(tiny, tmp_path, run_cli):
    out = tmp_path / "aa"
    code, stdout, err = run_cli("attack", "--autoattack", "--config", str(tiny), "--out", str(out),
                                "--n-examples", "2", "--save-adv")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["version"] == "rand" and summary["examples"] == 2
    assert set(summary["accuracy_after_each_attack"]) == {"clean", "apgd-ce", "apgd-dlr"}
    assert summary["max_perturbation"]["Linf"] <= 0.1 + 1e-6
    scored = summary["scored_over_draws"]["adversarial"]
    assert scored["draws"] == 3 and scored["worst"] <= scored["majority"] + 1e-12
    assert (out / "adversarial.pt").exists()
    assert len((out / "examples.tsv").read_text().splitlines()) == 3
    assert "robust accuracy" in stdout


@pytest.mark.parametrize("kind,grad", [("--pgd", "adjoint"), ("--bpda", None), ("--pgd", "ode")])
def test_attack_pgd_and_bpda(tiny, tmp_path, run_cli, kind, grad):
    out = tmp_path / "o"
    args = ["attack", kind, "--config", str(tiny), "--out", str(out), "--pgd-steps", "2", "--eot", "2",
            "--n-examples", "2", "--norm", "L2", "--eps", "0.5"]
    if grad:
        args += ["--grad", grad]
    code, _, err = run_cli(*args)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["max_perturbation"]["L2"] <= 0.5 + 1e-5
    assert summary["settings"]["purifier"]["grad"] == (grad or "bpda")


@pytest.mark.parametrize("solver", ["ddim", "dpm-solver-2m"])
def test_attack_with_fast_samplers_and_exact_gradients(tiny, tmp_path, run_cli, solver):
    out = tmp_path / "o"
    code, _, err = run_cli("attack", "--pgd", "--config", str(tiny), "--out", str(out), "--pgd-steps", "2",
                           "--eot", "1", "--n-examples", "2", "--solver", solver, "--score-draws", "2")
    assert code == 0, err
    purifier = json.loads((out / "summary.json").read_text())["settings"]["purifier"]
    assert purifier["solver"] == solver and purifier["grad"] == "exact"


BAD = {
    "negative eps": (["--autoattack", "--eps", "-0.1"], "eps"),
    "malformed eps": (["--autoattack", "--eps", "8//255"], "eps"),
    "unknown norm": (["--autoattack", "--norm", "L3"], "norm"),
    "unknown version": (["--autoattack", "--version", "plus"], "version"),
    "unknown grad": (["--autoattack", "--grad", "finite-differences"], "gradient mode"),
    "n-examples zero": (["--autoattack", "--n-examples", "0"], "n-examples"),
    "no attack chosen": ([], "choose an attack"),
    "pgd options with autoattack": (["--autoattack", "--eot", "3"], "apply to --pgd"),
    "bpda with another grad": (["--bpda", "--grad", "exact"], "bpda"),
    "votes with diffpure": (["--pgd", "--votes", "4"], "densepure only"),
    "zero step size": (["--pgd", "--step-size", "0"], "step size"),
    "t-star out of range": (["--pgd", "--t-star", "1.5"], "t*"),
    "unknown method": (["--pgd", "--method", "purepure"], "unknown method"),
    "batch zero": (["--pgd", "--batch", "0"], "batch"),
    "steps zero": (["--pgd", "--steps", "0"], "steps"),
    "unknown solver": (["--pgd", "--solver", "rk45"], "unknown solver"),
    "score-draws zero": (["--pgd", "--score-draws", "0"], "score-draws"),
    "negative start": (["--pgd", "--start", "-2"], "start"),
    "adjoint method mismatch": (["--pgd", "--grad", "adjoint", "--adjoint-method", "midpoint"], "does not pair"),
    "unknown device": (["--pgd", "--device", "tpu"], "device"),
    "threads zero": (["--pgd", "--threads", "0"], "threads must be an integer >= 1"),
    "ddim has no adjoint": (["--pgd", "--grad", "adjoint", "--solver", "ddim"], "no adjoint"),
    "dpm-solver has no adjoint": (["--pgd", "--grad", "adjoint", "--solver", "dpm-solver-2m"], "no adjoint"),
    "eta with euler": (["--pgd", "--eta", "0.3"], "--eta applies to the ddim solver"),
    "eta below zero": (["--pgd", "--solver", "ddim", "--eta", "-0.1"], "eta must be in [0, 1]"),
    "unknown precision": (["--pgd", "--precision", "int8"], "unknown precision"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_attack_bad_input(tiny, tmp_path, cli_error, case):
    args, needle = BAD[case]
    out = tmp_path / "o"
    cli_error(needle, "attack", "--config", str(tiny), "--out", str(out), *args)
    assert not out.exists()


def test_attack_refuses_existing_output(tiny, tmp_path, cli_error):
    (tmp_path / "taken").mkdir()
    cli_error("already exists", "attack", "--pgd", "--config", str(tiny), "--out", str(tmp_path / "taken"))


def test_attack_missing_model(tiny, tmp_path, cli_error):
    cfg = tmp_path / "nomodel.toml"
    cfg.write_text(tiny.read_text().replace(str(tmp_path / "eps.pt"), str(tmp_path / "gone.pt")))
    cli_error("not found", "attack", "--autoattack", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_gradcheck_same_process(tiny, tmp_path, run_cli):
    out = tmp_path / "gc"
    code, stdout, err = run_cli("gradcheck", "--config", str(tiny), "--steps", "3,6", "--solver",
                                "reversible_heun", "--same-process", "--n-examples", "2", "--out", str(out))
    assert code == 0, err
    rows = json.loads((out / "gradcheck.json").read_text())["rows"]
    assert [r["steps"] for r in rows] == [3, 6]
    assert all(r["relative_error"] < 1e-4 for r in rows)


def test_gradcheck_fresh_process_reports_memory(tiny, tmp_path, run_cli):
    out = tmp_path / "gc"
    code, _, err = run_cli("gradcheck", "--config", str(tiny), "--steps", "4", "--n-examples", "2",
                           "--out", str(out))
    assert code == 0, err
    row = json.loads((out / "gradcheck.json").read_text())["rows"][0]
    assert row["exact_peak_mb"] is not None and row["exact_peak_mb"] >= 0


@pytest.mark.parametrize("args,needle", [(["--steps", "0"], "--steps"), (["--steps", "a,b"], "--steps"),
                                         (["--method", "carlini"], "method"), (["--solver", "ddpm"], "ddpm"),
                                         (["--n-examples", "0"], "n-examples"), (["--t-star", "0"], "t*"),
                                         (["--adjoint-method", "srk"], "does not pair")])
def test_gradcheck_bad_input(tiny, tmp_path, cli_error, args, needle):
    cli_error(needle, "gradcheck", "--config", str(tiny), "--out", str(tmp_path / "o"), *args)
    assert not (tmp_path / "o").exists()


def test_attack_threads_recorded_and_restored(tiny, tmp_path, run_cli):
    """--threads holds while the attack runs (recorded in summary.json); the process's own
    setting is back afterwards (the command line runs in-process here)."""
    import torch
    before = torch.get_num_threads()
    out = tmp_path / "t"
    code, stdout, err = run_cli("attack", "--pgd", "--config", str(tiny), "--out", str(out), "--pgd-steps", "1",
                                "--eot", "1", "--n-examples", "1", "--score-draws", "1", "--threads", "2")
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["settings"]["threads"] == 2
    assert "2 torch thread(s)" in stdout
    assert torch.get_num_threads() == before


def test_digits_attack_default_runs_on_one_thread():
    from sdepure.config import load_config
    from sdepure.settings import attack_from_config
    assert attack_from_config(load_config("digits"), "autoattack", {}).threads == 1
    bad = {**load_config("digits"), "attack": {**load_config("digits")["attack"], "threads": "two"}}
    with pytest.raises(Exception, match="threads"):
        attack_from_config(bad, "autoattack", {})
