"""The project's own fake CANN tree: what it exports, how it is cached, and the rank environment."""
import subprocess

import pytest

from dryrun_support import fake_cann_root  # noqa: F401  (session fixture)
from ms_mm.parallel.fake_cann import (STUB_LIBRARIES, _SRET_OPERATOR, _stub_assembly, dryrun_env,
                                      ensure_fake_cann, is_built)


def test_tree_has_every_library_with_the_acl_entry_points(fake_cann_root):
    assert is_built(fake_cann_root)
    lib = fake_cann_root / "cann" / "lib64"
    assert sorted(p.name for p in lib.glob("*.so")) == sorted(STUB_LIBRARIES)
    exported = subprocess.run(["nm", "-D", "--defined-only", str(lib / "libascendcl.so")], capture_output=True,
                              text=True, check=True).stdout
    names = {line.split()[-1] for line in exported.splitlines() if line.strip()}
    # entry points the Ascend plugin resolves when it starts, and the huge-page hooks
    for name in ("aclInit", "aclrtSetDevice", "aclrtMalloc", "InitHugeMemThreadLocal", "aclnnInit"):
        assert name in names
    assert (fake_cann_root / "py" / "hccl" / "sys_version.py").read_text().startswith("__sys_version__")


def test_ensure_reuses_the_cached_tree(fake_cann_root):
    stamp = (fake_cann_root / "cann" / "lib64" / "libascendcl.so").stat().st_mtime_ns
    again = ensure_fake_cann(fake_cann_root.parent)
    assert again == fake_cann_root
    assert (again / "cann" / "lib64" / "libascendcl.so").stat().st_mtime_ns == stamp


def test_stub_bodies():
    asm = _stub_assembly(["aclrtFree", "aclCreateTensor", _SRET_OPERATOR])
    free = asm.split('"aclrtFree":')[1].split(".globl")[0]
    assert "xor %eax,%eax" in free                        # ACL success
    create = asm.split('"aclCreateTensor":')[1].split(".globl")[0]
    assert "lea dummy_buf(%rip),%rax" in create           # non-null handle
    sret = asm.split(f'"{_SRET_OPERATOR}":')[1]
    assert "movq $0,0(%rdi)" in sret and "mov %rdi,%rax" in sret


def test_rank_environment(tmp_path):
    env = dryrun_env(tmp_path, rank_id=3, rank_size=8, level=0, base_env={"LD_LIBRARY_PATH": "/x", "PATH": "/bin"})
    assert env["LD_LIBRARY_PATH"] == f"{tmp_path}/cann/lib64:/x"
    assert env["PYTHONPATH"] == f"{tmp_path}/py"
    assert (env["MS_SIMULATION_LEVEL"], env["RANK_SIZE"], env["RANK_ID"]) == ("0", "8", "3")
    with pytest.raises(ValueError, match="DryRun level must be 0"):
        dryrun_env(tmp_path, 0, 8, level=2)
