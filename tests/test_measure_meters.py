"""Energy meters without hardware: a fake powercap tree and a fake pynvml."""

from __future__ import annotations

import builtins
import functools
import logging
import types

import pytest

from irene.measure.meters import (
    GPU_ENERGY_FEATURE,
    DeviceCounter,
    MeterMismatchError,
    NullMeter,
    NvmlMeter,
    RaplMeter,
    RaplPermissionError,
    SimulatedMeter,
    SumMeter,
    check_device,
    meter_for_device,
    reading_feature_of,
)
from irene.measure.meters import nvml as nvml_module
from irene.measure.meters import rapl as rapl_module


def _auto(rapl_root) -> DeviceCounter:
    """conf/measure/meter/auto.yaml's candidates, the RAPL one on a given powercap root."""
    return DeviceCounter([NvmlMeter, functools.partial(RaplMeter, root=rapl_root)])


def _nvml_absent(monkeypatch) -> None:
    """A machine without NVML: the meter's import of pynvml fails as it does there."""
    def absent():
        raise nvml_module.MeterUnavailableError("the NVML meter needs the package nvidia-ml-py: absent")

    monkeypatch.setattr(nvml_module, "_pynvml", absent)

MAX_UJ = 262_143_328_850


def _domain(root, name, energy_uj, label="package-0"):
    path = root / name
    path.mkdir(parents=True)
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{MAX_UJ}\n")
    (path / "name").write_text(f"{label}\n")
    return path


@pytest.fixture
def powercap(tmp_path):
    root = tmp_path / "powercap"
    pkg0 = _domain(root, "intel-rapl:0", 1_000_000)
    _domain(root, "intel-rapl:0:0", 5_000, "core")  # a subdomain: must be ignored
    pkg1 = _domain(root, "intel-rapl:1", 2_000_000, "package-1")
    (root / "intel-rapl-mmio:0").mkdir()
    return root, pkg0, pkg1


def test_rapl_sums_package_domains_only(powercap):
    root, pkg0, pkg1 = powercap
    meter = RaplMeter(root)
    assert [d.path.name for d in meter.domains] == ["intel-rapl:0", "intel-rapl:1"]
    assert meter.read_energy_j() == 0.0
    (pkg0 / "energy_uj").write_text("3000000\n")  # +2 J
    (pkg1 / "energy_uj").write_text("2500000\n")  # +0.5 J
    (root / "intel-rapl:0:0" / "energy_uj").write_text("9999999999\n")
    assert meter.read_energy_j() == pytest.approx(2.5)
    assert meter.describe()["rapl_domains"] == "intel-rapl:0(package-0),intel-rapl:1(package-1)"


def test_rapl_wrap_around(powercap):
    root, pkg0, _ = powercap
    (pkg0 / "energy_uj").write_text(f"{MAX_UJ - 400_000}\n")
    meter = RaplMeter(root)
    (pkg0 / "energy_uj").write_text("600000\n")  # wrapped: 0.4 J to the top, 0.6 J after
    assert meter.read_energy_j() == pytest.approx(1.0)
    (pkg0 / "energy_uj").write_text("1600000\n")
    assert meter.read_energy_j() == pytest.approx(2.0)


def test_rapl_permission_error_explains(powercap, monkeypatch, caplog):
    root, _, _ = powercap
    real_open = builtins.open

    def deny(path, *args, **kwargs):
        if str(path).endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(rapl_module, "open", deny, raising=False)
    with pytest.raises(RaplPermissionError) as error:
        RaplMeter(root)
    message = str(error.value)
    assert "CVE-2020-8694" in message and "chmod" in message and "root" in message
    assert not RaplMeter.available(root=root)
    with caplog.at_level(logging.WARNING):
        meter = _auto(root).for_device("cpu")
    assert isinstance(meter, NullMeter)
    assert len(caplog.records) == 1 and "CVE-2020-8694" in caplog.text


def test_no_meter_says_so_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        meter = _auto(tmp_path / "absent").for_device("cpu")
    assert isinstance(meter, NullMeter) and not meter.measures_energy
    assert len(caplog.records) == 1
    assert "No energy meter" in caplog.text and "ground_truth_energy" in caplog.text
    assert "no RAPL package domain" in caplog.text
    with pytest.raises(RuntimeError):
        meter.read_energy_j()


