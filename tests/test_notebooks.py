"""Execute every notebook in notebooks/ headless (nbclient, kernel python3) and check what it prints."""
import json
import sys
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "python3"
OUT_ENV = "SDEPURE_NOTEBOOK_OUT"


def _tools():
    """nbformat, nbclient and a python3 kernel that runs this interpreter, or a clear failure."""
    try:
        import nbclient
        import nbformat
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError as e:
        pytest.fail(f"notebook tests need nbclient, nbformat and ipykernel (pip install '.[test]'): {e}")
    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        pytest.fail(f"no Jupyter kernel named {KERNEL!r}; pip install ipykernel into {sys.prefix}")
    # jupyter_client maps a bare "python" to sys.executable; anything else is another interpreter
    if spec.argv[0] not in ("python", "python3", sys.executable):
        pytest.fail(f"kernel {KERNEL!r} runs {spec.argv[0]}, not {sys.executable}; "
                    f"remove the stray kernelspec at {spec.resource_dir}")
    return nbformat, nbclient


def _stdout(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream" and o.name == "stdout")


def _check_robust_regions_gmm(nb, out_png: Path):
    lines = [ln for ln in _stdout(nb).splitlines() if ln.startswith("CHECK ")]
    assert len(lines) == 1, "the notebook must print exactly one CHECK line"
    s = json.loads(lines[0][len("CHECK "):])
    # the finite vote reproduces the exact DensePure limit wherever the top class holds >= 75% of the mass
    assert s["far_points"] >= 30 and s["agreement_far"] >= 0.95, s
    assert s["agreement"] >= 0.85 and abs(s["agreement"] - s["expected_agreement"]) <= 0.1, s
    assert s["single_run_agreement"] < s["agreement"], s  # voting beats a single solve
    assert s["tweedie_err"] < 1e-8, s                       # OneShot is the posterior mean
    # the robust region is a union of several convex-looking pieces, larger than the raw classifier's
    assert s["robust_pieces"] >= 2 and s["min_piece_fill"] >= 0.9, s
    assert s["robust_area"] > 1.5 * s["raw_area"], s
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "figure not written to $" + OUT_ENV


def _check_robust_regions_digits(nb, out_png: Path):
    lines = [ln for ln in _stdout(nb).splitlines() if ln.startswith("CHECK ")]
    assert len(lines) == 1, "the notebook must print exactly one CHECK line"
    s = json.loads(lines[0][len("CHECK "):])
    assert s["size"] == "quick", s
    # three images by rule, each sliced for three smoothed classifiers on a 7 x 7 grid
    assert len(s["slices"]) == 3 and len(s["maps"]) == 9 and all(v == [7, 7] for v in s["maps"].values()), s
    assert len(s["curves"]) == 4, s  # none, carlini, diffpure, densepure read back from their run directories
    d = s["diagonal"]
    assert d["inputs"] >= 4 and d["certified"] == d["inputs"], d
    assert d["checked"] + d["none_found"] + d["not_confirmed"] == d["certified"], d
    assert d["above"] <= d["allowed"], d  # certificates above a confirmed attack distance: within the slack
    stem = out_png.with_suffix("")
    for part in ("maps", "scatter", "curves"):
        png = stem.with_name(f"{stem.name}-{part}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png.name} not written next to ${OUT_ENV}"
    rows = json.loads(stem.with_suffix(".json").read_text())["scatter"]
    assert len(rows) == d["inputs"] and all(r["radius"] > 0 for r in rows), rows


CHECKS = {"robust_regions_gmm": _check_robust_regions_gmm, "robust_regions_digits": _check_robust_regions_digits}
SIZE_ENV = "SDEPURE_NOTEBOOK_SIZE"


def test_expected_notebooks_present():
    assert {p.stem for p in NOTEBOOKS} >= set(CHECKS), f"missing notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_saved_without_outputs(path):
    nbformat, _ = _tools()
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: clear outputs before saving (cells {dirty})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    nbformat, nbclient = _tools()
    out_png = tmp_path / f"{path.stem}.png"
    monkeypatch.setenv(OUT_ENV, str(out_png))  # the kernel inherits the environment
    monkeypatch.setenv(SIZE_ENV, "quick")
    before = sorted(p.name for p in NOTEBOOK_DIR.iterdir())
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on any cell error
    assert sorted(p.name for p in NOTEBOOK_DIR.iterdir()) == before, "the notebook wrote into the repo"
    check = CHECKS.get(path.stem)
    if check is not None:
        check(nb, out_png)


def test_digits_notebook_refuses_an_unknown_size(tmp_path, monkeypatch):
    """A bad SDEPURE_NOTEBOOK_SIZE stops the setup cell with one clear message, before any work."""
    nbformat, nbclient = _tools()
    monkeypatch.setenv(SIZE_ENV, "huge")
    monkeypatch.setenv(OUT_ENV, str(tmp_path / "out" / "fig.png"))
    nb = nbformat.read(NOTEBOOK_DIR / "robust_regions_digits.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name=KERNEL, resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="SDEPURE_NOTEBOOK_SIZE='huge': choose quick or full"):
        client.execute()
    assert not (tmp_path / "out").exists()  # nothing made before the refusal
