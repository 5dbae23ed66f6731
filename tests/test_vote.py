"""DensePure's early-stopped vote: exact (the full vote's labels), cheaper (counted network calls), in
rounds chosen by its cost model."""
import itertools

import pytest
import torch

from sdepure import defense as purify
from sdepure.brownian import GridBrownian, Streams
from sdepure.defense import Defense, VoteCost, early_vote
from sdepure.settings import Purifier
from sdepure.models.gmm import GaussianMixture, GaussianMixtureModel
from sdepure.rng import derive_seed
from sdepure.schedules import LinearVP
from sdepure.smoothing import Smooth, certify_images
from sdepure.solvers import Sampler, solve

from helpers import MEANS, NearestMean


def _final_winners(counts, remaining, classes):
    """Every winner majority_vote can still return after `remaining` more votes (brute force)."""
    winners = set()
    for rest in itertools.product(range(classes), repeat=remaining):
        final = counts.clone()
        for c in rest:
            final[c] += 1
        winners.add(int(purify.majority_vote(torch.repeat_interleave(torch.arange(classes), final)[None],
                                             classes)))
    return winners


def _all_counts(classes, total):
    for c in itertools.product(range(total + 1), repeat=classes):
        if sum(c) == total:
            yield torch.tensor(c)


@pytest.mark.parametrize("classes,votes", [(3, 5), (3, 6), (4, 5)])
def test_vote_decided_and_votes_to_decide_against_brute_force(classes, votes):
    """vote_decided is True exactly when no continuation changes the winner; votes_to_decide is
    the fewest further votes after which some continuation has decided the vote."""
    for done in range(votes):
        remaining = votes - done
        for counts in _all_counts(classes, done):
            decided = bool(purify.vote_decided(counts[None], remaining))
            assert decided == (len(_final_winners(counts, remaining, classes)) == 1), (counts, remaining)
            if decided:
                continue
            fewest = next(j for j in range(1, remaining + 1)
                          if any(purify.vote_decided((counts + torch.bincount(torch.tensor(extra), minlength=classes))[None],
                                                     remaining - j)
                                 for extra in itertools.product(range(classes), repeat=j)))
            assert int(purify.votes_to_decide(counts[None], remaining)) == fewest, (counts, remaining)


class CountingModel(GaussianMixtureModel):
    """Counts network evaluations (rows) of the exact GMM score (eps goes through score)."""

    def __init__(self, mixture, schedule):
        super().__init__(mixture, schedule)
        self.rows = 0

    def score(self, x, t):
        self.rows += x.shape[0]
        return super().score(x, t)


def _first_decided(labels, classes):
    """Runs a one-at-a-time vote evaluates for each input: the shortest prefix that decides it."""
    out = []
    for row in labels:
        counts = torch.zeros(classes, dtype=torch.long)
        for m, label in enumerate(row.tolist(), start=1):
            counts[label] += 1
            if purify.vote_decided(counts[None], len(row) - m):
                out.append(m)
                break
    return torch.tensor(out)


def test_per_vote_remaining_matches_the_scalar_form():
    """vote_decided and votes_to_decide with one remaining count per vote (early_vote's rounds)."""
    gen = torch.Generator().manual_seed(5)
    counts = torch.randint(0, 6, (200, 4), generator=gen)
    remaining = torch.randint(0, 9, (200,), generator=gen)
    for fn in (purify.vote_decided, purify.votes_to_decide):
        each = torch.stack([fn(counts[b:b + 1], int(remaining[b]))[0] for b in range(200)])
        assert torch.equal(fn(counts, remaining), each)


@pytest.mark.parametrize("votes", [5, 10, 40])
def test_early_vote_rounds_against_a_one_at_a_time_vote(votes):
    """On given run labels, for any cost model: the full vote's winners, every pair evaluated at
    most once, no more rows than the full vote. Free solves: exactly a one-at-a-time vote's rows;
    free rows: one solve of everything; costly solves: fewer rounds than free ones."""
    classes, batch = 4, 300
    gen = torch.Generator().manual_seed(votes)
    bias = torch.rand(batch, classes, generator=gen) ** 4  # from clear-cut votes to near ties
    labels = torch.multinomial(bias / bias.sum(1, keepdim=True), votes, replacement=True, generator=gen)
    winners = purify.majority_vote(labels, classes)
    one_at_a_time = int(_first_decided(labels, classes).sum())
    solves_at = {}
    for cost in [VoteCost(0.0, 1.0), VoteCost(1.0, 0.0), VoteCost(30.0, 1.0), VoteCost(1e-3, 1e-4)]:
        seen = set()

        def labels_of(inputs, runs):
            pairs = set(zip(inputs.tolist(), runs.tolist()))
            assert len(pairs) == len(inputs) and not seen & pairs
            seen.update(pairs)
            return labels[inputs, runs]

        counts, rows, solves = early_vote(labels_of, batch, votes, classes, cost)
        solves_at[cost] = solves
        assert torch.equal(counts.argmax(1), winners) and rows == len(seen)
        assert one_at_a_time <= rows <= batch * votes
        if cost.per_solve == 0:
            assert rows == one_at_a_time
        if cost.per_row == 0:
            assert solves == 1 and rows == batch * votes
    assert solves_at[VoteCost(30.0, 1.0)] <= solves_at[VoteCost(0.0, 1.0)]
    if votes == 40:
        assert solves_at[VoteCost(30.0, 1.0)] < solves_at[VoteCost(0.0, 1.0)], solves_at