def test_auto_on_the_cpu_takes_rapl_and_never_opens_nvml(powercap, monkeypatch):
    monkeypatch.setattr(nvml_module, "_pynvml", lambda: pytest.fail("auto opened NVML for a CPU model"))
    assert isinstance(_auto(powercap[0]).for_device("cpu"), RaplMeter)


class _FakeNvml(types.SimpleNamespace):
    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2

    class NVMLError(Exception):
        pass

    def __init__(self):
        super().__init__(energy_mj=10_000, events=[])

    def nvmlInit(self):
        self.events.append("init")

    def nvmlDeviceGetHandleByIndex(self, index):
        return f"gpu{index}"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self.events.append("read")
        return self.energy_mj

    def nvmlDeviceGetUtilizationRates(self, handle):
        return types.SimpleNamespace(gpu=97, memory=40)

    def nvmlDeviceGetClockInfo(self, handle, kind):
        return {1: 1410, 2: 1215}[kind]

    def nvmlDeviceGetName(self, handle):
        return "Fake GPU"

    def nvmlSystemGetDriverVersion(self):
        return "550.00"

    def nvmlSystemGetCudaDriverVersion(self):
        return 12040

    def nvmlShutdown(self):
        self.events.append("shutdown")


def test_nvml_meter_reads_millijoules_after_synchronize(monkeypatch):
    fake = _FakeNvml()
    monkeypatch.setattr(nvml_module, "_pynvml", lambda: fake)
    monkeypatch.setattr(nvml_module, "_torch_cuda_available", lambda: True)
    import torch

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: fake.events.append("sync"))
    assert NvmlMeter.available(gpu_index=0)
    meter = NvmlMeter(0)
    fake.events.clear()
    assert meter.read_energy_j() == 10.0
    fake.energy_mj = 12_500
    assert meter.read_energy_j() == 12.5
    assert fake.events == ["sync", "read", "sync", "read"]
    assert meter.utilisation() == {"gpu": 97.0, "gpu_mem": 40.0, "gpu_clk": 1410.0, "gpu_mem_clk": 1215.0}
    assert [probe() for probe in meter.probes()] == [meter.utilisation()]
    assert meter.describe()["driver_version"] == "550.00"
    assert isinstance(DeviceCounter([NvmlMeter, RaplMeter]).for_device("cuda:0"), NvmlMeter)
    meter.close()
    assert fake.events[-1] == "shutdown"


def test_nvml_unavailable_without_cuda(monkeypatch):
    monkeypatch.setattr(nvml_module, "_torch_cuda_available", lambda: False)
    assert not NvmlMeter.available()


def test_nvml_device_state_names_throttle_reasons(monkeypatch):
    fake = _FakeNvml()
    fake.NVML_TEMPERATURE_GPU = 0
    fake.nvmlDeviceGetTemperature = lambda handle, sensor: 61
    fake.nvmlDeviceGetPowerUsage = lambda handle: 503_000
    fake.nvmlClocksEventReasonSwPowerCap, fake.nvmlClocksEventReasonHwSlowdown = 0x4, 0x8
    fake.nvmlDeviceGetCurrentClocksEventReasons = lambda handle: 0x4
    monkeypatch.setattr(nvml_module, "_pynvml", lambda: fake)
    meter = NvmlMeter(0, synchronize=False)
    state = meter.device_state()
    assert state["gpu_temperature_c"] == 61.0 and state["gpu_power_w"] == 503.0
    assert state["gpu_sm_clock_mhz"] == 1410.0 and state["gpu_throttle_reasons"] == "SwPowerCap"
    assert "gpu_power_limit_w" not in state  # not offered by this fake: left out


def test_auto_matches_the_device(powercap, monkeypatch, caplog):
    _nvml_absent(monkeypatch)
    assert isinstance(_auto(powercap[0]).for_device("cpu"), RaplMeter)
    with caplog.at_level(logging.WARNING):
        meter = _auto(powercap[0]).for_device("cuda:0")  # RAPL cannot see a GPU: never tried
    assert isinstance(meter, NullMeter) and "nvidia-ml-py" in caplog.text and "RAPL" not in caplog.text


