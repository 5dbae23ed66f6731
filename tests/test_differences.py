"""The cheap, exact entries of benchmarks/differences.py (the README's table of differences from
the authors' code), run against the current sdepure so that the script and its claims cannot
drift silently: each test fails if sdepure changes the behaviour an entry describes."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "differences.py"


@pytest.fixture(scope="module")
def differences():
    spec = importlib.util.spec_from_file_location("differences", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vote_ties_are_the_only_disagreement(differences):
    """DensePure's max(labels, key=labels.count) against defense.majority_vote: the entry asserts
    that every vote they disagree on is a tie; they do disagree, on ties only."""
    entry = differences.densepure_vote_entry()
    for case in entry["detail"].values():
        assert 0 < case["differ"] <= case["ties"]
        assert case["differ_without_tie"] == 0


def test_carlini_step_is_sdepures_first_rule(differences):
    """Carlini et al.'s walk to the first table step reaching 2 sigma is DiscreteVP.t_index_star
    with rule 'first' (asserted inside the entry), and the noise it adds is never below sigma."""
    entry = differences.carlini_entry()
    rows = entry["detail"]["per_sigma"]
    assert len(rows) == 2 * len(differences.SIGMAS)
    assert all(r["relative_excess"] >= 0 for r in rows)
    assert 0 < entry["detail"]["grid_max"]["cifar10"]["max"] < entry["detail"]["grid_max"]["imagenet"]["max"] < 0.01


@pytest.mark.parametrize("sigma", [0.25, 0.5, 1.0])
def test_densepure_chains_against_sdepures(differences, sigma):
    """DensePure's respaced chain (written out in the script) against sdepure's densepure Defense
    and solvers' subsequence: the same model indices on the ImageNet table; on the CIFAR-10 cosine
    table DensePure's real-valued t* puts some indices one above sdepure's, never elsewhere; the
    input scales agree to the entry's size."""
    from sdepure.schedules import DiscreteVP

    imagenet = (differences.densepure_chain("imagenet", sigma),
                differences.sdepure_chain(DiscreteVP.linear(1000), sigma))
    assert imagenet[0]["idx"] == imagenet[1]["idx"] and imagenet[0]["t_star"] == imagenet[1]["t_star_index"]
    cifar = (differences.densepure_chain("cifar10", sigma),
             differences.sdepure_chain(DiscreteVP.cosine(4000), sigma))
    shift = [a - b for a, b in zip(cifar[0]["idx"], cifar[1]["idx"])]
    assert set(shift) <= {0, 1} and shift[0] == 1
    for dp, sd in (imagenet, cifar):
        assert abs(dp["scale"] / sd["scale"] - 1) < 3e-4


def test_diffpure_imagenet_time_input(differences):
    """The diffpure-imagenet config feeds floor(1000 t) as DiffPure does; only DiffPure's float32
    grid (t = 0.14999998 at its first node) makes its first two steps feed 149, 148 where
    sdepure's float64 grid feeds 150, 149. The time inputs are recorded from solvers.solve."""
    row = differences.time_input_row("imagenet", 150)
    assert row["differing_steps"] == [0, 1]
    assert row["diffpure_first"] == [149.0, 148.0, 148.0]
    assert row["sdepure_first"] == [150.0, 149.0, 148.0]
