"""Shared by the benchmarks: a row counter on a network, the certification flags."""
from __future__ import annotations


class Counter:
    def __init__(self, module):
        self.rows = self.calls = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.rows += args[0].shape[0]
        self.calls += 1

    def take(self) -> tuple[int, int]:
        out = (self.rows, self.calls)
        self.rows = self.calls = 0
        return out


def add_certify_arguments(ap, skip: int = 4) -> None:
    """The digits default's certification settings as flags (steps.py, early_stop.py)."""
    ap.add_argument("--config", default="digits")
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--n0", type=int, default=32)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stop", type=int, default=None)
    ap.add_argument("--skip", type=int, default=skip)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)


def certify_settings(cfg: dict, args, **purifier):
    """DensePure certification settings from those flags and the purifier's own (votes, solver, ...)."""
    from sdepure.settings import certify_from_config

    return certify_from_config(cfg, dict(name="densepure", sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha,
                                         batch=args.batch, start=args.start, stop=args.stop, skip=args.skip,
                                         seed=args.seed, **purifier))
