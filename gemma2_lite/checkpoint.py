"""Load and save Gemma 2 weights: Hugging Face (safetensors) and the official Flax/Orbax layout.

One import for every checkpoint function; the work is done in small modules:

* :mod:`gemma2_lite.safetensors_io` -- the safetensors format (validated, memory-mapped reader;
  atomic writer).
* :mod:`gemma2_lite.weight_maps` -- every format's names and layouts as tables ("our path <->
  theirs" with named transforms), read by one import and one export routine.
* :mod:`gemma2_lite.params` -- the model to and from ``{path: array}``, every name, shape, dtype
  and value checked.
* :mod:`gemma2_lite.hf_config`, :mod:`gemma2_lite.hf_checkpoint` -- Hugging Face folders
  (``config.json``, shards and index; transactional saves through
  :mod:`gemma2_lite.folder_swap`, verification).
* :mod:`gemma2_lite.flax_checkpoint` -- the official Orbax checkpoints.

Every tensor is shape-checked against the config before the model is built, and a missing,
extra or mis-shaped tensor is reported by name with the expected and found shapes. Only
safetensors are read for Hugging Face checkpoints (never pickle). The layouts are tabled in
:mod:`gemma2_lite.weight_maps`.
"""

from __future__ import annotations

from .flax_checkpoint import (
    infer_flax_config,
    is_orbax_checkpoint,
    load_flax,
    save_flax,
    to_flax_tree,
    to_released_flax_tree,
)
from .hf_checkpoint import (
    INDEX_FILE,
    MANIFEST_FILE,
    SINGLE_FILE,
    hf_state_dict,
    hf_to_arrays,
    load_hf,
    read_hf_tensors,
    read_index,
    save_hf,
    verify_hf_folder,
)
from .hf_config import config_from_hf, config_to_hf, read_hf_config
from .params import Path_, Placer, check_arrays, from_arrays, to_arrays
from .safetensors_io import CheckpointError, read_safetensors, write_safetensors

__all__ = [
    "CheckpointError",
    "read_safetensors",
    "write_safetensors",
    "config_from_hf",
    "config_to_hf",
    "read_hf_config",
    "read_hf_tensors",
    "read_index",
    "check_arrays",
    "load_hf",
    "save_hf",
    "verify_hf_folder",
    "load_flax",
    "save_flax",
    "to_flax_tree",
    "to_released_flax_tree",
    "is_orbax_checkpoint",
    "infer_flax_config",
    "from_arrays",
    "to_arrays",
    "hf_state_dict",
    "hf_to_arrays",
    "Path_",
    "Placer",
    "INDEX_FILE",
    "SINGLE_FILE",
    "MANIFEST_FILE",
]
