"""``torch.load`` of untrusted files (always ``weights_only=True``), failing with one clear error.

A garbage, truncated or hostile file makes torch raise an UnpicklingError whose advice is to
load with ``weights_only=False``; :func:`torch_load` instead names the file and says how to
rebuild it.
"""

from __future__ import annotations

import io
import re
from typing import Any


class UnreadableFileError(ValueError):
    """A checkpoint or model file that torch cannot (or, safely, will not) load."""


def torch_load(source: bytes | str, origin: str, hint: str) -> Any:
    """``torch.load(source, weights_only=True)``; ``origin`` names the file, ``hint`` the way out."""
    import torch

    try:
        return torch.load(io.BytesIO(source) if isinstance(source, bytes) else source, weights_only=True)
    except OSError:
        raise
    except Exception as e:  # whatever garbage bytes make the unpickler raise: the file is unreadable
        text = str(e).strip()
        cause = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        reason = cause.group(1) if cause else text.split(". ")[0].splitlines()[0] if text else ""
        raise UnreadableFileError(f"{origin}: not a readable torch file ({type(e).__name__}: {reason}); {hint}") from e
