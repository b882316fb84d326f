"""Sampler names as A1111 spells them -> diffusers schedulers built from the model's own config.

A1111 (1.9+) writes a sampler and a schedule type separately ("Sampler: DPM++ 2M, Schedule type:
Karras"); older versions and most users write them together ("DPM++ 2M Karras"). Both spellings
are accepted, and ``SamplerChoice`` keeps the two parts so the infotext can be written the way
A1111 reads it. The mapping follows diffusers' own A1111 table (docs: "Schedulers" overview).

Every scheduler is made with ``from_config`` of the base model's scheduler config, so the
model's beta schedule, training timesteps and prediction type (epsilon or v) carry over.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainer.core.errors import ConfigError

DEFAULT_SAMPLER = "DPM++ 2M Karras"

# A1111 sampler -> (diffusers class name, fixed constructor overrides).
_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}

# A1111 schedule type -> the diffusers sigma flag that selects it. "Normal" is the scheduler's own
# sigma spacing; "Automatic" is written for samplers that have no schedule choice. (A1111 1.9+
# resolves "Automatic" per sampler, e.g. Karras for DPM++ 2M: write the schedule out to be exact.)
_SCHEDULES: dict[str, str | None] = {
    "Automatic": None,
    "Normal": None,
    "Karras": "use_karras_sigmas",
    "Exponential": "use_exponential_sigmas",
    "Beta": "use_beta_sigmas",
}
_SIGMA_FLAGS = tuple(flag for flag in _SCHEDULES.values() if flag)

# Other spellings people type or that A1111's API uses.
_ALIASES = {
    "euler_a": "Euler a", "euler ancestral": "Euler a", "k_euler_a": "Euler a", "k_euler": "Euler",
    "dpm++_2m": "DPM++ 2M", "dpmpp_2m": "DPM++ 2M", "k_dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE", "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_sde": "DPM++ SDE", "k_dpmpp_sde": "DPM++ SDE",
    "k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a", "k_heun": "Heun", "k_lms": "LMS",
    "pndm": "PLMS", "unipc": "UniPC", "ddim": "DDIM", "lcm": "LCM",
}


@dataclass(frozen=True)
class SamplerChoice:
    """A sampler and its schedule type, both in A1111's spelling."""

    sampler: str = "DPM++ 2M"
    schedule: str = "Karras"

    @property
    def label(self) -> str:
        """One-string form, e.g. "DPM++ 2M Karras" or "Euler a"."""
        return self.sampler if _SCHEDULES[self.schedule] is None else f"{self.sampler} {self.schedule}"


def sampler_names() -> list[str]:
    """Every accepted one-string name (sampler, or sampler + schedule where that exists)."""
    names = []
    for sampler, (class_name, _) in _SAMPLERS.items():
        names.append(sampler)
        if _supports_sigma_schedules(class_name):
            names.extend(f"{sampler} {schedule}" for schedule, flag in _SCHEDULES.items() if flag)
    return names


def parse_sampler(name: str, schedule: str | None = None) -> SamplerChoice:
    """Read "DPM++ 2M Karras", "Euler a", "k_euler_a" or ("DPM++ 2M", "Karras")."""
    text = " ".join(name.replace("_", " ").split())  # "dpmpp_2m_karras" reads like "dpmpp 2m karras"
    schedule_name = _canonical(schedule, _SCHEDULES, "schedule type") if schedule else None
    if schedule_name is None:
        for candidate, flag in _SCHEDULES.items():
            suffix = f" {candidate}".lower()
            if flag and text.lower().endswith(suffix):
                text, schedule_name = text[: -len(suffix)], candidate
                break
    lowered = text.lower()
    sampler = _ALIASES.get(lowered.replace(" ", "_"), _ALIASES.get(lowered))
    if sampler is None:
        sampler = _canonical(text, _SAMPLERS, "sampler")
    class_name = _SAMPLERS[sampler][0]
    if not _supports_sigma_schedules(class_name):
        if _SCHEDULES.get(schedule_name or "Automatic") is not None:
            raise ConfigError(f"The {sampler} sampler has no {schedule_name} schedule.",
                              hint=f"Use plain '{sampler}'; {_SCHEDULE_HINT}")
        return SamplerChoice(sampler, "Automatic")
    if _SCHEDULES.get(schedule_name or "Normal") is None:
        schedule_name = "Normal"
    return SamplerChoice(sampler, schedule_name)


def make_scheduler(name: str | SamplerChoice, scheduler_config: Mapping[str, Any],
                   prediction_type: str | None = None) -> Any:
    """A fresh diffusers scheduler for ``name``, configured from the base model's scheduler config."""
    import diffusers

    choice = name if isinstance(name, SamplerChoice) else parse_sampler(name)
    class_name, overrides = _SAMPLERS[choice.sampler]
    cls = getattr(diffusers, class_name)
    kwargs: dict[str, Any] = dict(overrides)
    if _supports_sigma_schedules(class_name):
        kwargs.update({flag: False for flag in _SIGMA_FLAGS})  # a config may carry another choice's flag
        flag = _SCHEDULES[choice.schedule]
        if flag:
            kwargs[flag] = True
    if prediction_type:
        kwargs["prediction_type"] = prediction_type
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in dict(scheduler_config).items() if k in accepted}  # no "ignored key" noise
    return cls.from_config({**config, **kwargs})


def _supports_sigma_schedules(class_name: str) -> bool:
    import diffusers

    params = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    return all(flag in params for flag in _SIGMA_FLAGS)


def _canonical(text: str, table: Mapping[str, Any], what: str) -> str:
    for key in table:
        if key.lower() == text.strip().lower():
            return key
    raise ConfigError(f"Unknown {what} {text!r}.", hint=_SCHEDULE_HINT if what != "sampler" else
                      f"Choose one of: {', '.join(_SAMPLERS)}; {_SCHEDULE_HINT}")


_SCHEDULE_HINT = ("samplers of the k-diffusion family (Euler, DPM++ 2M, DPM2, Heun, LMS, UniPC, ...) "
                  "also take a schedule type: add Karras, Exponential or Beta, e.g. 'DPM++ 2M Karras'.")
