"""fit-acg's learning-rate schedule and stopping rule (fixed steps, or ``--steps auto``)."""

from __future__ import annotations

import math

import numpy as np

from .config import TrainConfig


class Schedule:
    """The learning rate of each step and when to stop.

    A fixed schedule (``cfg.steps`` an integer): linear warm-up, then cosine decay to zero at ``cfg.steps``.
    ``--steps auto`` (``cfg.steps`` None): linear warm-up, then the peak rate; every ``converge_window`` steps
    the mean modularity of the last window is compared with the window before; when it rose by less than the
    fraction ``converge_tol`` of it, the rate falls linearly to zero over ``cooldown_fraction`` of the steps
    done, and the fit stops there. The cool-down also starts early enough to end at ``max_steps``.
    ``observe`` must see every step's modularity, averaged over the global batch so that every process of a
    distributed fit decides alike (it keeps the last two windows); ``state``/``load_state`` carry the decision
    across a resume."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.q: list[float] = []
        self.decay_from: int | None = None
        self.decay_len = 0
        self.reason = ""

    def lr(self, step: int) -> float:
        c, w = self.cfg, self.cfg.warmup_steps
        if step < w:
            return c.lr * (step + 1) / w
        if not c.auto:
            t = (step - w) / max(1, c.steps - w)
            return c.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if self.decay_from is None or step < self.decay_from:
            return c.lr
        return c.lr * max(0.0, 1 - (step - self.decay_from + 1) / (self.decay_len + 1))

    def _cooldown(self, done: int, reason: str) -> None:
        c = self.cfg
        self.decay_from = done
        self.decay_len = max(0, min(c.max_steps - done, round(c.cooldown_fraction * done)))
        self.reason = reason

    def observe(self, step: int, modularity: float) -> bool:
        """Record step ``step``'s modularity; True when the fit ends after this step."""
        c = self.cfg
        done = step + 1
        if not c.auto:
            if done >= c.steps and not self.reason:
                self.reason = f"ran the fixed schedule of {c.steps} steps"
            return done >= c.steps
        if self.decay_from is None:
            win, w = c.converge_window, c.warmup_steps
            self.q = (self.q + [float(modularity)])[-2 * win :]  # the two windows compared, no more
            if done >= w + 2 * win and (done - w) % win == 0 and len(self.q) >= 2 * win:
                last, prev = float(np.mean(self.q[-win:])), float(np.mean(self.q[-2 * win : -win]))
                if last - prev < c.converge_tol * abs(prev):
                    self._cooldown(
                        done,
                        f"converged: the mean modularity of steps {done - win + 1}-{done} ({last:.4f}) was not "
                        f"{100 * c.converge_tol:g}% above that of the {win} steps before ({prev:.4f})",
                    )
            if self.decay_from is None and done + round(c.cooldown_fraction * done) >= c.max_steps:
                self._cooldown(done, f"reached the cap of {c.max_steps} steps before converging")
        return done >= min(c.max_steps, self.decay_from + self.decay_len) if self.decay_from is not None else False

    def state(self) -> dict:
        return {"q": self.q, "decay_from": self.decay_from, "decay_len": self.decay_len, "reason": self.reason}

    def load_state(self, st: dict) -> None:
        self.q = [float(v) for v in st.get("q", [])]
        self.decay_from = st.get("decay_from")
        self.decay_len = int(st.get("decay_len", 0))
        self.reason = str(st.get("reason", ""))
