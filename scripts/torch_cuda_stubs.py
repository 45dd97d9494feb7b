#!/usr/bin/env python3
"""Make the PyPI Linux torch wheel import on a CPU-only machine without the
multi-GB nvidia-* CUDA wheels.

The PyPI torch wheel for linux/x86_64 is a CUDA build: its shared libraries
have DT_NEEDED entries for libcudart, libcublas, libcudnn, ... which normally
come from ~3 GB of nvidia-* / cuda-toolkit wheels.  This script builds tiny
stub shared objects with the same SONAMEs, the same symbol-version nodes and
every symbol that torch imports from them (each stub function returns 100,
i.e. cudaErrorNoDevice / "not supported"), and drops them into torch/lib
(which is on the libraries' $ORIGIN rpath).  Nothing CUDA is ever called on
the CPU code path: torch.cuda.is_available() returns False.

Usage (needs gcc + binutils' readelf/nm):
    pip install --no-deps torch==2.15.0
    pip install filelock typing-extensions setuptools sympy networkx jinja2 fsspec
    python scripts/torch_cuda_stubs.py            # uses the torch in sys.path
"""
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

SYSTEM_LIBS = {
    "libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1",
    "libstdc++.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2", "libgomp.so.1",
    "libutil.so.1",
}


MSG = "CUDA is not available (torch_cuda_stubs: CPU-only install)"
# Entry points that must behave like "CUDA runtime present, no device": the
# generic stub would return 100 where a pointer or an out-parameter is expected.
SPECIAL = {
    "cudaGetDeviceCount": "int cudaGetDeviceCount(int *n) { if (n) *n = 0; return 100; }",
    "cudaGetDevice": "int cudaGetDevice(int *d) { if (d) *d = 0; return 100; }",
    "cudaDriverGetVersion": "int cudaDriverGetVersion(int *v) { if (v) *v = 0; return 0; }",
    "cudaRuntimeGetVersion": "int cudaRuntimeGetVersion(int *v) { if (v) *v = 13020; return 0; }",
    "cudaGetLastError": "int cudaGetLastError(void) { return 0; }",
    "cudaPeekAtLastError": "int cudaPeekAtLastError(void) { return 0; }",
}


def special_body(sym):
    if sym in SPECIAL:
        return SPECIAL[sym] + "\n"
    if re.search(r"(ErrorString|ErrorName|StatusString|StatusName|GetString)$", sym):
        return f'const char *{sym}(void) {{ return "{MSG}"; }}\n'
    return None


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def torch_lib_dir():
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("torch is not installed in this interpreter's sys.path")
    return os.path.join(list(spec.submodule_search_locations)[0], "lib")


def main():
    libdir = torch_lib_dir()
    # remove stubs from an earlier run (listed in torch/lib/CUDA_STUBS.txt)
    marker = os.path.join(libdir, "CUDA_STUBS.txt")
    if os.path.exists(marker):
        for name in open(marker).read().split():
            if os.path.exists(os.path.join(libdir, name)):
                os.remove(os.path.join(libdir, name))
        os.remove(marker)
    torch_dir = os.path.dirname(libdir)
    elfs = [os.path.join(libdir, f) for f in sorted(os.listdir(libdir)) if ".so" in f]
    elfs += [os.path.join(torch_dir, f) for f in os.listdir(torch_dir) if f.endswith(".so")]
    own = {os.path.basename(p) for p in elfs}

    needed = set()
    # version name -> soname (from .gnu.version_r of every torch ELF)
    ver_to_file = {}
    undef = {}  # symbol -> version or None
    for p in elfs:
        dyn = sh("readelf", "-d", "-W", p)
        needed.update(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dyn))
        vr = sh("readelf", "-V", "-W", p)
        cur = None
        for line in vr.splitlines():
            m = re.search(r"File: (\S+)", line)
            if m:
                cur = m.group(1)
                continue
            m = re.search(r"Name: (\S+)\s+Flags", line)
            if m and cur:
                ver_to_file[m.group(1)] = cur
        for line in sh("readelf", "--dyn-syms", "-W", p).splitlines():
            parts = line.split()
            if len(parts) >= 8 and parts[6] == "UND" and parts[7]:
                name = parts[7]
                ver = None
                if "@" in name:
                    name, ver = name.split("@", 1)
                    ver = ver.split()[0].lstrip("@")
                    name = name.strip()
                if name:
                    undef.setdefault(name, ver)

    # only stub what the system linker cannot find (libz, libquadmath, ... are real)
    on_system = set(re.findall(r"^\s+(\S+) \(", sh("/sbin/ldconfig", "-p"), re.M))
    missing = sorted(n for n in needed
                     if n not in SYSTEM_LIBS and n not in own and n not in on_system)
    # symbols defined by the libraries we do have (system + torch's own)
    defined = set()
    for p in elfs:
        for line in sh("nm", "-D", "--defined-only", p).splitlines():
            defined.add(line.split()[-1].split("@")[0])
    for lib in SYSTEM_LIBS:
        for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", libdir):
            q = os.path.join(d, lib)
            if os.path.exists(q):
                for line in sh("nm", "-D", "--defined-only", q).splitlines():
                    defined.add(line.split()[-1].split("@")[0])
                break

    per_lib = {m: {} for m in missing}  # soname -> {sym: version}
    orphans = []
    for sym, ver in undef.items():
        if ver and ver_to_file.get(ver) in per_lib:
            per_lib[ver_to_file[ver]][sym] = ver
        elif not ver and sym not in defined:
            orphans.append(sym)
    # unversioned symbols nobody provides: park them in one stub (global scope)
    if missing:
        host = "libcudart.so.13" if "libcudart.so.13" in per_lib else missing[0]
        for s in orphans:
            if s.startswith(("_ITM_", "__gmon_start__", "_Jv_")):
                continue
            per_lib[host].setdefault(s, None)

    with tempfile.TemporaryDirectory() as tmp:
        for soname, syms in per_lib.items():
            c = os.path.join(tmp, "stub.c")
            vs = os.path.join(tmp, "stub.map")
            with open(c, "w") as f:
                f.write("/* auto-generated CUDA stub: every entry point reports failure */\n")
                for s in sorted(syms):
                    f.write(special_body(s) or f"int {s}(void) {{ return 100; }}\n")
            vers = sorted({v for v in syms.values() if v})
            with open(vs, "w") as f:
                unv = sorted(s for s, v in syms.items() if not v)
                for v in vers:
                    body = "".join(f"{s};" for s, vv in syms.items() if vv == v)
                    f.write(f"{v} {{ global: {body} }};\n")
                if not vers:
                    f.write("{ global: *; };\n")
                elif unv:
                    # unversioned exports go in the base (first) node
                    pass
            out = os.path.join(libdir, soname)
            args = ["gcc", "-shared", "-fPIC", "-O0", "-w", "-o", out, c,
                    f"-Wl,-soname,{soname}"]
            if vers:
                args.append(f"-Wl,--version-script={vs}")
            subprocess.run(args, check=True)
            with open(marker, "a") as f:
                f.write(soname + "\n")
            print(f"stub {soname}: {len(syms)} symbols, versions {vers}")


if __name__ == "__main__":
    main()
