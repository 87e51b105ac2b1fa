"""Run profiles: one switch that sizes every notebook and experiment.

``GEMMA2_LITE_PROFILE`` is one of :data:`PROFILES`: ``ci`` (CPU, the whole book in minutes),
``colab`` (one TPU chip or GPU), ``full`` (the real sizes, a TPU slice), or ``smoke`` (the unit
tests' runs of the experiments, in seconds: a value picked without a ``smoke`` size takes its
``ci`` one, so every chapter runs there as at ``ci``). Unset, the profile follows the hardware:
``colab`` when a TPU or GPU is attached to this machine, ``ci`` otherwise, so a Colab runtime
that restarts keeps its profile. Code reads the active profile with :func:`get_profile` and
picks sizes with :func:`pick`::

    T = pick(ci=23, colab=128, full=512)                         # a shape
    steps = pick(ci=50, colab=2_000, full=20_000, loop=True)     # a loop count

``GEMMA2_LITE_LOOP_CAP=N`` is the one knob that shortens a run without changing what it computes
on: every value picked with ``loop=True`` (training steps, warm-up steps, repetitions of a
random check) is capped at N, and every shape stays the profile's. ``make colab-check`` uses it
to execute the whole ``colab`` profile on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from gemma2_lite.checks import is_int

# The path lookups moved to gemma2_lite.paths; the old names stay importable from here.
from gemma2_lite.paths import data_path, repo_root

__all__ = [
    "PROFILES",
    "BOOK_PROFILES",
    "ENV_VAR",
    "LOOP_CAP_VAR",
    "get_profile",
    "pick",
    "capped",
    "loop_cap",
    "attached_accelerator",
    "describe_devices",
    "repo_root",
    "data_path",
    "REPOSITORY",
]

ENV_VAR = "GEMMA2_LITE_PROFILE"
LOOP_CAP_VAR = "GEMMA2_LITE_LOOP_CAP"
#: The one table of profiles, smallest first: name -> what it is for. Every function and
#: command line that takes a profile accepts exactly these.
PROFILES: dict[str, str] = {
    "smoke": "the unit tests' runs of the experiments (seconds); values without a smoke "
    "size take their ci one",
    "ci": "a CPU: the whole book in minutes",
    "colab": "one TPU chip or GPU",
    "full": "the real sizes, a TPU slice",
}
#: The profiles the book is built and shown at (``smoke`` is for the tests).
BOOK_PROFILES = ("ci", "colab", "full")
# The book's repository. The setup cell of every notebook, _config.yml and the README name it
# too (they run before this package is installed); tests/test_environment.py keeps them equal.
REPOSITORY = "https://github.com/gemma2-lite/gemma2-lite"
T = TypeVar("T")

# What to run when a TPU or GPU is attached but JAX was installed for the CPU only.
_FIX = {"tpu": 'pip install -U "jax[tpu]"', "gpu": 'pip install -U "jax[cuda12]"'}


def attached_accelerator() -> str | None:
    """``"tpu"`` or ``"gpu"`` when this machine has one attached, else ``None``.

    Read from the operating system (device files and the variables Colab and Cloud TPU VMs
    set), not from JAX: it must not initialise a JAX backend (multi-host set-up has to come
    first) and it must see the hardware even when the installed JAX is a CPU-only build.
    """
    if any(os.environ.get(v) for v in ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE")):
        return "tpu"
    if any(Path("/dev").glob("accel[0-9]*")) or Path("/dev/vfio/0").exists():
        return "tpu"
    if Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/version").exists():
        return "gpu"
    return None


def get_profile() -> str:
    """The active profile: ``$GEMMA2_LITE_PROFILE``; unset, ``colab`` on an accelerator, else
    ``ci``."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return "colab" if attached_accelerator() else "ci"
    if value not in PROFILES:
        raise ValueError(f"{ENV_VAR}={value!r} is not a profile; choose one of {tuple(PROFILES)}")
    return value


def loop_cap() -> int | None:
    """``$GEMMA2_LITE_LOOP_CAP`` as a positive int, or ``None`` when unset (no cap)."""
    raw = os.environ.get(LOOP_CAP_VAR, "").strip()
    if not raw:
        return None
    try:
        cap = int(raw)
    except ValueError:
        cap = 0
    if cap <= 0:
        raise ValueError(f"{LOOP_CAP_VAR}={raw!r} must be a positive whole number of iterations")
    return cap


def pick(
    *,
    ci: T,
    colab: T,
    full: T,
    profile: str | None = None,
    loop: bool = False,
    smoke: T | None = None,
) -> T:
    """The value for the active (or given) profile.

    ``loop=True`` marks a loop count (an int): it is capped at ``$GEMMA2_LITE_LOOP_CAP`` when that
    is set. Shapes are never marked, so a capped run still computes on the profile's shapes.
    ``smoke`` is the value at the ``smoke`` profile (the unit tests' tiny runs of the
    experiments); without one, ``smoke`` takes the ``ci`` value.
    """
    profile = profile or get_profile()
    values = {"smoke": ci if smoke is None else smoke, "ci": ci, "colab": colab, "full": full}
    if profile not in values:
        raise ValueError(f"unknown profile {profile!r}; choose one of {tuple(PROFILES)}")
    value = values[profile]
    return capped(value) if loop else value


def capped(count: T) -> T:
    """A loop count (int) capped at ``$GEMMA2_LITE_LOOP_CAP``; anything else unchanged."""
    cap = loop_cap()
    if cap is not None and is_int(count) and count > cap:
        return cap  # type: ignore[return-value]
    return count


def describe_devices() -> str:
    """The line every notebook prints first: profile, backend and devices.

    When a TPU or GPU is attached but JAX sees only the CPU (a CPU-only jaxlib), a second line
    says so and gives the one command that fixes it.
    """
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    cap = loop_cap()
    line = (
        f"profile={get_profile()}  backend={jax.default_backend()}  "
        f"devices={len(devices)} x {', '.join(kinds)}"
        + (f"  loops capped at {cap} ({LOOP_CAP_VAR})" if cap else "")
    )
    attached = attached_accelerator()
    if attached and jax.default_backend() == "cpu":
        line += (
            f"\nA {attached.upper()} is attached but JAX sees only the CPU (a CPU-only "
            f"jaxlib). Run  {_FIX[attached]}  and restart the runtime."
        )
    return line