def test_rapl_plus_nvml_sums_both(powercap, monkeypatch):
    fake = _FakeNvml()
    monkeypatch.setattr(nvml_module, "_pynvml", lambda: fake)
    meter = meter_for_device(SumMeter([RaplMeter(powercap[0]), NvmlMeter(0, synchronize=False)]), "cuda:0")
    assert meter.name == "rapl+nvml" and [p.name for p in meter.parts()] == ["rapl", "nvml"]
    before = meter.read_energy_j()
    (powercap[1] / "energy_uj").write_text("3000000\n")  # CPU +2 J
    fake.energy_mj += 1_500  # GPU +1.5 J
    assert meter.read_energy_j() - before == pytest.approx(3.5)
    assert meter.describe()["meter"] == "rapl+nvml" and "rapl_domains" in meter.describe()
    assert [probe() for probe in meter.probes()] == [meter.parts()[1].utilisation()]  # the GPU part's
    assert meter.period_s is None  # neither part knows its period: probed


def test_a_meter_of_another_device_is_refused(powercap, monkeypatch):
    """From what each part declares it measures: no meter is named in the rule."""
    monkeypatch.setattr(nvml_module, "_pynvml", _FakeNvml)
    gpu, cpu = NvmlMeter(0, synchronize=False), RaplMeter(powercap[0])
    with pytest.raises(MeterMismatchError, match="meter nvml measures cuda but the model runs on cpu"):
        check_device(gpu, "cpu")
    with pytest.raises(MeterMismatchError, match="meter rapl measures cpu but the model runs on cuda:0"):
        meter_for_device(cpu, "cuda:0")
    with pytest.raises(MeterMismatchError, match="its part nvml measures cuda but the model runs on cpu"):
        check_device(SumMeter([cpu, gpu]), "cpu")  # an idle GPU would be added to the target
    for device in ("cpu", "cuda:0"):  # no device of this machine: never refused
        check_device(SimulatedMeter(), device)
        check_device(NullMeter(), device)
    check_device(SumMeter([cpu, gpu]), "cuda:0")


def test_what_meters_declare():
    assert reading_feature_of("nvml") == GPU_ENERGY_FEATURE  # a GPU's own counter
    assert reading_feature_of("rapl") is None and reading_feature_of("rapl+nvml") is None
    assert NvmlMeter.measured_devices == {"cuda"} and RaplMeter.measured_devices == {"cpu"}
    assert SimulatedMeter().period_s == 0.1  # known exactly: the protocol does not probe it
    assert NullMeter().probes() == [] and NullMeter.measured_devices is None


def test_simulated_counter_publishes_only_at_ticks():
    from irene.measure.meters import SimulatedMeter
    from irene.measure.settings import SimulatedMeterSettings

    now = [0.0]
    meter = SimulatedMeter(SimulatedMeterSettings(tick_s=0.1, power_w=100.0, noise=0.0, resolution_j=0.001),
                           clock=lambda: now[0])
    first_tick = meter.counter.next_tick_s
    assert 0 < first_tick <= 0.1
    now[0] = first_tick - 1e-6
    assert meter.read_energy_j() == 0.0  # nothing published before the first tick
    now[0] = first_tick + 0.05
    assert meter.read_energy_j() == pytest.approx(100.0 * first_tick, abs=0.001)
    now[0] = first_tick + 0.1  # the next tick: 10 J more, whatever the read times
    assert meter.read_energy_j() == pytest.approx(100.0 * (first_tick + 0.1), abs=0.001)
    value = meter.read_energy_j()
    assert value == round(value, 3)  # millijoule resolution


def test_simulated_device_truth_and_virtual_clock():
    from irene.measure.meters import SimulatedDevice
    from irene.measure.settings import SimulatedMeterSettings

    device = SimulatedDevice(SimulatedMeterSettings(tick_s=0.0, noise=0.0, resolution_j=0.0), 1e-3, 200.0,
                             read_s=1e-5, gap_power_w=100.0)
    start = device.clock()
    for _ in range(100):
        device.call()
    assert device.clock() - start == pytest.approx(0.1)
    assert device.meter.read_energy_j() == pytest.approx(100 * device.energy_per_call_j + 1e-5 * 100.0)
    assert device.energy_per_call_j == pytest.approx(0.2) and device.reads == 1
