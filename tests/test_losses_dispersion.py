"""angular_dispersion and the running DispersionMeter (state, agreement, all-reduce across ranks)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from radio_kernels import DispersionMeter, angular_dispersion, angular_loss, reference


def batches_with_fixed_mean(n_batches=3, rows=4, dim=6, seed=0):
    """Batches whose row sums all point along e_0, so the meter's mean direction never moves.

    Each batch is rows (a, v) and (a, -v) with a > 0: their sum is 2 a e_0.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        v = torch.randn(rows // 2, dim - 1, generator=g, dtype=torch.float64)
        a = torch.rand(rows // 2, 1, generator=g, dtype=torch.float64) + 0.1
        out.append(torch.cat([torch.cat([a, v], 1), torch.cat([a, -v], 1)]))
    return out


def test_angular_dispersion_public_op():
    y = torch.randn(20, 8, dtype=torch.float64)
    d = angular_dispersion(y)
    assert d.dtype == torch.float32 and d.dim() == 0
    assert d.item() == pytest.approx(reference.angular_dispersion(y).item(), rel=1e-6)
    assert angular_dispersion(torch.ones(5, 3)).item() < 1e-11  # one direction: no spread
    with pytest.raises(ValueError, match="y"):
        angular_dispersion(torch.randn(3, 4, 5))


def test_meter_matches_dispersion_of_concatenation_for_fixed_mean():
    batches = batches_with_fixed_mean(n_batches=4)
    meter = DispersionMeter(6, warmup_samples=4)  # the first batch only builds mu
    for b in batches:
        value = meter.update(b)
    want = reference.angular_dispersion(torch.cat(batches[1:]))
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(want.item(), rel=1e-6)
    assert meter.value.item() == value.item()


def test_meter_holds_initial_value_until_warmup_samples_built_mu():
    batches = batches_with_fixed_mean(n_batches=3)  # 4 rows each
    meter = DispersionMeter(6, initial=0.7, warmup_samples=5)
    assert meter.update(batches[0]).item() == pytest.approx(0.7)  # 4 samples: still warming up
    assert meter.update(batches[1]).item() == pytest.approx(0.7)  # mu had 4 < 5 before this batch
    want = reference.angular_dispersion(batches[2])
    assert meter.update(batches[2]).item() == pytest.approx(want.item(), rel=1e-6)


def test_meter_single_sample_batches_and_identical_summaries_stay_bounded():
    # One sample lies exactly on its own mean direction: measuring it would give Disp = 0 and an
    # angular loss of Theta^2 / 0. The warm-up keeps ``initial``; the floor bounds a teacher that
    # never spreads.
    y = torch.randn(1, 6)
    meter = DispersionMeter(6, warmup_samples=1)
    assert meter.update(y).item() == 1.0
    for _ in range(3):
        value = meter.update(y)
    assert value.item() == pytest.approx(meter.floor)
    x = -y  # the worst case: Theta = pi
    loss = angular_loss(x, y, value)
    assert torch.isfinite(loss) and loss.item() <= torch.pi**2 / meter.floor * (1 + 1e-5)


def test_meter_initial_value_state_dict_round_trip_and_bad_input():
    meter = DispersionMeter(6, initial=0.7, warmup_samples=4)
    assert meter.value.item() == pytest.approx(0.7)
    for b in batches_with_fixed_mean(seed=1):
        meter.update(b.float())
    restored = DispersionMeter(6, initial=0.7, warmup_samples=4)
    restored.load_state_dict(meter.state_dict())
    assert restored.value.item() == meter.value.item()
    extra = batches_with_fixed_mean(n_batches=1, seed=2)[0]
    assert restored.update(extra).item() == meter.update(extra).item()
    with pytest.raises(ValueError, match="6 channels"):
        meter.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="initial"):
        DispersionMeter(6, initial=0.0)
    with pytest.raises(ValueError, match="floor"):
        DispersionMeter(6, floor=0.0)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="warmup_samples"):
            DispersionMeter(6, warmup_samples=bad)


def test_meter_loads_state_dict_without_theta_count():
    # Checkpoints from before the warm-up had angles measured from the first sample on.
    meter = DispersionMeter(6, warmup_samples=4)
    for b in batches_with_fixed_mean(seed=3):
        meter.update(b)
    old = {k: v for k, v in meter.state_dict().items() if k != "theta_count"}
    old["sum_theta2"] = meter.sum_theta2 * 3 / 2  # as if all three batches had been measured
    restored = DispersionMeter(6, warmup_samples=4)
    restored.load_state_dict(old)
    assert restored.theta_count.item() == 12
    assert restored.value.item() == pytest.approx(meter.value.item(), rel=1e-6)


def _ranked_update(rank, world, init_file, batches, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        meter = DispersionMeter(batches[0].shape[1], warmup_samples=8)
        for b in batches:  # every rank sees its own half of each batch
            half = b.shape[0] // world
            meter.update(b[rank * half : (rank + 1) * half])
        torch.save(meter.value, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_meter_all_reduce_across_two_gloo_ranks():
    batches = batches_with_fixed_mean(n_batches=3, rows=8)
    # a rank's half of a batch is not mean-free along e_1..: only the all-reduced sums give mu = e_0;
    # the warm-up counts the samples of all ranks (8 = the first batch)
    single = DispersionMeter(6, warmup_samples=8)
    for b in batches:
        single.update(b)
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "value")
        mp.start_processes(
            _ranked_update, args=(2, init_file, batches, out_file), nprocs=2, join=True, start_method="fork"
        )
        values = [torch.load(f"{out_file}.{r}") for r in range(2)]
    assert values[0].item() == values[1].item()
    assert values[0].item() == pytest.approx(single.value.item(), rel=1e-6)
