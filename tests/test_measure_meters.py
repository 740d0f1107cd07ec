"""Energy meters without hardware: a fake powercap tree and a fake pynvml."""

from __future__ import annotations

import builtins
import logging
import types

import pytest

from irene.measure.meters import NullMeter, NvmlMeter, RaplMeter, RaplPermissionError, make_meter
from irene.measure.meters import nvml as nvml_module
from irene.measure.meters import rapl as rapl_module

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
    monkeypatch.setattr(NvmlMeter, "available", classmethod(lambda cls, **kw: False))
    with caplog.at_level(logging.WARNING):
        meter = make_meter("auto", rapl_root=root)
    assert isinstance(meter, NullMeter)
    assert len(caplog.records) == 1 and "CVE-2020-8694" in caplog.text


def test_no_meter_says_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(NvmlMeter, "available", classmethod(lambda cls, **kw: False))
    with caplog.at_level(logging.WARNING):
        meter = make_meter("auto", rapl_root=tmp_path / "absent")
    assert isinstance(meter, NullMeter) and not meter.measures_energy
    assert len(caplog.records) == 1
    assert "No energy meter" in caplog.text and "ground_truth_energy" in caplog.text
    with pytest.raises(RuntimeError):
        meter.read_energy_j()
    with pytest.raises(ValueError):
        make_meter("wattmeter")


def test_auto_prefers_rapl_without_gpu(powercap, monkeypatch):
    monkeypatch.setattr(NvmlMeter, "available", classmethod(lambda cls, **kw: False))
    assert isinstance(make_meter("auto", rapl_root=powercap[0]), RaplMeter)


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
    assert meter.describe()["driver_version"] == "550.00"
    assert isinstance(make_meter("auto"), NvmlMeter)
    meter.close()
    assert fake.events[-1] == "shutdown"


def test_nvml_unavailable_without_cuda(monkeypatch):
    monkeypatch.setattr(nvml_module, "_torch_cuda_available", lambda: False)
    assert not NvmlMeter.available()
