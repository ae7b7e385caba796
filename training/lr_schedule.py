"""Learning-rate schedules as pure functions of the training step.

Schedule strings (``--learning-rate-schedule``):

* ``cosine`` - cosine decay from the initial rate to ``0.01 *`` the initial rate (the paper);
* ``cosine:<eta_min>`` - cosine decay to the absolute rate ``eta_min``:
  ``lr(t) = eta_min + (lr0 - eta_min) (1 + cos(pi t / T)) / 2`` over ``T`` total steps;
* ``multistep:<e1>:<e2>:...`` - the rate is multiplied by 0.1 at the start of each listed epoch;
* ``constant`` - no decay.

A linear warm-up (``--warmup-epochs``, ``W`` steps) comes first when asked: over the steps
``t = 0 .. W-1`` the rate rises linearly from ``lr0 / W`` to ``lr0``,

    lr(t) = lr0 (t + 1) / W,                          t < W,
    lr(t) = lr0 f(t - W; T - W),                      t >= W,

and the schedule ``f`` then runs over the remaining ``T - W`` steps on its own clock (it starts at
``f = 1`` when the warm-up ends; multistep milestones count from there, as cosine's ``T`` does).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

COSINE_DEFAULT_FLOOR = 0.01  # cosine without eta_min decays to 1% of the initial rate
MULTISTEP_GAMMA = 0.1


class ScheduleKind(str, enum.Enum):
    COSINE = "cosine"
    MULTISTEP = "multistep"
    CONSTANT = "constant"


@dataclass(frozen=True)
class LrSchedule:
    kind: ScheduleKind
    eta_min: float | None = None  # cosine: absolute final rate (None: COSINE_DEFAULT_FLOOR * lr0)
    milestones: tuple[int, ...] = ()  # multistep: epochs

    def __str__(self) -> str:
        if self.kind is ScheduleKind.COSINE:
            return "cosine" if self.eta_min is None else f"cosine:{self.eta_min:g}"
        if self.kind is ScheduleKind.MULTISTEP:
            return "multistep:" + ":".join(str(m) for m in self.milestones)
        return "constant"


def parse_lr_schedule(text: str) -> LrSchedule:
    """Parse a schedule string (see the module doc); raises ``ValueError`` with a one-line reason."""
    kind_text, *args = text.strip().split(":")
    try:
        kind = ScheduleKind(kind_text.lower())
    except ValueError:
        raise ValueError(f"'{text}' is not cosine[:<eta_min>], multistep:<e1>:<e2>... or constant") from None
    if kind is ScheduleKind.CONSTANT:
        if args:
            raise ValueError(f"'{text}': constant takes no arguments")
        return LrSchedule(kind)
    if kind is ScheduleKind.COSINE:
        if len(args) > 1:
            raise ValueError(f"'{text}': cosine takes one argument, cosine:<eta_min>")
        if not args:
            return LrSchedule(kind)
        try:
            eta_min = float(args[0])
        except ValueError:
            raise ValueError(f"'{text}': eta_min '{args[0]}' is not a number") from None
        if not math.isfinite(eta_min) or eta_min < 0:
            raise ValueError(f"'{text}': eta_min must be a finite number >= 0")
        return LrSchedule(kind, eta_min=eta_min)
    try:
        milestones = tuple(int(a) for a in args)
    except ValueError:
        raise ValueError(f"'{text}': multistep milestones must be whole epochs, e.g. multistep:10:15") from None
    if not milestones or any(m < 1 for m in milestones) or list(milestones) != sorted(set(milestones)):
        raise ValueError(f"'{text}': give increasing epochs >= 1, e.g. multistep:10:15")
    return LrSchedule(kind, milestones=milestones)


def lr_factor(
    schedule: LrSchedule, step: int, total_steps: int, steps_per_epoch: int, base_lr: float, warmup_steps: int = 0
) -> float:
    """``lr(step) / base_lr``.

    Warm-up (``t < W = warmup_steps``): ``(t + 1) / W``. After it, with ``t`` and ``T`` counted
    from its end (``t - W``, ``T - W``): cosine: ``f = r + (1 - r) (1 + cos(pi min(t, T) / T)) / 2``
    with ``r = eta_min / base_lr``; multistep: ``f = 0.1^(number of milestones m with
    t >= m * steps_per_epoch)``; constant: 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    step, total_steps = step - warmup_steps, total_steps - warmup_steps
    if schedule.kind is ScheduleKind.CONSTANT:
        return 1.0
    if schedule.kind is ScheduleKind.MULTISTEP:
        return MULTISTEP_GAMMA ** sum(step >= m * steps_per_epoch for m in schedule.milestones)
    floor = COSINE_DEFAULT_FLOOR if schedule.eta_min is None else (schedule.eta_min / base_lr if base_lr > 0 else 0.0)
    progress = min(step, total_steps) / max(total_steps, 1)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
