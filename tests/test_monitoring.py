"""GpuMonitor's arithmetic on a stand-in for NVML (a unit test of one class: no GPU here).

What a real GPU adds (NVML itself, the counter's units on real hardware) is
exercised by running the trainer on a GPU machine; these tests pin down how
readings become utilisation and energy.
"""

from __future__ import annotations

import sys
import time
import types

import pytest
import torch

from virgo_exps.train import monitoring


def fake_nvml(energy_counter: bool, power_w: float = 100.0, util: int = 60):
    state = {"energy_mj": 5_000_000.0}

    def energy(handle):
        if not energy_counter:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        state["energy_mj"] += 7_200.0  # 7.2 J more at every reading
        return state["energy_mj"]

    return types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetTotalEnergyConsumption=energy,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=util),
        nvmlDeviceGetPowerUsage=lambda h: power_w * 1000.0,  # milliwatts
        nvmlDeviceGetName=lambda h: "Fake GPU",
    )


@pytest.fixture
def on_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def install(module):
        monkeypatch.setitem(sys.modules, "pynvml", module)

    return install


def run_monitor(seconds: float = 0.3) -> tuple[dict, monitoring.GpuMonitor]:
    mon = monitoring.GpuMonitor(interval=0.02)
    mon.start()
    time.sleep(seconds)
    return mon.stop(), mon


def test_energy_from_the_cumulative_counter(on_gpu):
    on_gpu(fake_nvml(energy_counter=True))
    out, _ = run_monitor()
    # Two counter readings (start, stop): 7.2 J apart = 0.002 Wh; the power samples are not used.
    assert out["energy_source"] == "nvml_total_energy_counter"
    assert out["energy_wh"] == pytest.approx(7_200.0 / 3.6e6)
    assert out["utilization_pct"] == pytest.approx(60.0) and out["gpu_name"] == "Fake GPU"


def test_energy_so_far_for_a_snapshot_then_the_same_as_stop(on_gpu):
    on_gpu(fake_nvml(energy_counter=True))
    mon = monitoring.GpuMonitor(interval=0.02)
    assert mon.energy_wh_so_far() is None  # not started
    mon.start()
    assert mon.energy_wh_so_far() == pytest.approx(7_200.0 / 3.6e6)  # one reading after the start's
    out = mon.stop()
    assert out["energy_wh"] == pytest.approx(2 * 7_200.0 / 3.6e6)
    assert mon.energy_wh_so_far() == out["energy_wh"] and mon.stop() == out  # stopped: what stop() said


def test_energy_from_power_samples_and_their_timestamps(on_gpu):
    on_gpu(fake_nvml(energy_counter=False, power_w=100.0))
    out, mon = run_monitor()
    assert out["energy_source"] == "power_integrated" and len(mon.samples) >= 5
    span = mon.samples[-1][0] - mon.samples[0][0]
    assert out["energy_wh"] == pytest.approx(100.0 * span / 3600.0)  # constant 100 W over the sampled span


def test_off_gpu_nothing_is_measured(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mon = monitoring.GpuMonitor()
    mon.start()
    assert mon.stop() == {}
