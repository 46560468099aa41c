#!/usr/bin/env bash
# Builds csrc/onednn_conv/build/libjaxsam_onednn_conv.so against the oneDNN of
# the active Python environment (pip install onednn-cpu-gomp==2023.2.0
# onednn-devel-cpu-gomp==2023.2.0: headers in $prefix/include, libdnnl.so in
# $prefix/lib) and jaxlib's FFI headers (jax.ffi.include_dir()).
#   usage: PYTHON=/work/venv/bin/python bash csrc/onednn_conv/build.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python}"
prefix="$("$python" -c 'import sys; print(sys.prefix)')"
ffi_include="$("$python" -c 'import jax; print(jax.ffi.include_dir())')"
dnnl_include="${DNNL_INCLUDE:-$prefix/include}"
dnnl_lib="${DNNL_LIB:-$prefix/lib}"
if [ ! -f "$dnnl_include/oneapi/dnnl/dnnl.hpp" ] || [ ! -e "$dnnl_lib/libdnnl.so" ]; then
  echo "oneDNN not found under $prefix: pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0" >&2
  exit 1
fi
mkdir -p "$here/build"
"${CXX:-g++}" -O2 -std=c++17 -shared -fPIC \
  -I"$ffi_include" -I"$dnnl_include" "$here/onednn_conv.cc" \
  -L"$dnnl_lib" -ldnnl -Wl,-rpath,"$dnnl_lib" \
  -o "$here/build/libjaxsam_onednn_conv.so"
echo "built $here/build/libjaxsam_onednn_conv.so"
