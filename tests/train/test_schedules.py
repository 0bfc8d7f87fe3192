import pytest

from sd_jax.train import schedules


def test_reference_schedule_per_step_shape_and_cosine():
    schedule = schedules.reference_schedule(0.1, 1000)  # steps_per_epoch=1: the curve step by step
    assert float(schedule(0)) == pytest.approx(0.1) and float(schedule(499)) == pytest.approx(0.1)
    assert float(schedule(700)) == pytest.approx(0.1 + (0.001 - 0.1) * 0.5)
    assert float(schedule(900)) == pytest.approx(0.001, rel=1e-5) and float(schedule(999)) == pytest.approx(0.001, rel=1e-5)
    cosine = schedules.cosine_schedule(0.1, 100, warmup_steps=10)
    assert float(cosine(10)) == pytest.approx(0.1) and float(cosine(100)) == pytest.approx(0.0, abs=1e-6)


def _reference_lr(epoch, *, lr=0.1, epochs=200, swa=False, swa_start=161, swa_lr=0.05):
    """`schedule(epoch)` of SmartDeal-Training/main.py, verbatim but for the argparse names."""
    t = (epoch) / (swa_start if swa else epochs)
    lr_ratio = swa_lr / lr if swa else 0.01
    if t <= 0.5:
        factor = 1.0
    elif t <= 0.9:
        factor = 1.0 - (1.0 - lr_ratio) * (t - 0.5) / 0.4
    else:
        factor = lr_ratio
    return lr * factor


def test_reference_schedule_is_the_authors_per_epoch():
    plain = schedules.reference_schedule(0.1, 200, steps_per_epoch=391)
    with_swa = schedules.reference_schedule(0.1, 200, steps_per_epoch=391, swa_start=161, swa_lr=0.05)
    for epoch in range(200):
        for step in (epoch * 391, epoch * 391 + 390):  # constant within an epoch
            assert float(plain(step)) == pytest.approx(_reference_lr(epoch), rel=1e-6)
            assert float(with_swa(step)) == pytest.approx(_reference_lr(epoch, swa=True), rel=1e-6)
    assert all(float(plain(e * 391)) == pytest.approx(0.1) for e in range(101))
    assert float(plain(180 * 391)) == pytest.approx(0.001, rel=1e-5)
    assert float(with_swa(100 * 391)) == pytest.approx(0.1 * (1 - (1 - 0.5) * (100 / 161 - 0.5) / 0.4), rel=1e-6)
    assert float(with_swa(80 * 391)) == pytest.approx(0.1) and float(with_swa(145 * 391)) == pytest.approx(0.05)
    assert float(with_swa(199 * 391)) == pytest.approx(0.05)


@pytest.mark.parametrize("kwargs", [dict(epochs=0), dict(steps_per_epoch=0), dict(swa_start=161),
                                    dict(swa_lr=0.05), dict(swa_start=0, swa_lr=0.05)])
def test_reference_schedule_refuses_bad_options(kwargs):
    with pytest.raises(ValueError):
        schedules.reference_schedule(0.1, **dict(dict(epochs=200), **kwargs))


def _inference_lr(epoch, *, lr=0.05):
    """`adjust_learning_rate(optimizer, epoch)` of SmartDeal-Inference/main.py, verbatim but for args."""
    return lr * (0.5 ** (epoch // 30))


def test_step_schedule_is_the_authors_inference_only_schedule():
    schedule = schedules.step_schedule(0.05, step_epochs=30, factor=0.5, steps_per_epoch=391)
    for epoch in range(300):
        for step in (epoch * 391, epoch * 391 + 390):  # constant within an epoch
            assert float(schedule(step)) == pytest.approx(_inference_lr(epoch), rel=1e-6)
    assert float(schedule(29 * 391 + 390)) == pytest.approx(0.05) and float(schedule(30 * 391)) == pytest.approx(0.025)
    assert float(schedule(299 * 391)) == pytest.approx(0.05 / 2**9)
    per_step = schedules.step_schedule(0.1, step_epochs=2, factor=0.1)  # steps_per_epoch=1: epochs are steps
    assert [float(per_step(s)) for s in range(5)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


@pytest.mark.parametrize("kwargs", [dict(step_epochs=0), dict(factor=0.0), dict(steps_per_epoch=0),
                                    dict(base_lr=0.0)])
def test_step_schedule_refuses_bad_options(kwargs):
    with pytest.raises(ValueError, match="step_epochs >= 1"):
        schedules.step_schedule(**dict(dict(base_lr=0.05, step_epochs=30, factor=0.5), **kwargs))
