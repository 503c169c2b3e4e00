"""Particle images from MRC stacks (stub: being implemented)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def parse_image_name(name: str) -> tuple[int, str]:
    raise NotImplementedError


class ImageSource:
    def __init__(self, table, project_dir: Path | None = None, preload: bool = False) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, indices: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def estimate_bytes(self) -> int:
        raise NotImplementedError
