"""``measure/meter=auto``: the counter of the device the model runs on, else none (said once)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from irene.measure.meters.base import EnergyMeter, MeterUnavailableError
from irene.measure.meters.null import NullMeter

log = logging.getLogger(__name__)

#: A meter not built yet: a meter class, or a ``functools.partial`` of one (what Hydra's
#: ``_partial_: true`` gives), called without arguments.
MeterFactory = Callable[[], EnergyMeter]


def device_type(device: str) -> str:
    """``"cuda"`` for ``cuda``/``cuda:N``, ``"cpu"``..., the type ``torch.device`` would give."""
    return str(device).split(":")[0]


def measured_devices(factory: MeterFactory) -> frozenset[str] | None:
    """The :attr:`~EnergyMeter.measured_devices` of the class a factory builds."""
    cls = getattr(factory, "func", factory)
    return getattr(cls, "measured_devices", None)


class DeviceCounter:
    """Picks, for a device, the first candidate that measures it and can be opened here.

    Candidates are tried in order (``conf/measure/meter/auto.yaml`` lists them: NVML, then
    RAPL); one that measures another device is never built. When none can be opened, the
    :class:`NullMeter` is returned and one log line says why: the trees then get times and
    features, and no ``ground_truth_energy``.

    Args:
        candidates: meter factories (classes or partials of them) whose class declares
            :attr:`~EnergyMeter.measured_devices`.
    """

    def __init__(self, candidates: Sequence[MeterFactory]) -> None:
        self.candidates = list(candidates)

    def for_device(self, device: str, *, quiet: bool = False) -> EnergyMeter:
        """The counter of ``device`` (``cpu``, ``cuda:N``), else the null meter (announced in
        one log line unless ``quiet``)."""
        kind = device_type(device)
        reasons = []
        for factory in self.candidates:
            devices = measured_devices(factory)
            if devices is None or kind not in devices:
                continue
            try:
                return factory()
            except MeterUnavailableError as error:
                reasons.append(str(error))
        reason = "; ".join(reasons) or f"no meter of this project measures a {kind} device"
        if not quiet:
            log.warning("No energy meter for this device (%s): recording features and times only, "
                        "without ground_truth_energy.", reason)
        return NullMeter()
