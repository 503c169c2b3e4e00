"""Reading atomic models (PDB / mmCIF) with gemmi, for ``simulate --pdb`` and ``--atomic-model``.

One reader so that both commands accept the same files and fail with the same kind of message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relion_dynamight.errors import InputError


def read_structure(path: str | Path, option: str) -> Any:
    """The ``gemmi.Structure`` in ``path`` without hydrogens, waters and alternative conformations.

    ``option`` names the command-line option that gave the file (e.g. ``--pdb``), for the error message.
    Raises :class:`InputError` (one line: the file, what is wrong, what to do) when the file is missing,
    unreadable or holds no model.
    """
    import gemmi

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: atomic model not found; check {option}")
    try:
        structure = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"{path}: cannot read the atomic model ({exc}); give a PDB or mmCIF file with {option}") \
            from None
    structure.remove_hydrogens()
    structure.remove_waters()
    structure.remove_alternative_conformations()
    if len(structure) == 0:
        raise InputError(f"{path}: the atomic model holds no model/atoms; check {option}")
    return structure
