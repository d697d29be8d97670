"""The C++ CPU scan on Arm: cpu_scan.cpp built for aarch64, by Debian's cross compiler and by
clang, with the flags the build uses there, runs under user-mode emulation (qemu-aarch64) in
place of this machine's build, behind the same autograd Function as the "cpu" backend, and
matches the float64 reference forward and backward. clang, macOS's compiler, takes every
build's flags for macOS targets. The tools: `apt-get install g++-aarch64-linux-gnu qemu-user
clang`; where one is missing, the tests that need it skip, naming it."""

import ctypes
import shutil
import struct
import subprocess
from functools import partial
from pathlib import Path

import pytest
import torch

from selective_scan import cpu
from tests.test_cpu_scan import float32_errors
from tests.test_selective_scan import assert_matches_reference, make_inputs

# Cross builds and an emulator: the slow tier (bash scripts/test.sh --fast leaves them out).
pytestmark = pytest.mark.slow

DRIVER = Path(__file__).with_name("cpu_scan_driver.cpp")  # the kernel behind stdin and stdout
COMPILERS = {"g++": ["aarch64-linux-gnu-g++"], "clang": ["clang++", "--target=aarch64-linux-gnu"]}
QEMU = next((tool for tool in ("qemu-aarch64", "qemu-aarch64-static") if shutil.which(tool)),
            None)


def require(*tools: str | None) -> None:
    missing = [tool for tool in tools if tool is None or shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(t or 'qemu-aarch64' for t in missing)} (apt-get install "
                    "g++-aarch64-linux-gnu qemu-user clang)")


@pytest.fixture(scope="module", params=list(COMPILERS))
def arm_driver(request, tmp_path_factory) -> Path:
    """The driver and kernel, a static aarch64 executable built with Arm's build flags (torch
    reports no x86 capability there)."""
    compiler = COMPILERS[request.param]
    require(compiler[0], QEMU)
    path = tmp_path_factory.mktemp("arm") / f"driver-{request.param}"
    build = subprocess.run([*compiler, *cpu.build_flags("DEFAULT")[1], "-static",
                            f"-I{cpu.SOURCE.parent}", str(DRIVER), "-o", str(path)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    header = path.read_bytes()[:20]  # ELF, machine (bytes 18-19, little-endian) 183: AArch64
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183
    return path


def run_under_qemu(driver: Path, direction: str, dtype: torch.dtype, **fields) -> None:
    """cpu.run_kernel's call made by the aarch64 driver: the integers and tensors go through its
    stdin (see cpu_scan_driver.cpp), its outputs are copied back into the tensors."""
    fields = {"threads": 2, **fields}  # two threads, so that the pthreads code runs on Arm too
    names = [(name, kind is ctypes.c_int64) for name, kind in cpu.ScanProblem._fields_]
    tensors = [fields.get(name) for name, integer in names if not integer]
    data = [struct.pack("<2q", direction == "bwd", dtype.itemsize)]
    data += [struct.pack("<q", fields.get(name, 0)) for name, integer in names if integer]
    for t in tensors:
        data += [struct.pack("<q", -1)] if t is None else [struct.pack("<q", t.nbytes),
                                                            t.numpy().tobytes()]
    run = subprocess.run([QEMU, str(driver)], input=b"".join(data), capture_output=True)
    assert run.returncode == 0, run.stderr.decode()
    offset = 0
    for t in (t for t in tensors if t is not None):
        t.view(-1).copy_(torch.frombuffer(bytearray(run.stdout[offset:offset + t.nbytes]),
                                          dtype=t.dtype))
        offset += t.nbytes
    assert offset == len(run.stdout)


@pytest.fixture
def arm_scan(arm_driver, monkeypatch):
    """cpu.selective_scan_cpu with every kernel call run by the aarch64 build."""
    constants = subprocess.run([QEMU, str(arm_driver), "constants"], capture_output=True,
                               text=True, check=True).stdout.split()
    lanes, tile = (int(c) for c in constants)
    assert (lanes, tile) == (8, 16)  # two NEON registers of floats per vector

    class ArmConstants:
        selective_scan_lanes = staticmethod(lambda: lanes)
        selective_scan_tile = staticmethod(lambda: tile)

    monkeypatch.setattr(cpu, "load_cpu_kernel", lambda: (ArmConstants, ""))
    monkeypatch.setattr(cpu, "run_kernel", partial(run_under_qemu, arm_driver))
    return cpu.selective_scan_cpu


@pytest.mark.parametrize(
    "length, dim, groups, state",
    [(100, 32, None, 16), (37, 20, 2, 19), (17, 8, 1, 16), (5, 4, 2, 3)],
    ids=["N16-4-blocks", "N19-G2", "N16-tile+1", "N3-short"],
)
def test_arm_build_float32_is_exact_to_float_precision(arm_scan, length, dim, groups, state):
    errors = float32_errors(make_inputs(length, groups, dim=dim, state=state), scan=arm_scan)
    assert max(errors.values()) < 2e-6, errors  # the bound of the x86 builds' test


def test_arm_build_extreme_decays(arm_scan):
    # exp's clamping to float's range, which has no x86 intrinsic on Arm (as test_cpu_scan's)
    inputs = make_inputs(50, groups=2, dim=20, state=16)
    with torch.no_grad():
        inputs["A"][:6] = -1e4
        inputs["delta"][:, 10:13] += 1e3
    errors = float32_errors(inputs, scan=arm_scan)
    assert max(errors.values()) < 2e-6, errors


def test_arm_build_matches_reference_float64(arm_scan):
    assert_matches_reference(arm_scan, make_inputs(37, groups=2, dim=20, state=5), True)


@pytest.mark.parametrize("target, capability", [
    ("arm64-apple-macos", "DEFAULT"), ("x86_64-apple-macos", "DEFAULT"),
    ("x86_64-apple-macos", "AVX2"), ("x86_64-apple-macos", "AVX512")])
def test_clang_takes_the_build_flags_for_macos(target, capability):
    """No macOS headers here, so clang compiles an empty file for the target with the build's
    flags and macOS's C++ library, any warning (an unknown or unused flag) an error. The kernel
    is compiled by clang above (aarch64) and by test_clang_compiles_the_x86_builds."""
    require("clang++")
    flags = cpu.build_flags(capability)[1]
    check = subprocess.run(["clang++", f"--target={target}", "-stdlib=libc++", *flags, "-Werror",
                            "-x", "c++",
                            "-c", "/dev/null", "-o", "/dev/null"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_clang_compiles_the_x86_builds(capability, tmp_path):
    require("clang++")
    flags = cpu.build_flags(capability)[1]
    build = subprocess.run(["clang++", *flags, "-Werror", "-c", str(cpu.SOURCE), "-o",
                            str(tmp_path / "scan.o")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
