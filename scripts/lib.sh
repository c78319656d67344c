# Shared helpers for Berth's scripts. Source it; do not run it.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${BERTH_BUILD:-$ROOT/build}
CACHE=${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# rust_target ARCH -> the musl target triple
rust_target() {
  case "$1" in
    x86_64) echo x86_64-unknown-linux-musl ;;
    arm64|aarch64) echo aarch64-unknown-linux-musl ;;
    *) die "unknown arch '$1' (x86_64 or arm64)" ;;
  esac
}

# norm_arch ARCH -> x86_64 | arm64
norm_arch() {
  case "$1" in
    x86_64|amd64) echo x86_64 ;;
    arm64|aarch64) echo arm64 ;;
    *) die "unknown arch '$1' (x86_64 or arm64)" ;;
  esac
}

# berth_bin ARCH -> path of the static berth binary for ARCH (built by scripts/build-berth)
berth_bin() { echo "$ROOT/target/$(rust_target "$1")/release/berth"; }

# host_berth -> a berth binary that runs on this machine (for the host-side tools)
host_berth() { berth_bin "$(norm_arch "$(uname -m)")"; }
