"""Run profiles: one switch that sizes every notebook and experiment.

Set ``GEMMA2_LITE_PROFILE`` to ``ci`` (CPU, the whole book in minutes), ``colab`` (one TPU chip
or GPU) or ``full`` (the real sizes, a TPU slice). Code reads the active profile with
:func:`get_profile` and picks sizes with :func:`pick`::

    steps = pick(ci=50, colab=2_000, full=20_000)
"""

from __future__ import annotations

import os
from typing import TypeVar

__all__ = ["PROFILES", "ENV_VAR", "get_profile", "pick", "describe_devices", "repo_root", "data_path"]

ENV_VAR = "GEMMA2_LITE_PROFILE"
PROFILES = ("ci", "colab", "full")
T = TypeVar("T")


def get_profile() -> str:
    """The active profile: ``$GEMMA2_LITE_PROFILE``, or ``ci`` when unset."""
    value = os.environ.get(ENV_VAR, "ci").strip().lower() or "ci"
    if value not in PROFILES:
        raise ValueError(f"{ENV_VAR}={value!r} is not a profile; choose one of {PROFILES}")
    return value


def pick(*, ci: T, colab: T, full: T, profile: str | None = None) -> T:
    """The value for the active (or given) profile."""
    profile = profile or get_profile()
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILES}")
    return {"ci": ci, "colab": colab, "full": full}[profile]


def describe_devices() -> str:
    """One line naming the profile and the devices JAX found (the notebooks print it first)."""
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (f"profile={get_profile()}  backend={jax.default_backend()}  "
            f"devices={len(devices)} x {', '.join(kinds)}")


def repo_root() -> "os.PathLike[str]":
    """The checkout this package was installed from (holds data/, notebooks/, results/)."""
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


def data_path(*parts: str) -> "os.PathLike[str]":
    """A path inside the repository's ``data/`` folder, e.g. ``data_path("tokenizer.model")``."""
    return repo_root() / "data" / os.path.join(*parts) if parts else repo_root() / "data"
