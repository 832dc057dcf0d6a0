"""Can this torch build run kernels on these GPUs? Checked once at start-up, before any work.

A torch wheel ships machine code (cubins, `sm_XY`) for a list of GPU architectures and, at
times, PTX (`compute_XY`) the driver can compile for newer ones. A GPU outside that list fails
late and obscurely ("no kernel image is available for execution on the device"), e.g. a
GTX 1080 Ti (sm_61) or a Titan X Maxwell (sm_52) under the CUDA 12.8+ wheels, which start at
sm_75. `check_gpus()` stops at start-up instead, naming the GPU and the exact build to install.

CUDA's compatibility rules, as `arch_supported` applies them:
- a cubin `sm_XY` runs on capability X.Z for Z >= Y (same major only): sm_80 covers an sm_86;
- an arch-specific cubin `sm_XYa` runs on exactly X.Y; a family cubin `sm_XYf` like `sm_XY`;
- PTX `compute_XY` is JIT-compiled for any capability >= X.Y (slow first start, then cached).

The pure functions take (capabilities, names, arch list) so they are tested without a GPU;
`check_gpus()` feeds them from torch.cuda. The torch/torchvision versions in the install
command come from one place: the pins in pyproject.toml, read back from the installed
fashionseg package metadata (falling back to the installed torch/torchvision versions).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata

# Wheels for GPUs the default (CUDA 12.8+) builds dropped: sm_50..sm_70 (Maxwell, Pascal, Volta).
LEGACY_CUDA_INDEX = "https://download.pytorch.org/whl/cu126"
# The oldest capability any current PyTorch CUDA build targets.
MIN_SUPPORTED_CAPABILITY = (5, 0)

_ARCH_RE = re.compile(r"^(sm|compute)_(\d+)(\d)([af]?)$")


class GPUCompatibilityError(RuntimeError):
    """A visible GPU cannot run this torch build's kernels."""


@dataclass(frozen=True)
class GPUInfo:
    index: int
    name: str
    capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"


def parse_arch(entry: str) -> tuple[str, tuple[int, int], str]:
    """'sm_86' -> ('sm', (8, 6), ''); 'compute_90' -> ('compute', (9, 0), ''); 'sm_100a' -> ('sm', (10, 0), 'a')."""
    m = _ARCH_RE.match(entry.strip())
    if not m:
        raise ValueError(f"unrecognised CUDA arch entry {entry!r} (expected sm_XY or compute_XY)")
    kind, major, minor, suffix = m.groups()
    return kind, (int(major), int(minor)), suffix


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether code in `arch_list` (torch.cuda.get_arch_list()) can run on `capability`."""
    cap = tuple(capability)
    for entry in arch_list:
        try:
            kind, arch, suffix = parse_arch(entry)
        except ValueError:
            continue  # unknown future spelling: never the reason to refuse a GPU
        if suffix == "a":
            ok = arch == cap
        elif kind == "sm":
            ok = arch[0] == cap[0] and arch[1] <= cap[1]
        else:  # PTX: forward-compatible through the driver's JIT
            ok = arch <= cap
        if ok:
            return True
    return False


def pinned_versions() -> tuple[str, str]:
    """(torch, torchvision) versions as pinned in pyproject.toml (via fashionseg's metadata)."""
    pins: dict[str, str] = {}
    try:
        for req in metadata.requires("fashionseg") or []:
            m = re.match(r"^(torch|torchvision)\s*==\s*([^\s;]+)\s*$", req)
            if m:
                pins[m.group(1)] = m.group(2)
    except metadata.PackageNotFoundError:
        pass
    for pkg in ("torch", "torchvision"):
        if pkg not in pins:
            try:
                pins[pkg] = metadata.version(pkg).split("+")[0]
            except metadata.PackageNotFoundError:
                pins[pkg] = "<version>"
    return pins["torch"], pins["torchvision"]


def install_command(capability: tuple[int, int]) -> str:
    """The pip command for a torch build with kernels for `capability`."""
    torch_v, tv_v = pinned_versions()
    if tuple(capability) < MIN_SUPPORTED_CAPABILITY:
        return (f"(none: current PyTorch CUDA builds start at sm_{MIN_SUPPORTED_CAPABILITY[0]}"
                f"{MIN_SUPPORTED_CAPABILITY[1]}; this GPU needs an old torch release or another GPU)")
    if tuple(capability) < (7, 5):
        return f"pip install torch=={torch_v} torchvision=={tv_v} --index-url {LEGACY_CUDA_INDEX}"
    return f"pip install torch=={torch_v} torchvision=={tv_v}  # the default CUDA 12.8+ wheels cover sm_75..sm_120"


def unsupported_gpus(
    capabilities: list[tuple[int, int]], names: list[str], arch_list: list[str]
) -> list[GPUInfo]:
    """The GPUs (in visible order) this arch list cannot run on."""
    return [
        GPUInfo(i, name, tuple(cap))
        for i, (cap, name) in enumerate(zip(capabilities, names))
        if not arch_supported(tuple(cap), arch_list)
    ]


def check_gpu_support(
    capabilities: list[tuple[int, int]],
    names: list[str],
    arch_list: list[str],
    torch_version: str,
    cuda_version: str | None,
) -> None:
    """Raise GPUCompatibilityError naming every unsupported GPU and the build to install."""
    bad = unsupported_gpus(capabilities, names, arch_list)
    if not bad:
        return
    lines = [
        f"this torch build cannot run on {len(bad)} of {len(names)} visible GPU(s): "
        f"torch {torch_version} (CUDA {cuda_version or 'none'}) has kernels for "
        f"{' '.join(arch_list) or 'no GPU architecture'}"
    ]
    for g in bad:
        lines.append(f"  GPU {g.index}: {g.name}, compute capability {g.capability[0]}.{g.capability[1]} ({g.sm})")
    commands = sorted({install_command(g.capability) for g in bad})
    lines.append("install a build that supports it (in this project's virtualenv):")
    lines += [f"  {c}" for c in commands]
    lines.append("or hide the GPU with CUDA_VISIBLE_DEVICES. (README: 'Older GPUs')")
    raise GPUCompatibilityError("\n".join(lines))


def visible_gpus() -> list[GPUInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [
        GPUInfo(i, torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
        for i in range(torch.cuda.device_count())
    ]


def check_gpus() -> list[GPUInfo]:
    """Start-up check for the trainer and `launcher doctor`: the visible GPUs, or raise.

    Returns [] where CUDA is unavailable (CPU runs are allowed; callers decide if that is fine).
    """
    import torch

    gpus = visible_gpus()
    check_gpu_support(
        [g.capability for g in gpus], [g.name for g in gpus],
        torch.cuda.get_arch_list() if gpus else [], torch.__version__, torch.version.cuda,
    )
    return gpus

