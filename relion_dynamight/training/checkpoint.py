"""HDF5 checkpoints of the forward-deformation training (never pickle).

One file holds the whole training state at an epoch boundary::

    /                     attrs: format, epoch, config (JSON), fingerprint_count, fingerprint_sha256
    /split/half           (n,) int8   half of every particle (input order)
    /split/validation     (n,) bool
    /initial/...          the common initial Gaussian model (tree)
    /half1, /half2        one tree per half: network and optimiser state dicts, Gaussian parameters,
                          noise spectrum, lambda, RNG states, loss history, ...

A *tree* is a nested structure of dicts (str or int keys), lists/tuples, torch tensors, numpy arrays and
scalars (int, float, bool, str, None).  Dicts/lists become HDF5 groups, tensors/arrays become datasets
(attribute ``torch`` records the torch dtype), scalars become small datasets with a ``kind`` attribute.
Adam's nested ``state_dict`` therefore maps to groups directly.

Files are written to a temporary name and renamed (``os.replace``), so a reader never sees a partial
checkpoint unless the file system itself truncates it; :func:`load_latest` detects such damage and
falls back to the previous good checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from relion_dynamight.errors import InputError
from relion_dynamight.relion.jobdir import atomic_output

log = logging.getLogger("relion_dynamight")

FORMAT = "relion_dynamight.forward_checkpoint.v1"
_EPOCH_RE = re.compile(r"checkpoint_(\d+)\.h5$")


class CheckpointError(InputError):
    """A checkpoint file that cannot be used (damaged, other format, other particle set)."""


# -- trees ------------------------------------------------------------------------------------------
def _key(k: Any) -> str:
    if isinstance(k, bool) or not isinstance(k, (str, int)):
        raise TypeError(f"checkpoint keys must be str or int, not {type(k).__name__}")
    if isinstance(k, int):
        return f"#int:{k}"
    if "/" in k or k.startswith("#"):
        raise ValueError(f"checkpoint key {k!r} contains '/' or starts with '#'")
    return k


def _unkey(name: str) -> str | int:
    return int(name[5:]) if name.startswith("#int:") else name


def save_tree(group: h5py.Group, obj: Any) -> None:
    """Write a dict/list tree into ``group`` (which must be empty)."""
    if isinstance(obj, dict):
        group.attrs["kind"] = "dict"
        for k, v in obj.items():
            _save_node(group, _key(k), v)
    elif isinstance(obj, (list, tuple)):
        group.attrs["kind"] = "tuple" if isinstance(obj, tuple) else "list"
        group.attrs["length"] = len(obj)
        for i, v in enumerate(obj):
            _save_node(group, str(i), v)
    else:
        raise TypeError(f"save_tree needs a dict, list or tuple, not {type(obj).__name__}")


def _save_node(group: h5py.Group, name: str, value: Any) -> None:
    if isinstance(value, (dict, list, tuple)):
        save_tree(group.create_group(name), value)
    elif isinstance(value, torch.Tensor):
        data = value.detach().cpu()
        if data.dtype == torch.bfloat16:
            data = data.float()
        ds = group.create_dataset(name, data=data.numpy())
        ds.attrs["kind"] = "tensor"
        ds.attrs["torch"] = str(value.dtype).replace("torch.", "")
    elif isinstance(value, np.ndarray):
        ds = group.create_dataset(name, data=value)
        ds.attrs["kind"] = "array"
    elif value is None:
        ds = group.create_dataset(name, data=np.zeros(0))
        ds.attrs["kind"] = "none"
    elif isinstance(value, (bool, np.bool_)):
        group.create_dataset(name, data=bool(value)).attrs["kind"] = "bool"
    elif isinstance(value, (int, np.integer)):
        if -(2**63) <= int(value) < 2**63:
            group.create_dataset(name, data=np.int64(value)).attrs["kind"] = "int"
        else:  # e.g. numpy PCG64 state integers
            group.create_dataset(name, data=str(int(value))).attrs["kind"] = "bigint"
    elif isinstance(value, (float, np.floating)):
        group.create_dataset(name, data=np.float64(value)).attrs["kind"] = "float"
    elif isinstance(value, str):
        group.create_dataset(name, data=value, dtype=h5py.string_dtype()).attrs["kind"] = "str"
    else:
        raise TypeError(f"cannot store {type(value).__name__} at {group.name}/{name} in a checkpoint")


def load_tree(group: h5py.Group, device: torch.device | str | None = None) -> Any:
    """Read back what :func:`save_tree` wrote (tensors on ``device``, default CPU)."""
    kind = group.attrs.get("kind", "dict")
    if kind == "dict":
        return {_unkey(name): _load_node(group[name], device) for name in group}
    items = [_load_node(group[str(i)], device) for i in range(int(group.attrs["length"]))]
    return tuple(items) if kind == "tuple" else items


def _load_node(node: h5py.Group | h5py.Dataset, device: torch.device | str | None) -> Any:
    if isinstance(node, h5py.Group):
        return load_tree(node, device)
    kind = node.attrs["kind"]
    if kind == "tensor":
        dtype = getattr(torch, str(node.attrs["torch"]))
        tensor = torch.from_numpy(np.array(node[()]))
        return tensor.to(dtype=dtype, device=device or "cpu")
    if kind == "array":
        return np.array(node[()])
    if kind == "none":
        return None
    value = node[()]
    if kind == "bool":
        return bool(value)
    if kind == "int":
        return int(value)
    if kind == "bigint":
        return int(value.decode() if isinstance(value, bytes) else value)
    if kind == "float":
        return float(value)
    if kind == "str":
        return value.decode() if isinstance(value, bytes) else str(value)
    raise CheckpointError(f"unknown entry kind {kind!r} at {node.name}")


# -- files -----------------------------------------------------------------------------------------
def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "forward_deformations" / "checkpoints"


def epoch_path(output_dir: Path, epoch: int) -> Path:
    return checkpoint_dir(output_dir) / f"checkpoint_{epoch:03d}.h5"


def final_path(output_dir: Path) -> Path:
    return checkpoint_dir(output_dir) / "checkpoint_final.h5"


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically; keys: epoch, config (dict), fingerprint (count, sha), split_half,
    split_validation, initial (tree), halves ({1: tree, 2: tree}); optional: anything JSON-able in ``extra``."""
    path = Path(path)
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["epoch"] = int(state["epoch"])
        f.attrs["config"] = json.dumps(state["config"], sort_keys=True)
        f.attrs["fingerprint_count"] = int(state["fingerprint"][0])
        f.attrs["fingerprint_sha256"] = str(state["fingerprint"][1])
        f.attrs["extra"] = json.dumps(state.get("extra", {}), sort_keys=True)
        f.create_dataset("split/half", data=np.asarray(state["split_half"], dtype=np.int8))
        f.create_dataset("split/validation", data=np.asarray(state["split_validation"], dtype=bool))
        save_tree(f.create_group("initial"), state["initial"])
        for h, tree in sorted(state["halves"].items()):
            save_tree(f.create_group(f"half{h}"), tree)
        f.attrs["complete"] = True
    return path


