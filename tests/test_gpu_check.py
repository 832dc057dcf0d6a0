"""GPU capability vs torch build: pure logic over (capabilities, names, arch list), no GPU needed."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st
import torch

from fashionseg.model.gpu import (
    GPUCompatibilityError, arch_supported, check_gpu_support, check_gpus, install_command, parse_arch,
    pinned_versions, unsupported_gpus,
)

CU128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


def test_parse_arch():
    assert parse_arch("sm_86") == ("sm", (8, 6), "")
    assert parse_arch("sm_120") == ("sm", (12, 0), "")
    assert parse_arch("compute_90") == ("compute", (9, 0), "")
    assert parse_arch("sm_100a") == ("sm", (10, 0), "a")
    with pytest.raises(ValueError):
        parse_arch("gfx90a")


@pytest.mark.parametrize("cap,arch_list,ok", [
    ((5, 2), CU128, False),            # Titan X Maxwell on a CUDA 12.8+ build
    ((6, 1), CU128, False),            # GTX 1080 Ti
    ((5, 2), CU126, True),             # sm_50 cubin runs on 5.2 (same major, lower minor)
    ((6, 1), CU126, True),
    ((9, 0), ["sm_90"], True),
    ((8, 9), ["sm_80", "sm_86"], True),  # Ada runs Ampere cubins
    ((8, 6), ["sm_90"], False),        # a newer cubin never runs on an older GPU
    ((12, 0), CU126, False),           # Blackwell: no sm_12x cubin and no PTX
    ((12, 0), CU126 + ["compute_90"], True),   # PTX JIT-compiles forward
    ((8, 6), ["compute_90"], False),   # but not backward
    ((9, 0), ["sm_90a"], True),
    ((10, 0), ["sm_90a"], False),      # arch-specific cubins run on exactly that capability
])
def test_arch_supported(cap, arch_list, ok):
    assert arch_supported(cap, arch_list) is ok


def test_unsupported_gpus_reports_each_by_index():
    bad = unsupported_gpus([(8, 6), (6, 1), (5, 2)], ["RTX 3090", "GTX 1080 Ti", "GTX TITAN X"], CU128)
    assert [(g.index, g.name, g.sm) for g in bad] == [(1, "GTX 1080 Ti", "sm_61"), (2, "GTX TITAN X", "sm_52")]


def test_error_names_gpu_build_and_install_command():
    torch_v, tv_v = pinned_versions()
    with pytest.raises(GPUCompatibilityError) as err:
        check_gpu_support([(6, 1)], ["NVIDIA GeForce GTX 1080 Ti"], CU128, "2.14.1+cu128", "12.8")
    msg = str(err.value)
    assert "NVIDIA GeForce GTX 1080 Ti" in msg and "6.1 (sm_61)" in msg
    assert "torch 2.14.1+cu128 (CUDA 12.8)" in msg and "sm_75 sm_80" in msg
    assert (f"pip install torch=={torch_v} torchvision=={tv_v} "
            f"--index-url https://download.pytorch.org/whl/cu126") in msg
    check_gpu_support([(6, 1), (5, 2)], ["a", "b"], CU126, "2.14.1+cu126", "12.6")  # passes
    check_gpu_support([(9, 0)], ["H100"], ["sm_90"], "x", "12.8")
    check_gpu_support([], [], [], "x", None)  # no GPU: nothing to check


def test_pins_come_from_the_project_metadata():
    from importlib import metadata

    requires = metadata.requires("fashionseg") or []
    torch_v, tv_v = pinned_versions()
    assert f"torch=={torch_v}" in requires and f"torchvision=={tv_v}" in requires
    assert "cu126" not in install_command((8, 0)) and "cu126" in install_command((7, 0))
    assert install_command((3, 7)).startswith("(none")


def test_check_gpus_on_this_machine():
    gpus = check_gpus()  # raises on an unsupported GPU, else lists them
    assert len(gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


caps = st.tuples(st.integers(3, 12), st.integers(0, 9))
archs = st.lists(st.builds(lambda k, c, s: f"{k}_{c[0]}{c[1]}{s}", st.sampled_from(["sm", "compute"]), caps,
                           st.sampled_from(["", "", "a", "f"])), max_size=8)


@given(cap=caps, arch_list=archs, extra=archs)
def test_arch_support_rules_hold_for_any_list(cap, arch_list, extra):
    ok = arch_supported(cap, arch_list)
    assert not ok or arch_supported(cap, arch_list + extra)  # more code never removes support
    assert arch_supported(cap, arch_list + [f"sm_{cap[0]}{cap[1]}"])  # exact cubin always runs
    assert arch_supported(cap, [f"compute_{cap[0]}{max(cap[1] - 1, 0)}"])  # PTX JITs forward
    # cubins of another major never count, however close
    other_major = [f"sm_{m}{n}" for m in range(3, 13) if m != cap[0] for n in (0, 5)]
    assert not arch_supported(cap, other_major)
