"""``install-relion-gui``: put our RELION GUI files into a project (or any directory).

Writes the files of :func:`relion_dynamight.relion.schemes.gui_files` (the same as the repository's
``relion_gui/`` folder): ``.gui_dynamightjob.star`` (defaults of RELION 5's DynaMight tab, with the
executable ``relion_dynamight``), ``External/dynamight_*/job.star`` (External-job definitions to load
in the GUI) and ``Schemes/dynamight/`` (the unattended scheme).  Nothing else is touched: a file that
already exists with other content is kept (and reported) unless ``force`` is given.
"""

from __future__ import annotations

import logging
from pathlib import Path

from relion_dynamight.errors import InputError
from relion_dynamight.relion.schemes import _atomic_write, gui_files

log = logging.getLogger("relion_dynamight")


def install(project: Path, force: bool = False) -> tuple[list[Path], list[Path]]:
    """Write the GUI files under ``project``; returns ``(written, kept)`` paths."""
    project = Path(project)
    if not project.is_dir():
        raise InputError(f"{project}: no such directory; give the RELION project directory with --project")
    written: list[Path] = []
    kept: list[Path] = []
    for rel, text in gui_files().items():
        path = project / rel
        if path.exists():
            if path.read_text() == text:
                continue
            if not force:
                kept.append(path)
                continue
        _atomic_write(path, text)
        written.append(path)
    return written, kept


def run(job: object = None, project: Path = Path("."), force: bool = False) -> None:
    written, kept = install(project, force)
    for path in written:
        log.info("wrote %s", path)
    for path in kept:
        log.warning("kept your own %s (differs from ours; use --force to replace it)", path)
    if not written and not kept:
        log.info("RELION GUI files in %s are up to date", project)
    log.info("Start the scheme with: relion_schemer --scheme dynamight --run --pipeline_control Schemes/dynamight/")
    return None