def load_checkpoint(path: Path, device: torch.device | str | None = None,
                    fingerprint: tuple[int, str] | None = None) -> dict[str, Any]:
    """Read a checkpoint; raises :class:`CheckpointError` with a one-line reason when it is unusable.

    With ``fingerprint``, a checkpoint of another particle set (count or image-name hash) is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; give an existing .h5 file")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT or not f.attrs.get("complete", False):
                raise CheckpointError(f"{path} is not a complete relion_dynamight forward checkpoint "
                                      f"(format {f.attrs.get('format')!r})")
            state: dict[str, Any] = {
                "path": path,
                "epoch": int(f.attrs["epoch"]),
                "config": json.loads(f.attrs["config"]),
                "fingerprint": (int(f.attrs["fingerprint_count"]), str(f.attrs["fingerprint_sha256"])),
                "extra": json.loads(f.attrs.get("extra", "{}")),
                "split_half": np.array(f["split/half"][()]),
                "split_validation": np.array(f["split/validation"][()]),
                "initial": load_tree(f["initial"], device),
                "halves": {h: load_tree(f[f"half{h}"], device) for h in (1, 2) if f"half{h}" in f},
            }
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                              "delete it to resume from an earlier one") from None
    if set(state["halves"]) != {1, 2}:
        raise CheckpointError(f"checkpoint {path} lacks a half set (has {sorted(state['halves'])})")
    if fingerprint is not None and tuple(state["fingerprint"]) != tuple(fingerprint):
        raise CheckpointError(
            f"checkpoint {path} belongs to another particle set ({state['fingerprint'][0]} particles, "
            f"names hash {state['fingerprint'][1][:12]}…) than the input ({fingerprint[0]} particles, "
            f"{fingerprint[1][:12]}…); use a new output directory or the matching STAR file")
    return state


def _epoch_of(path: Path) -> int | None:
    """NNN of ``checkpoint_NNN.h5``; None for other names."""
    match = _EPOCH_RE.search(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint files of a job, newest first: ``checkpoint_final.h5`` then by decreasing epoch."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    numbered = sorted((p for p in folder.glob("checkpoint_*.h5") if _epoch_of(p) is not None),
                      key=lambda p: _epoch_of(p) or 0, reverse=True)
    final = final_path(output_dir)
    return ([final] if final.is_file() else []) + numbered


def load_latest(output_dir: Path, device: torch.device | str | None = None,
                fingerprint: tuple[int, str] | None = None) -> dict[str, Any] | None:
    """The newest usable checkpoint of a job (None when there is none).

    A damaged file is reported with a warning naming it, and the previous one is tried.  A checkpoint
    of another particle set is an error (the directory belongs to another run).
    """
    paths = list_checkpoints(output_dir)
    for path in paths:
        try:
            return load_checkpoint(path, device, fingerprint)
        except CheckpointError as exc:
            if "another particle set" in str(exc):
                raise
            log.warning("WARNING: skipping unusable checkpoint: %s", exc)
    if paths:
        raise CheckpointError(
            f"none of the {len(paths)} checkpoint(s) in {checkpoint_dir(output_dir)} can be read, so the training "
            "cannot continue and starting again would overwrite them; to start afresh use a new output "
            "directory (or move that folder away)")
    return None


def prune(output_dir: Path, keep: int = 3, every: int = 10, best_epoch: int | None = None) -> None:
    """The keep policy: the ``keep`` newest numbered checkpoints, every ``every``-th epoch (0 = none), the epoch
    ``best_epoch`` (lowest validation loss) and ``checkpoint_final.h5``; the others are removed.  Names are
    ``checkpoint_NNN.h5`` (epochs done, zero-padded: ``ls`` lists them in order)."""
    numbered = [p for p in list_checkpoints(output_dir) if p.name != "checkpoint_final.h5"]
    for old in numbered[keep:]:
        epoch = _epoch_of(old) or 0
        if (every > 0 and epoch % every == 0) or epoch == best_epoch:
            continue
        old.unlink(missing_ok=True)
