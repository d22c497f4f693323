"""Stand-ins for Ascend CANN's shared libraries, so MindSpore's DryRun runs on a CPU-only host.

MindSpore's DryRun (``MS_SIMULATION_LEVEL``) compiles a sharded graph for a simulated Ascend
cluster without touching a device, but its Ascend plugin only loads when the CANN libraries it
links against are present. This module builds a tree of stub ``.so`` files that export every
symbol the plugin needs (each one returns 0, i.e. ACL success; pointer-returning constructors
return a non-null dummy), plus a fake ``hccl`` Python package whose version check passes.
Nothing in the tree computes anything: it only lets the compiler run.

    root = ensure_fake_cann()           # cached under ~/.cache/ms_mm/fake-cann/<key>
    env = dryrun_env(root, rank_id=0, rank_size=8, level=1)

The build needs ``gcc`` and ``nm`` (binutils) and takes ~10-30 s; it is keyed by the MindSpore
version and install path, written to a temporary directory and renamed into place, so parallel
builders (pytest workers, several ranks) never see a half-built tree.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

# Libraries the Ascend plugin of MindSpore 2.x dlopen()s or links against. Every one gets the same
# stub body; the soname must match the file name for the dynamic loader.
STUB_LIBRARIES = (
    "libge_runner.so", "libgraph.so", "libascendcl.so", "libmsprofiler.so", "libhccl.so", "libruntime.so",
    "libplatform.so", "libc_sec.so", "libnnopbase.so", "libascend_hal.so", "libprofapi.so", "libregister.so",
    "libmmpa.so", "libascendalog.so", "libatb.so", "libexe_graph.so", "libopapi.so", "libacl_op_compiler.so",
)
# The CANN version MindSpore 2.9 accepts; the fake hccl package reports it.
FAKE_CANN_VERSION = "8.5.0"
# Symbols looked up at run time that no undefined-symbol table lists.
_EXTRA_SYMBOLS = ("InitHugeMemThreadLocal", "UnInitHugeMemThreadLocal", "ReleaseHugeMem", "aclnnInit",
                  "aclnnFinalize")
# ge::OperatorFactory::CreateOperator returns a ge::Operator by value (through the hidden sret
# pointer in %rdi): the stub must zero that object, or its destructor frees garbage.
_SRET_OPERATOR = "_ZN2ge15OperatorFactory14CreateOperatorEPKcS2_"
_SYSTEM_LIBS = ("/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libm.so.6",
                "/lib/x86_64-linux-gnu/libstdc++.so.6", "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib64/ld-linux-x86-64.so.2")
_FORMAT = "1"  # bump when the stub layout changes, to invalidate old caches


class FakeCannError(RuntimeError):
    """The fake CANN tree could not be built (missing gcc/nm, unsupported platform, ...)."""


def mindspore_dir() -> Path:
    spec = importlib.util.find_spec("mindspore")
    if spec is None or spec.origin is None:
        raise FakeCannError("mindspore is not installed in this Python")
    return Path(spec.origin).parent


def default_cache_root() -> Path:
    base = os.environ.get("MS_MM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ms_mm")
    return Path(base) / "fake-cann"


def _cache_key(ms_dir: Path) -> str:
    version = "unknown"
    version_file = ms_dir / ".commit_id"
    if version_file.is_file():
        version = version_file.read_text(errors="replace")
    plugin = ms_dir / "lib" / "plugin" / "libmindspore_ascend.so.2"
    stamp = f"{plugin.stat().st_size}:{int(plugin.stat().st_mtime)}" if plugin.exists() else "-"
    raw = f"{_FORMAT}|{ms_dir}|{version}|{stamp}"
    return hashlib.sha1(raw.encode()).hexdigest()[:12]


def _nm(path: str, undefined: bool) -> dict:
    flag = "--undefined-only" if undefined else "--defined-only"
    out = subprocess.run(["nm", "-D", flag, path], capture_output=True, text=True).stdout
    symbols = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            symbols[parts[-1].split("@")[0]] = parts[-2]
    return symbols


def _symbols_to_stub(ms_dir: Path) -> set:
    """Undefined symbols of the Ascend plugin that nothing in MindSpore or libc provides, plus the
    ACL / aclnn entry points MindSpore resolves by name with dlsym()."""
    lib, plugin = ms_dir / "lib", ms_dir / "lib" / "plugin"
    providers = glob.glob(f"{lib}/*.so*") + glob.glob(f"{plugin}/**/*.so*", recursive=True)
    providers += glob.glob(f"{ms_dir}/*.so") + [f for f in _SYSTEM_LIBS if os.path.exists(f)]
    providers += glob.glob("/lib/x86_64-linux-gnu/libgomp.so*")
    defined = set()
    for f in providers:
        defined |= set(_nm(f, undefined=False))
    targets = [str(plugin / "libmindspore_ascend.so.2"), str(plugin / "libmindspore_ops_ascend.so")]
    targets += [f for f in glob.glob(f"{plugin}/ascend/**/*.so*", recursive=True) if "dvpp" not in f]
    names = set()
    for target in targets:
        if not os.path.exists(target):
            continue
        for sym, kind in _nm(target, undefined=True).items():
            if kind != "w" and sym not in defined and not sym.startswith(("Py", "_Py")):
                names.add(sym)
    # names MindSpore dlsym()s appear only as strings: printable runs of >= 5 bytes (what
    # `strings` prints) that are exactly an acl* identifier
    printable = re.compile(rb"[\x20-\x7e\t]{5,}")
    identifier = re.compile(rb"acl[A-Za-z0-9_]+")
    for f in glob.glob(f"{plugin}/*.so*") + glob.glob(f"{plugin}/ascend/*.so") + glob.glob(f"{lib}/*.so"):
        with open(f, "rb") as fh:
            runs = set(printable.findall(fh.read()))
        for run in runs:
            if not identifier.fullmatch(run):
                continue
            name = run.decode()
            names.add(name)
            if name.startswith("aclnn") and len(name) > 5:
                names.add(name + "GetWorkspaceSize")
    names.update(_EXTRA_SYMBOLS)
    return names


def _stub_assembly(names) -> str:
    lines = [".bss", ".align 64", "dummy_buf:", ".zero 65536", ".text"]
    for sym in sorted(names):
        lines += [f'.globl "{sym}"', f'.type "{sym}",@function', f'"{sym}":']
        if sym == _SRET_OPERATOR:
            lines += [f"  movq $0,{off}(%rdi)" for off in range(0, 48, 8)] + ["  mov %rdi,%rax", "  ret"]
        elif sym.startswith(("aclCreate", "aclopCreate")):
            lines += ["  lea dummy_buf(%rip),%rax", "  ret"]
        else:
            lines += ["  xor %eax,%eax", "  ret"]
    return "\n".join(lines) + "\n"


def build_fake_cann(out_dir) -> Path:
    """Build the tree into ``out_dir`` (``cann/lib64/*.so`` and ``py/hccl``); returns ``out_dir``."""
    for tool in ("gcc", "nm"):
        if shutil.which(tool) is None:
            raise FakeCannError(f"building the fake CANN tree for DryRun needs `{tool}` on PATH")
    if os.uname().machine != "x86_64":
        raise FakeCannError(f"the fake CANN stubs are x86_64 assembly; this host is {os.uname().machine}")
    out = Path(out_dir).resolve()
    ms_dir = mindspore_dir()
    lib64 = out / "cann" / "lib64"  # MindSpore checks that the path contains "cann" or "latest"
    lib64.mkdir(parents=True, exist_ok=True)
    src = out / "stub.S"
    src.write_text(_stub_assembly(_symbols_to_stub(ms_dir)))
    for so in STUB_LIBRARIES:
        proc = subprocess.run(["gcc", "-shared", "-nostdlib", "-o", str(lib64 / so), f"-Wl,-soname,{so}", str(src)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise FakeCannError(f"gcc failed building {so}:\n{proc.stderr[-2000:]}")
    hccl = out / "py" / "hccl"
    hccl.mkdir(parents=True, exist_ok=True)
    (hccl / "__init__.py").write_text("")
    (hccl / "sys_version.py").write_text(f'__sys_version__ = "{FAKE_CANN_VERSION}"\n')
    return out


def is_built(root) -> bool:
    root = Path(root)
    return (all((root / "cann" / "lib64" / so).is_file() for so in STUB_LIBRARIES)
            and (root / "py" / "hccl" / "sys_version.py").is_file())


def ensure_fake_cann(cache_root=None) -> Path:
    """Return a ready fake CANN tree, building it once per MindSpore install (atomic rename)."""
    cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = cache_root / _cache_key(mindspore_dir())
    if is_built(target):
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_root))
    try:
        build_fake_cann(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_built(target):  # someone else won the race with a complete tree, or not
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def dryrun_env(root, rank_id: int, rank_size: int, level: int = 1, base_env=None) -> dict:
    """Environment for one simulated rank: the stub libraries first on the loader path, the fake
    ``hccl`` on PYTHONPATH, and the DryRun variables MindSpore reads."""
    if level not in (0, 1):
        raise ValueError(f"DryRun level must be 0 (compile only) or 1 (compile + memory), got {level}")
    env = dict(os.environ if base_env is None else base_env)
    root = Path(root)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(root / "cann" / "lib64"), env.get("LD_LIBRARY_PATH")]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "py"), env.get("PYTHONPATH")]))
    env["MS_SIMULATION_LEVEL"] = str(level)
    env["RANK_SIZE"] = str(rank_size)
    env["RANK_ID"] = str(rank_id)
    # the memory figures are WARNING-level log lines: a quieter GLOG_v (3, errors only) hides them
    if env.get("GLOG_v") not in ("0", "1", "2"):
        env["GLOG_v"] = "2"
    return env
