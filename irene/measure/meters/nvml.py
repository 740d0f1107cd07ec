"""NVIDIA GPU energy through NVML's total-energy counter (package ``nvidia-ml-py``)."""

from __future__ import annotations

from typing import Any

from irene.measure.meters.base import GPU_ENERGY_FEATURE, EnergyMeter, MeterUnavailableError, Probe


def _pynvml() -> Any:
    try:
        import pynvml  # imported lazily: the package is optional on CPU-only machines
    except ImportError as error:
        raise MeterUnavailableError("the NVML meter needs the package nvidia-ml-py (import pynvml): "
                                    f"{error}") from error
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
    measured_devices = frozenset({"cuda"})
    reading_feature = GPU_ENERGY_FEATURE

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

    def probes(self) -> list[Probe]:
        """GPU utilisation and clocks (:meth:`utilisation`)."""
        return [self.utilisation]

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

    def device_state(self) -> dict[str, float | str]:
        """Temperature (°C), SM and memory clocks (MHz), power and its limit (W), throttle reasons.

        Each field that NVML cannot give on this GPU is left out.
        """
        nvml = self._nvml
        state: dict[str, float | str] = {}
        handle = self.handle
        for key, call in (
            ("gpu_temperature_c", lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            ("gpu_sm_clock_mhz", lambda: nvml.nvmlDeviceGetClockInfo(self.handle, nvml.NVML_CLOCK_SM)),
            ("gpu_mem_clock_mhz", lambda: nvml.nvmlDeviceGetClockInfo(self.handle, nvml.NVML_CLOCK_MEM)),
            ("gpu_power_w", lambda: nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0),
            ("gpu_power_limit_w", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(self.handle) / 1000.0),
        ):
            try:
                state[key] = float(call())
            except Exception:  # noqa: BLE001 - descriptive only
                pass
        try:
            state["gpu_throttle_reasons"] = throttle_reasons(nvml, self.handle)
        except Exception:  # noqa: BLE001
            pass
        return state

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


# NVML's clock-event (formerly "throttle") reason bits, by the name pynvml gives them.
_REASONS = ("GpuIdle", "ApplicationsClocksSetting", "SwPowerCap", "HwSlowdown", "SyncBoost",
            "SwThermalSlowdown", "HwThermalSlowdown", "HwPowerBrakeSlowdown", "DisplayClockSetting")


def throttle_reasons(nvml: Any, handle: Any) -> str:
    """The active clock-limiting reasons as ``"SwPowerCap,HwSlowdown"`` (``"none"`` if none)."""
    getter = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    mask = int(getter(handle))
    names = []
    for reason in _REASONS:
        bit = getattr(nvml, f"nvmlClocksEventReason{reason}", None)
        if bit is None:
            bit = getattr(nvml, f"nvmlClocksThrottleReason{reason}", 0)
        if bit and mask & int(bit):
            names.append(reason)
    return ",".join(names) or "none"