@pytest.mark.parametrize("solver,votes", [("euler", 10), ("ddpm", 9), ("euler", 40)])
def test_early_stop_gives_the_full_vote_with_fewer_network_calls(solver, votes):
    steps, sigma, classes = 4, 0.2, 3
    model = CountingModel(GaussianMixture(MEANS, [0.08] * 3, weights=[0.4, 0.35, 0.25]), LinearVP())
    settings = Purifier("densepure", sigma=sigma, votes=votes, steps=steps, solver=solver)
    full = Defense(Purifier(**{**settings.to_dict(), "early_stop": False}), model, NearestMean(MEANS), classes)
    gen = torch.Generator().manual_seed(0)
    # noisy inputs around the three means (on [0, 1]): mostly clear-cut votes, some ambiguous
    centers = (torch.tensor(MEANS, dtype=torch.float64) + 1) / 2
    x = centers[torch.arange(64) % 3] + sigma * torch.randn(64, 2, generator=gen, dtype=torch.float64)
    model.rows = 0
    labels_full = full.predict(x, 3)
    rows_full = model.rows
    assert rows_full == steps * votes * len(x)
    run_labels = full.run_logits(x, Streams.batch(3, len(x)), range(votes)).argmax(-1).T
    assert torch.equal(purify.majority_vote(run_labels, classes), labels_full)
    # the first vote evaluates all runs at once and measures the cost model (with two one-row solves)
    early = Defense(settings, model, NearestMean(MEANS), classes)
    model.rows = 0
    assert torch.equal(early.predict(x, 3), labels_full) and model.rows == rows_full + 2 * steps
    assert early.vote_cost.per_solve >= 0 and early.vote_cost.per_row >= 0
    model.rows = 0
    assert torch.equal(early.predict(x, 3), labels_full) and model.rows <= rows_full
    # free solves: exactly the network calls of a one-at-a-time vote, each input stopping at the
    # first run after which its winner is fixed (from the full vote's own run labels)
    early.vote_cost = VoteCost(0.0, 1.0)
    model.rows = 0
    assert torch.equal(early.predict(x, 3), labels_full)
    assert model.rows == steps * int(_first_decided(run_labels, classes).sum())
    assert model.rows < rows_full * (0.7 if votes == 40 else 0.85), model.rows / rows_full
    # solves far dearer than rows: one solve of every run, as the full vote
    early.vote_cost = VoteCost(100.0, 1e-3)
    model.rows = 0
    assert torch.equal(early.predict(x, 3), labels_full) and model.rows == rows_full


def test_run_k_gets_the_same_noise_whatever_is_evaluated():
    """Run k of input b is a plain solve of the whole batch with seed derive_seed(seed, k), row b."""
    model = GaussianMixtureModel(GaussianMixture(MEANS, [0.08] * 3), LinearVP())
    for solver in ("euler", "ddpm", "ddim"):
        eta = 1.0 if solver == "ddim" else 0.0
        base = Defense(Purifier("densepure", sigma=0.5, votes=4, steps=5, solver=solver, eta=eta), model,
                       NearestMean(MEANS), 3)
        x = torch.rand(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        xt = base.x_t_star(x)
        rows = [5, 0, 2]
        some = base.run_logits(x[rows], Streams.batch(7, 6).take(rows), runs=[3, 1])
        for i, k in enumerate([3, 1]):
            plain = solve(model, xt, base.t_star, Sampler(solver, 5, eta), derive_seed(7, k))
            expected = base.classifier((plain.clamp(-1, 1) + 1) / 2)[rows]
            assert torch.allclose(some[i], expected, atol=1e-12), solver


def test_certify_tsv_identical_with_and_without_early_stop():
    """The shipped digits models, 3 images, K = 10: every certify.tsv column but time agrees."""
    from sdepure.classifiers import build_classifier
    from sdepure.config import load_config
    from sdepure.data import load_dataset
    from sdepure.models import build_score_model

    cfg = load_config("digits")
    model = build_score_model(cfg["model"])
    classifier = build_classifier(cfg["classifier"], False, 10)
    x, y, _ = load_dataset(cfg["data"])
    rows = {}
    for early_stop in (False, True):
        base = Defense(Purifier("densepure", sigma=0.5, votes=10, steps=3, solver="euler", early_stop=early_stop),
                       model, classifier, 10)
        smooth = Smooth(base.predict, 10, 0.5)
        with torch.no_grad():
            out = certify_images(smooth, x, y, [0, 7, 21], n0=8, n=40, alpha=0.01, batch=24, seed=0)
        rows[early_stop] = [{k: v for k, v in r.items() if k != "time"} for r in out]
    assert rows[True] == rows[False]
    assert any(r["predict"] >= 0 for r in rows[True])


@pytest.mark.parametrize("solver", ["ddim", "dpm-solver-2m", "ode-euler"])
def test_deterministic_purifier_votes_with_one_run(solver):
    """Runs of a noise-free solver are all equal, so the early-stopped vote evaluates one."""
    model = CountingModel(GaussianMixture(MEANS, [0.08] * 3), LinearVP())
    x = torch.rand(32, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = {}
    for early_stop in (False, True):
        base = Defense(Purifier("densepure", sigma=0.5, votes=7, steps=4, solver=solver, early_stop=early_stop),
                       model, NearestMean(MEANS), 3)
        model.rows = 0
        labels[early_stop] = base.predict(x, 1)
        calls_per_row = model.rows // (4 * len(x))
        assert calls_per_row == (1 if early_stop else 7)
    assert torch.equal(labels[True], labels[False])
    assert not Defense(Purifier("densepure", sigma=0.5, votes=7, steps=4, solver="ddim", eta=0.5), model,
                       NearestMean(MEANS), 3).deterministic
