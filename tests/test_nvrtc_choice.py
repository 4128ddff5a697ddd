"""Which libnvrtc ferrox.cuda picks: torch's CUDA major version first (an
NVRTC newer than the driver makes kernels the driver refuses), then search
order; FERROX_NVRTC always wins. Fake library files in temporary folders,
no GPU and no real NVRTC needed."""

import os

from ferrox.cuda import _nvrtc_major, find_nvrtc, nvrtc_candidates


def touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()
    return str(path)


def site(tmp_path, name, libs):
    d = tmp_path / name
    for rel in libs:
        touch(d / rel)
    return str(d)


def test_torchs_major_version_is_preferred(tmp_path):
    s = site(tmp_path, "site", ["nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cu13/lib/libnvrtc-builtins.so.13.0",
                                "nvidia/cu12/lib/libnvrtc.so.12", "nvidia/cuda_nvrtc/lib/libnvrtc.so.11.2"])
    env = {}
    assert find_nvrtc([s], cuda_major=12, env=env).endswith("nvidia/cu12/lib/libnvrtc.so.12")
    assert find_nvrtc([s], cuda_major=13, env=env).endswith("nvidia/cu13/lib/libnvrtc.so.13")
    assert find_nvrtc([s], cuda_major=11, env=env).endswith("nvidia/cuda_nvrtc/lib/libnvrtc.so.11.2")
    # No match: the first candidate (the newest pip folder).
    assert find_nvrtc([s], cuda_major=10, env=env).endswith("nvidia/cu13/lib/libnvrtc.so.13")


def test_a_later_site_or_cuda_home_wins_when_only_it_matches(tmp_path):
    first = site(tmp_path, "a", ["nvidia/cu13/lib/libnvrtc.so.13"])
    second = site(tmp_path, "b", ["nvidia/cu12/lib/libnvrtc.so.12.8.93", "nvidia/cu12/lib/libnvrtc.so.12"])
    home = tmp_path / "cuda-11.8"
    touch(home / "lib64" / "libnvrtc.so.11.2")
    env = {"CUDA_HOME": str(home)}
    # Within a folder the most specific version file is taken.
    assert find_nvrtc([first, second], cuda_major=12, env=env).endswith("libnvrtc.so.12.8.93")
    assert find_nvrtc([first, second], cuda_major=11, env=env) == str(home / "lib64" / "libnvrtc.so.11.2")
    assert nvrtc_candidates([first, second], env)[:3] == [
        str(tmp_path / "a/nvidia/cu13/lib/libnvrtc.so.13"),
        str(tmp_path / "b/nvidia/cu12/lib/libnvrtc.so.12.8.93"),
        str(home / "lib64" / "libnvrtc.so.11.2"),
    ]


def test_ferrox_nvrtc_wins_and_nothing_found_is_none(tmp_path):
    s = site(tmp_path, "site", ["nvidia/cu13/lib/libnvrtc.so.13"])
    assert find_nvrtc([s], cuda_major=13, env={"FERROX_NVRTC": "/opt/x/libnvrtc.so.12"}) == "/opt/x/libnvrtc.so.12"
    empty = site(tmp_path, "empty", [])
    # Only the fixed system location is left to search.
    got = find_nvrtc([empty], cuda_major=13, env={"CUDA_HOME": str(tmp_path / "none")})
    assert got is None or got.startswith("/usr/local/cuda/lib64/"), got


def test_major_versions_are_read_from_names_and_folders():
    assert _nvrtc_major("/x/libnvrtc.so.13") == 13
    assert _nvrtc_major("/x/libnvrtc.so.12.4.127") == 12
    assert _nvrtc_major("/s/nvidia/cu13/lib/libnvrtc.so") == 13
    assert _nvrtc_major("/usr/lib/libnvrtc.so") is None


def test_the_default_choice_matches_torch():
    import torch

    path = find_nvrtc(env={})
    assert path is not None, "the test venv has pip's NVRTC"
    if torch.version.cuda:
        assert _nvrtc_major(path) == int(torch.version.cuda.split(".")[0]), path
