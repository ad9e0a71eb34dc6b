#!/usr/bin/env bash
# Build `ragar` with CUDA on all three backends (release) into
# target/cuda/release/ragar, from registry packages only, on a machine with
# or without a GPU (recipes: notes/native-backends.md):
#
# - candle: nvcc, headers and libraries from the `cuda-toolkit` PyPI wheels
#   (13.0.2) in the project venv, a CUDA_HOME made of links to them, and a
#   stub libcuda.so (soname libcuda.so.1) holding the driver symbols the link
#   asks for: no wheel ships libcuda, and at run time the driver's real one
#   is loaded. CUDA_COMPUTE_CAP defaults to 90 (H100 / H200).
# - tch: the torch 2.11.0 wheel's libtorch (set up by scripts/setup.sh) is
#   the CUDA build; `--features cuda` keeps libtorch_cuda.so linked.
# - ort: `--features cuda` turns on ONNX Runtime's CUDA execution provider.
#   UNVERIFIED: it needs an onnxruntime-gpu library (ORT_DYLIB_PATH), which
#   no machine here has had.
#
# At run time on the GPU machine: LD_LIBRARY_PATH=<venv site-packages>/nvidia/cu13/lib
# (printed at the end). scripts/gpu-check.sh runs the checks there.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
CACHE=${RAGAR_CACHE:-$ROOT/.ragar}
V="$CACHE/venv"
say() { echo "build-cuda: $*" >&2; }

say "CUDA toolkit wheels (nvcc 13.0)"
"$V/bin/pip" install -q "cuda-toolkit[nvcc,cudart,crt,cccl,nvvm,cublas,curand,nvrtc]==13.0.2"
SP=$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CU="$SP/nvidia/cu13"
[[ -x "$CU/bin/nvcc" ]] || { say "no nvcc in $CU/bin"; exit 1; }

HOME_DIR="$CACHE/cuda-home"
mkdir -p "$HOME_DIR/lib64/stubs"
for d in bin include nvvm; do ln -sfn "$CU/$d" "$HOME_DIR/$d"; done
# Unversioned names for the linker (the wheels ship libX.so.13 only).
for lib in "$CU"/lib/lib*.so.*; do
  base=$(basename "$lib")
  ln -sfn "$lib" "$HOME_DIR/lib64/${base%%.so.*}.so"
done
export CUDA_HOME="$HOME_DIR" CUDA_PATH="$HOME_DIR" PATH="$HOME_DIR/bin:$PATH"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH="$HOME_DIR/lib64:$HOME_DIR/lib64/stubs:${LIBRARY_PATH:-}"
export LD_LIBRARY_PATH="$CU/lib:${LD_LIBRARY_PATH:-}"

build() {
  cargo build --release -p ragar-host --bin ragar --features cuda --target-dir target/cuda 2>&1 | tee "$CACHE/build-cuda.log"
}
# The stub libcuda: the driver symbols the links report missing, as empty
# functions (the real driver library replaces it at run time). lld reports
# at most 20 undefined symbols per link, so the stub grows over a few links
# until nothing is missing.
stub() { # the symbols, one per line
  { echo 'void cuInit(void) {}'; for s in $1; do [[ $s == cuInit ]] || echo "void $s(void) {}"; done; } > "$HOME_DIR/stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$HOME_DIR/lib64/stubs/libcuda.so" "$HOME_DIR/stub.c"
}
[[ -f "$HOME_DIR/lib64/stubs/libcuda.so" ]] || stub ""
known=$(grep -oE "void cu[A-Za-z0-9_]+" "$HOME_DIR/stub.c" 2>/dev/null | cut -c6- || true)
links=0
until build; do
  # GNU ld says "undefined reference to `cuX'", lld (rustc's default linker
  # on x86_64 Linux) "undefined symbol: cuX".
  missing=$(grep -oE "undefined (reference to \`|symbol: )cu[A-Za-z0-9_]+" "$CACHE/build-cuda.log" \
    | grep -oE "cu[A-Za-z0-9_]+$" | sort -u || true)
  [[ -n "$missing" ]] || { say "build failed (see $CACHE/build-cuda.log)"; exit 1; }
  links=$((links + 1))
  (( links <= 10 )) || { say "libcuda stub still missing symbols after 10 links (see $CACHE/build-cuda.log)"; exit 1; }
  known=$(printf '%s\n%s\n' "$known" "$missing" | grep -v '^$' | sort -u)
  say "stub libcuda with $(echo "$known" | wc -l) driver symbols"
  stub "$known"
done
say "built target/cuda/release/ragar"
say "run it with: LD_LIBRARY_PATH=$CU/lib target/cuda/release/ragar ..."
