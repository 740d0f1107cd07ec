"""NVIDIA GPU energy through NVML's total-energy counter (package ``nvidia-ml-py``)."""

from __future__ import annotations

from typing import Any

from irene.measure.meters.base import EnergyMeter, MeterUnavailableError


def _pynvml() -> Any:
    import pynvml  # imported lazily: the package is optional on CPU-only machines

    return pynvml


def _torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class NvmlMeter(EnergyMeter):
    """Energy of one GPU from ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules).

    Args:
        gpu_index: NVML index of the GPU (the CUDA index when ``CUDA_VISIBLE_DEVICES`` is not
            reordered).
        synchronize: synchronise the CUDA device before each read (default True).
    """

    name = "nvml"

    def __init__(self, gpu_index: int = 0, synchronize: bool = True) -> None:
        self.gpu_index = gpu_index
        self.synchronize = synchronize
        nvml = _pynvml()
        try:
            nvml.nvmlInit()
            self.handle = nvml.nvmlDeviceGetHandleByIndex(gpu_index)
            nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except nvml.NVMLError as error:
            raise MeterUnavailableError(f"NVML energy counter of GPU {gpu_index}: {error}") from error
        self._nvml = nvml

    @classmethod
    def available(cls, gpu_index: int = 0, **kwargs: object) -> bool:
        """True when CUDA and NVML see the GPU and it has an energy counter (Volta or newer)."""
        try:
            if not _torch_cuda_available():
                return False
            nvml = _pynvml()
            nvml.nvmlInit()
            handle = nvml.nvmlDeviceGetHandleByIndex(gpu_index)
            nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            return True
        except Exception:  # noqa: BLE001 - any failure means "not available"
            return False

    def read_energy_j(self) -> float:
        """GPU energy since the driver was loaded, in joules."""
        if self.synchronize:
            import torch

            # Synchronise before reading the counter, so the window closes after the kernels finish.
            torch.cuda.synchronize(self.gpu_index)
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0

    def utilisation(self) -> dict[str, float]:
        """GPU and GPU-memory utilisation (percent), SM and memory clocks (MHz)."""
        nvml = self._nvml
        rates = nvml.nvmlDeviceGetUtilizationRates(self.handle)
        return {
            "gpu": float(rates.gpu),
            "gpu_mem": float(rates.memory),
            "gpu_clk": float(nvml.nvmlDeviceGetClockInfo(self.handle, nvml.NVML_CLOCK_SM)),
            "gpu_mem_clk": float(nvml.nvmlDeviceGetClockInfo(self.handle, nvml.NVML_CLOCK_MEM)),
        }

    def describe(self) -> dict[str, str]:
        """Meter, GPU index and name, driver and CUDA driver versions."""
        nvml = self._nvml
        info = {"meter": self.name, "gpu_index": str(self.gpu_index)}
        for key, call in (
            ("gpu_name", lambda: nvml.nvmlDeviceGetName(self.handle)),
            ("driver_version", nvml.nvmlSystemGetDriverVersion),
            ("cuda_driver_version", nvml.nvmlSystemGetCudaDriverVersion),
        ):
            try:
                value = call()
                info[key] = value.decode() if isinstance(value, bytes) else str(value)
            except Exception:  # noqa: BLE001 - descriptive only
                info[key] = "unknown"
        return info

    def close(self) -> None:
        """Shut NVML down."""
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
