"""Pure parts of compressed training: the Zhu & Gupta schedule, the pruner's exact sparsities, LR schedules."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.quantized import CompressionSpec, compress_model, compressed_layers
from pruning.masks import num_pruned
from pruning.schedule import GradualMagnitudePruner, PruningSchedule, PruningScope, magnitude_rule, zhu_gupta_sparsity
from training.lr_schedule import LrSchedule, ScheduleKind, lr_factor, parse_lr_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def test_zhu_gupta_formula_at_every_step() -> None:
    s_i, s_f, t0, n, dt = 0.1, 0.8, 7, 6, 5
    for t in range(60):
        if t < t0:
            expected = s_i
        elif t > t0 + n * dt:
            expected = s_f
        else:  # the paper's formula, written out independently
            expected = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3
        assert zhu_gupta_sparsity(t, s_i, s_f, t0, n, dt) == pytest.approx(expected, abs=1e-15)
    # cubic: the sparsity added in the first update interval is more than in the last
    first = zhu_gupta_sparsity(t0 + dt, s_i, s_f, t0, n, dt) - s_i
    last = s_f - zhu_gupta_sparsity(t0 + (n - 1) * dt, s_i, s_f, t0, n, dt)
    assert first > 10 * last


def test_schedule_from_epochs_update_steps() -> None:
    schedule = PruningSchedule.from_epochs(0.0, 0.75, start_epoch=1, last_epoch=3, delta_t=50, steps_per_epoch=100,
                                           max_epochs=5)  # fmt: skip
    # ramp from step 100 to the last step of epoch 3 (399): 5 whole intervals of 50
    assert (schedule.t0, schedule.delta_t, schedule.n) == (100, 50, 5)
    updates = [t for t in range(500) if schedule.is_update_step(t)]
    assert updates == [100, 150, 200, 250, 300, 350]
    assert schedule.sparsity_at(100) == 0.0 and schedule.sparsity_at(350) == 0.75
    assert schedule.sparsity_at(200) == pytest.approx(0.75 - 0.75 * (1 - 100 / 250) ** 3)
    # a ramp shorter than delta_t shrinks the spacing; the last epoch is clipped to the run
    short = PruningSchedule.from_epochs(0.0, 0.5, 0, 15, delta_t=50, steps_per_epoch=7, max_epochs=2)
    assert (short.t0, short.n, short.delta_t) == (0, 1, 13) and short.last_update_step == 13
    one_step = PruningSchedule.from_epochs(0.2, 0.5, 0, 0, delta_t=50, steps_per_epoch=1, max_epochs=1)
    assert one_step.is_update_step(0) and one_step.sparsity_at(0) == 0.5


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 3, groups=1), nn.Flatten(), nn.Linear(5 * 4 * 4, 7))


@pytest.mark.parametrize("scope", list(PruningScope))
def test_pruner_reaches_exact_final_sparsity(scope: PruningScope) -> None:
    model = _toy_model()
    layers = compress_model(model, CompressionSpec(prune=True))
    s_f = 0.63
    schedule = PruningSchedule(0.0, s_f, t0=2, n=4, delta_t=3)
    pruner = GradualMagnitudePruner(compressed_layers(model), schedule, magnitude_rule(scope))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 7, (16,))
    previous = {name: torch.ones_like(layer.weight, dtype=torch.bool) for name, layer in layers.items()}
    for step in range(20):
        pruner.update(step)
        for name, layer in layers.items():  # masks only shrink
            assert not (layer.weight_mask & ~previous[name]).any()
            previous[name] = layer.weight_mask.clone()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        for layer in layers.values():  # pruned weights get no gradient
            assert (layer.weight.grad[~layer.weight_mask] == 0).all()
        optimizer.step()
        pruner.apply_masks()
    zeros = {name: int((layer.weight == 0).sum()) for name, layer in layers.items()}
    kept = {name: int(layer.weight_mask.sum()) for name, layer in layers.items()}
    numels = {name: layer.weight.numel() for name, layer in layers.items()}
    if scope is PruningScope.LAYER:
        for name in layers:
            assert numels[name] - kept[name] == num_pruned(numels[name], s_f) == zeros[name]
    elif scope is PruningScope.CHANNEL:
        for name, layer in layers.items():
            channels = layer.weight.shape[0]
            per_channel = num_pruned(numels[name] // channels, s_f)
            pruned = (~layer.weight_mask).reshape(channels, -1).sum(dim=1)
            assert pruned.tolist() == [per_channel] * channels, name
            assert (layer.weight == 0).reshape(channels, -1).sum(dim=1).tolist() == [per_channel] * channels, name
    else:
        total = sum(numels.values())
        assert total - sum(kept.values()) == num_pruned(total, s_f) == sum(zeros.values())
        # one threshold for all layers: they end at different sparsities
        assert len({round(z / numels[n], 3) for n, z in zeros.items()}) > 1


def test_lr_schedules_closed_forms() -> None:
    total, per_epoch, base = 100, 10, 0.2
    cosine = parse_lr_schedule("cosine:0.002")
    assert cosine == LrSchedule(ScheduleKind.COSINE, eta_min=0.002)
    for step in (0, 13, 50, 99, 100):
        lr = base * lr_factor(cosine, step, total, per_epoch, base)
        assert lr == pytest.approx(0.002 + (base - 0.002) * (1 + math.cos(math.pi * step / total)) / 2, rel=1e-12)
    default = parse_lr_schedule("cosine")
    assert lr_factor(default, total, total, per_epoch, base) == pytest.approx(0.01)
    multistep = parse_lr_schedule("multistep:3:7")
    factors = [lr_factor(multistep, step, total, per_epoch, base) for step in (0, 29, 30, 69, 70, 99)]
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_factor(parse_lr_schedule("constant"), 55, total, per_epoch, base) == 1.0
    assert str(parse_lr_schedule("COSINE:1e-4")) == "cosine:0.0001"


@pytest.mark.parametrize("text", ["cosin", "cosine:abc", "cosine:-1", "cosine:1:2", "multistep", "multistep:5:3",
                                  "multistep:x", "multistep:0", "constant:1", ""])  # fmt: skip
def test_bad_schedule_strings(text: str) -> None:
    with pytest.raises(ValueError, match=text.split(":")[0] if text else "constant"):
        parse_lr_schedule(text)


def test_each_optimizer_follows_its_own_schedule() -> None:
    from training.builders import build_optimizers, build_schedulers
    from training.config import TrainConfig

    model = _toy_model()
    config = TrainConfig.from_options(learning_rate=0.1, learning_rate_schedule="multistep:1", quant_learning_rate=0.01,
                                      quant_learning_rate_schedule="cosine:0", max_epochs=2, n_bits=4,
                                      quant_setup="all")  # fmt: skip
    compress_model(model, CompressionSpec(weight_quant=config.quant.weight_quantizer()))
    optimizers = build_optimizers(model, config)
    assert len(optimizers["quant"].param_groups[0]["params"]) == 3  # one step size per layer
    schedulers = build_schedulers(optimizers, config, steps_per_epoch=5)
    rates = []
    for _ in range(10):
        rates.append((optimizers["model"].param_groups[0]["lr"], optimizers["quant"].param_groups[0]["lr"]))
        for name in optimizers:
            optimizers[name].step()
            schedulers[name].step()
    assert [r[0] for r in rates] == pytest.approx([0.1] * 5 + [0.01] * 5)
    assert [r[1] for r in rates] == pytest.approx([0.01 * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(10)])


@pytest.mark.parametrize("text", ["cosine", "cosine:0.001", "multistep:1:3", "constant"])
def test_warmup_then_the_schedule_over_the_remaining_steps(text: str) -> None:
    """Closed form: lr0 (t + 1) / W during the W warm-up steps, then the schedule on its own clock t - W of T - W steps."""
    from training.builders import build_optimizers, build_schedulers
    from training.config import TrainConfig

    per_epoch, epochs, warmup_epochs, lr0, quant_lr0 = 5, 6, 2, 0.2, 0.01
    warmup, total = warmup_epochs * per_epoch, epochs * per_epoch
    model = _toy_model()
    config = TrainConfig.from_options(learning_rate=lr0, learning_rate_schedule=text, max_epochs=epochs,
                                      warmup_epochs=warmup_epochs, quant_learning_rate=quant_lr0,
                                      quant_learning_rate_schedule="constant", n_bits=4, quant_setup="all")  # fmt: skip
    compress_model(model, CompressionSpec(weight_quant=config.quant.weight_quantizer()))
    optimizers = build_optimizers(model, config)
    schedulers = build_schedulers(optimizers, config, per_epoch)

    def after_warmup(t: int) -> float:  # the schedule alone, t counted from the end of the warm-up
        if text == "cosine":
            return lr0 * (0.01 + 0.99 * (1 + math.cos(math.pi * t / (total - warmup))) / 2)
        if text == "cosine:0.001":
            return 0.001 + (lr0 - 0.001) * (1 + math.cos(math.pi * t / (total - warmup))) / 2
        if text == "multistep:1:3":
            return lr0 * 0.1 ** ((t >= per_epoch) + (t >= 3 * per_epoch))
        return lr0

    for step in range(total):
        expected = lr0 * (step + 1) / warmup if step < warmup else after_warmup(step - warmup)
        assert optimizers["model"].param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12), step
        quant_expected = quant_lr0 * (step + 1) / warmup if step < warmup else quant_lr0
        assert optimizers["quant"].param_groups[0]["lr"] == pytest.approx(quant_expected, rel=1e-12), step
        for name in optimizers:
            optimizers[name].step()
            schedulers[name].step()
    assert lr_factor(parse_lr_schedule(text), warmup - 1, total, per_epoch, lr0, warmup) == 1.0  # warm-up ends at lr0


def test_warmup_must_leave_epochs_for_the_schedule() -> None:
    from training.config import TrainConfig

    TrainConfig.from_options(max_epochs=3, warmup_epochs=2).validate()
    with pytest.raises(ValueError, match="--warmup-epochs 3 leaves no epoch of --max-epochs 3"):
        TrainConfig.from_options(max_epochs=3, warmup_epochs=3).validate()
