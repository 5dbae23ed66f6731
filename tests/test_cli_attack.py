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
    assert scored["draws"] == 3 and scored["any_of_n"] <= scored["majority"] + 1e-12
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
    "step size with autoattack": (["--autoattack", "--step-size", "0.01"], "apply to --pgd"),
    "eot batch with autoattack": (["--autoattack", "--eot-batch", "2"], "apply to --pgd"),
    "autoattack iterations zero": (["--autoattack", "--pgd-steps", "0"], "pgd-steps"),
    "diffattack without reverse process": (["--diffattack", "--method", "carlini"], "intermediate states"),
    "diffattack without purifier": (["--diffattack", "--method", "none"], "no purifier"),
    "diffattack with bpda": (["--diffattack", "--grad", "bpda"], "BPDA has none"),
    "diffattack step size": (["--diffattack", "--step-size", "0.01"], "2 eps"),
    "negative dev weight": (["--diffattack", "--dev-weight", "-1"], "dev-weight"),
    "nan dev weight": (["--diffattack", "--dev-weight", "nan"], "dev-weight"),
    "malformed dev weight": (["--diffattack", "--dev-weight", "heavy"], "dev-weight"),
    "dev weight without diffattack": (["--pgd", "--dev-weight", "0.5"], "--diffattack only"),
    "eot batch zero": (["--pgd", "--eot-batch", "0"], "eot-batch"),
    "eot batch above eot": (["--diffattack", "--eot", "4", "--eot-batch", "5"], "eot-batch"),
    "fixed randomness with eot": (["--pgd", "--fixed-randomness", "--eot", "3"], "deterministic"),
    "fixed randomness without randomness": (["--pgd", "--fixed-randomness", "--method", "none"], "no randomness"),
    "fixed randomness overlapping balls": (["--pgd", "--fixed-randomness", "--eps", "0.6"], "apart"),
    "no attack given": (["--eot", "2"], "--diffattack"),
    "bpda with another grad": (["--bpda", "--grad", "exact"], "bpda"),
    "votes with diffpure": (["--pgd", "--votes", "4"], "densepure only"),
    "zero step size": (["--pgd", "--step-size", "0"], "step size"),
    "t-star out of range": (["--pgd", "--t-star", "1.5"], "t*"),
    "unknown method": (["--pgd", "--method", "purepure"], "unknown method"),
    "batch zero": (["--pgd", "--batch", "0"], "batch"),
    "steps zero": (["--pgd", "--steps", "0"], "steps"),
    "variance learned without a variance output": (["--pgd", "--solver", "ddpm", "--variance", "learned"],
                                                   "variance output"),
    "variance with euler": (["--pgd", "--variance", "beta"], "applies to the ddpm solver"),
    "unknown solver": (["--pgd", "--solver", "rk45"], "unknown solver"),
    "score-draws zero": (["--pgd", "--score-draws", "0"], "score-draws"),
    "negative start": (["--pgd", "--start", "-2"], "start"),
    "adjoint method mismatch": (["--pgd", "--grad", "adjoint", "--adjoint-method", "midpoint"], "does not pair"),
    "unknown device": (["--pgd", "--device", "tpu"], "device"),
    "threads zero": (["--pgd", "--threads", "0"], "threads must be an integer >= 1"),
    "ddim has no adjoint": (["--pgd", "--grad", "adjoint", "--solver", "ddim"], "no adjoint"),
    "dpm-solver has no adjoint": (["--pgd", "--grad", "adjoint", "--solver", "dpm-solver-2m"], "no adjoint"),
    "eta with euler": (["--pgd", "--eta", "0.3"], "eta applies to the ddim solver"),
    "eta below zero": (["--pgd", "--solver", "ddim", "--eta", "-0.1"], "eta must be in [0, 1]"),
    "unknown precision": (["--pgd", "--precision", "int8"], "unknown precision"),
}


def test_attack_diffattack_end_to_end(tiny, tmp_path, run_cli):
    out = tmp_path / "da"
    code, stdout, err = run_cli("attack", "--diffattack", "--config", str(tiny), "--out", str(out), "--pgd-steps", "2",
                                "--eot", "2", "--n-examples", "2", "--grad", "adjoint", "--dev-weight", "0.5")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    st = summary["settings"]
    assert summary["attack"] == "diffattack" and st["dev_weight"] == 0.5 and st["eot_batch"] == 2
    assert st["purifier"]["grad"] == "adjoint"
    assert summary["max_perturbation"]["Linf"] <= 0.1 + 1e-6
    (row,) = summary["table"]
    assert row["attack"] == "DiffAttack" and row["randomness"] == "fresh" and row["draws"] == 3
    assert row["robust_any_of_n"] <= row["robust_majority"] + 1e-12 and row["seconds"] > 0
    assert row["peak_memory_mb"] > 0
    assert "| DiffAttack | fresh |" in stdout
    header = (out / "examples.tsv").read_text().splitlines()[0].split("\t")
    assert header[5:8] == ["adv_draws_correct", "adv_majority_correct", "adv_any_of_n_correct"]


@pytest.mark.parametrize("kind", ["--pgd", "--diffattack", "--autoattack"])
def test_attack_fixed_randomness(tiny, tmp_path, run_cli, kind):
    """Fixed randomness: one EOT draw, a 'fixed' table row (one draw: single = majority = any-of-N)
    beside the 'fresh' row scoring the same adversarial examples under fresh draws."""
    out = tmp_path / "fx"
    args = ["attack", kind, "--fixed-randomness", "--config", str(tiny), "--out", str(out), "--n-examples", "2",
            "--pgd-steps", "2", "--method", "densepure", "--votes", "2"]
    code, _, err = run_cli(*args)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["fixed_randomness"] is True and summary["settings"]["eot"] == 1
    rows = {r["randomness"]: r for r in summary["table"]}
    assert set(rows) == {"fresh", "fixed"}
    fx = rows["fixed"]
    assert fx["draws"] == 1 and fx["robust_single"] == fx["robust_majority"] == fx["robust_any_of_n"]
    # the attack saw the fixed draw: its robust flags are the fixed row's robust accuracy
    assert summary["robust_accuracy"] == pytest.approx(fx["robust_single"])


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
