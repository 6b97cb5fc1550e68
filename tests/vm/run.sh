#!/usr/bin/env bash
# The real-kernel test of -c/-d (deno task test:vm): this machine's kernel has no nbd module, so
# Debian's kernel (which has nbd.ko) boots under qemu-system-x86_64 with a busybox initramfs that
# holds deno, denbd, qemu-nbd and fio, and runs tests/vm/guest.sh with denbd and then qemu-nbd.
# The host then checks what each left behind with qemu-img and e2fsprogs, compares the two, and
# ends with "N passed, M failed".
#
#   tests/vm/run.sh          the test
#   tests/vm/run.sh --bench  fio on /dev/nbd0 in the guest, denbd against qemu-nbd
#                            (BENCH_SECONDS per job, default 10, after BENCH_WARMUP seconds)
#
# Needs (installed with apt-get when run as root): qemu-system-x86, busybox-static, qemu-utils,
# fio, e2fsprogs, and the kernel package linux-image-amd64 depends on (downloaded, not
# installed, into DENBD_VM_CACHE, default ~/.cache/denbd-vm). ACCEL overrides qemu's
# accelerator options (default TCG); VM_TIMEOUT the time limit in seconds; VM_KEEP=1 keeps the
# work directory.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
mode=test
[ "${1:-}" = --bench ] && mode=bench
cache="${DENBD_VM_CACHE:-$HOME/.cache/denbd-vm}"
work="$(mktemp -d /tmp/denbd-vm.XXXXXX)"
[ "${VM_KEEP:-}" = 1 ] || trap 'rm -rf "$work"' EXIT
passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok   $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }
finish() { echo "${passed} passed, ${failed} failed"; [ "$failed" -eq 0 ]; exit $?; }

# --- what the VM needs -----------------------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
# (grep without -q reads the whole list: an early exit would fail the pipe under pipefail)
[ -x /bin/busybox ] && /bin/busybox --list | grep -x depmod >/dev/null || need+=(busybox-static)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v fio >/dev/null || need+=(fio)
command -v debugfs >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "vm: installing ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "vm: missing Debian packages: ${need[*]}" >&2
    fail "prerequisites"
    finish
  fi
fi
if ! file /bin/busybox | grep -q static; then
  echo "vm: /bin/busybox is not static (install busybox-static)" >&2
  fail "prerequisites"
  finish
fi
deno="$(bash "$root/scripts/deno.sh" eval 'console.log(Deno.execPath())')" || {
  fail "deno"
  finish
}

mkdir -p "$cache"
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n 1)
[ -n "$kpkg" ] || kpkg=$(ls "$cache" 2>/dev/null | sed -n 's/^\(linux-image-[0-9.-]*-amd64\)_.*\.deb$/\1/p' | tail -n 1)
if [ -z "$kpkg" ]; then
  fail "no linux-image package known to apt"
  finish
fi
deb=$(ls "$cache/${kpkg}"_*.deb 2>/dev/null | tail -n 1)
if [ -z "$deb" ]; then
  echo "vm: downloading $kpkg"
  (cd "$cache" && apt-get download "$kpkg" >/dev/null 2>&1) || (cd "$cache" && apt-get update -qq && apt-get download "$kpkg" >/dev/null)
  deb=$(ls "$cache/${kpkg}"_*.deb 2>/dev/null | tail -n 1)
fi
if [ -z "$deb" ]; then
  fail "download $kpkg"
  finish
fi
kver=${kpkg#linux-image-}
kroot="$cache/root-$kver"
if [ ! -d "$kroot/lib/modules/$kver" ]; then
  rm -rf "$kroot"
  dpkg-deb -x "$deb" "$kroot"
  /bin/busybox depmod -b "$kroot" "$kver"
fi

# --- the initramfs ---------------------------------------------------------------------------
ird="$work/initrd"
mkdir -p "$ird"/{bin,usr/bin,dev,proc,sys,tmp,modules,denodir}
cp /bin/busybox "$ird/bin/"
copy_bin() { # copy a program and the libraries it links to, at their paths
  local b
  b=$(readlink -f "$1")
  cp "$b" "$ird/usr/bin/$(basename "$1")"  # named as called (deno, qemu-nbd, fio)
  ldd "$b" | awk '/=>/ { print $3 } $1 ~ /^\// { print $1 }' | while read -r l; do
    [ -n "$l" ] && [ -e "$l" ] && cp -L --parents "$l" "$ird" 2>/dev/null
  done
}
copy_bin "$deno"
copy_bin "$(command -v qemu-nbd)"
copy_bin "$(command -v fio)"
# denbd's FFI opens libc by name; GnuTLS and libzstd only when asked for.
cp -L --parents /lib/x86_64-linux-gnu/libc.so.6 "$ird"
# Modules: virtio disks (input/output tars), ext4 for the filesystem test; nbd.ko last.
moddir="$kroot/lib/modules/$kver"
deps_of() { # module path relative to moddir -> it and its dependencies, dependencies first
  local m=$1 d
  for d in $(sed -n "s|^$m: *||p" "$moddir/modules.dep" | tr ' ' '\n' | tac); do deps_of "$d"; done
  echo "$m"
}
: > "$work/order"
for m in kernel/drivers/virtio/virtio_pci.ko kernel/drivers/block/virtio_blk.ko \
  kernel/crypto/crc32c_generic.ko kernel/fs/ext4/ext4.ko; do
  deps_of "$m" >> "$work/order"
done
awk '!seen[$0]++' "$work/order" | while read -r m; do
  cp "$moddir/$m" "$ird/modules/"
  basename "$m" >> "$ird/modules/order"
done
cp "$moddir/kernel/drivers/block/nbd.ko" "$ird/modules/"
# The project as a user runs it from a checkout, at the same path as here so that the modules
# Deno compiles now (one run of --version loads them all) are found in the guest's DENO_DIR.
mkdir -p "$ird$root"
(cd "$root" && cp -r main.ts deno.json lib ffi "$ird$root/")
echo "$root/main.ts" > "$ird/denbd-main"
DENO_DIR="$ird/denodir" "$deno" run --allow-read --allow-write --allow-net --allow-ffi \
  --allow-env --allow-run "$root/main.ts" --version > /dev/null
cp "$root/tests/vm/guest.sh" "$ird/init"
chmod +x "$ird/init"
(cd "$ird" && find . | /bin/busybox cpio -o -H newc 2>/dev/null) > "$work/initrd.cpio"

# --- the input disk: images with a partition table, a pattern, files to copy ----------------
in="$work/in"
mkdir -p "$in/files/sub"
python3 - "$in" <<'EOF'
import os, random, struct, sys
d = sys.argv[1]
rng = random.Random(12)
size = 64 << 20
img = bytearray(size)
# An MBR with one Linux partition of 16 MiB at 1 MiB: the kernel must see nbd0p1 at once.
entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, 32768)
img[446:462] = entry
img[510:512] = b"\x55\xaa"
img[8 << 20:(8 << 20) + 65536] = bytes(rng.getrandbits(8) for _ in range(65536))
open(f"{d}/raw.img", "wb").write(img)
open(f"{d}/pattern.bin", "wb").write(os.urandom(4 << 20))
for name, n in [("a.bin", 1), ("b.bin", 70000), ("sub/c.bin", 3 << 20), ("sub/empty", 0)]:
    open(f"{d}/files/{name}", "wb").write(os.urandom(n))
EOF
qemu-img convert -f raw -O qcow2 "$in/raw.img" "$in/qcow2.img"
(cd "$in/files" && find . -type f | sort | xargs sha256sum) > "$in/files.sha256"
(cd "$work" && tar -cf "$work/input.tar" in)
truncate -s 1G "$work/output.img"

# --- boot ------------------------------------------------------------------------------------
# TCG by default: this machine kind's /dev/kvm exists but a guest on it hangs in the BIOS.
ACCEL=${ACCEL:-"-accel tcg,thread=multi -cpu max -smp 2"}
append="console=ttyS0 panic=-1 quiet rdinit=/init"
[ $mode = bench ] && append="$append VM_BENCH=1 BENCH_SECONDS=${BENCH_SECONDS:-10} BENCH_WARMUP=${BENCH_WARMUP:-10}"
echo "vm: booting $kver ($ACCEL), mode $mode"
start=$(date +%s)
# shellcheck disable=SC2086
timeout "${VM_TIMEOUT:-900}" qemu-system-x86_64 $ACCEL -machine pc -m 2048 -nographic -no-reboot \
  -kernel "$kroot/boot/vmlinuz-$kver" -initrd "$work/initrd.cpio" -append "$append" \
  -drive file="$work/input.tar",format=raw,if=virtio,readonly=on \
  -drive file="$work/output.img",format=raw,if=virtio > "$work/console.log" 2>&1
qrc=$?
echo "vm: qemu exited $qrc after $(( $(date +%s) - start )) s"
log="${VM_LOG:-$root/tests/vm/last-console.log}"
cp "$work/console.log" "$log" 2>/dev/null || true
if [ $qrc -ne 0 ]; then
  fail "the VM ran to its end (exit $qrc; console in $log)"
  tail -n 30 "$work/console.log"
fi
grep -a '^VMTEST ' "$work/console.log" | grep -a -v ' ok ' | sed 's/^/  /'

# --- results -----------------------------------------------------------------------------------
out="$work/out"
mkdir -p "$out"
tar -xf "$work/output.img" -C "$out" 2>/dev/null || fail "output tar from the guest"
results="$out/results.txt"
[ -s "$results" ] || { fail "the guest wrote results"; finish; }
while read -r _ s f c st detail; do
  case $st in
    ok) pass "guest $s $f $c" ;;
    note) echo "note guest $s $f $c: $detail" ;;
    *) fail "guest $s $f $c: $detail" ;;
  esac
done < "$results"

if [ $mode = bench ]; then
  echo
  echo "| job | image | denbd | qemu-nbd | denbd/qemu-nbd |"
  echo "| --- | --- | --- | --- | --- |"
  grep ' bench-' "$results" | awk '{
    split($6, r, "="); split($7, w, "="); split($8, rb, "="); split($9, wb, "=");
    v = ($4 ~ /randwrite/) ? w[2] : ($4 ~ /randread/) ? r[2] : rb[2] / 1024;
    key = $4 " | " $3; val[$2, key] = v; keys[key] = 1 }
    END { for (k in keys) { d = val["denbd", k]; q = val["qemu-nbd", k];
      printf "| %s | %.0f | %.0f | %.2fx |\n", k, d, q, (q > 0 ? d / q : 0) } }' | sort
  finish
fi

# Host checks of what each server left behind, then the two compared.
for s in denbd qemu-nbd; do
  for f in raw qcow2; do
    img="$out/$s-$f.img"
    [ -f "$img" ] || { fail "$s $f: image came back"; continue; }
    if [ $f = qcow2 ]; then
      if qemu-img check -f qcow2 "$img" > "$work/check.txt" 2>&1; then pass "host $s $f: qemu-img check"; else
        fail "host $s $f: qemu-img check: $(tr '\n' ' ' < "$work/check.txt")"
      fi
    fi
    vsize=$(qemu-img info -f $f --output=json "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
    [ "$vsize" = 67108864 ] && pass "host $s $f: virtual size" || fail "host $s $f: virtual size $vsize"
    qemu-img convert -f $f -O raw "$img" "$work/flat.raw"
    dd if="$work/flat.raw" of="$work/part.raw" bs=1M skip=1 count=48 status=none
    cmp -s <(dd if="$work/flat.raw" bs=1M skip=60 count=4 status=none) "$in/pattern.bin" &&
      pass "host $s $f: O_DIRECT pattern in the image" || fail "host $s $f: O_DIRECT pattern in the image"
    e2fsck -fn "$work/part.raw" > "$work/fsck.txt" 2>&1 && pass "host $s $f: e2fsck clean" ||
      fail "host $s $f: e2fsck: $(tail -n 3 "$work/fsck.txt" | tr '\n' ' ')"
    rm -rf "$work/files"
    mkdir -p "$work/files"
    debugfs -R "rdump /files $work/files" "$work/part.raw" > /dev/null 2>&1
    if [ -d "$work/files/files" ] && (cd "$work/files/files" && find . -type f | sort | xargs sha256sum) |
      cmp -s - "$in/files.sha256"; then
      pass "host $s $f: files read back with debugfs"
    else
      fail "host $s $f: files read back with debugfs"
    fi
    for k in direct files; do cp "$out/$s-$f.$k.sha256" "$work/$s-$f.$k" 2>/dev/null; done
  done
done
for f in raw qcow2; do
  for k in direct files; do
    cmp -s "$work/denbd-$f.$k" "$work/qemu-nbd-$f.$k" && pass "same $k checksums, denbd and qemu-nbd ($f)" ||
      fail "same $k checksums, denbd and qemu-nbd ($f)"
  done
  # The filesystems differ (mke2fs picks a UUID and times); outside them the images must match.
  qemu-img convert -f $f -O raw "$out/denbd-$f.img" "$work/d.raw"
  qemu-img convert -f $f -O raw "$out/qemu-nbd-$f.img" "$work/q.raw"
  if cmp -s <(dd if="$work/d.raw" bs=1M skip=49 status=none) <(dd if="$work/q.raw" bs=1M skip=49 status=none) &&
    cmp -s <(head -c 446 "$work/d.raw") <(head -c 446 "$work/q.raw") &&
    cmp -s <(dd if="$work/d.raw" bs=1 skip=446 count=66 status=none) <(dd if="$work/q.raw" bs=1 skip=446 count=66 status=none); then
    pass "same bytes outside the filesystem, denbd and qemu-nbd ($f)"
  else
    fail "same bytes outside the filesystem, denbd and qemu-nbd ($f)"
  fi
done
cmp -s "$out/denbd-verbose.err" "$out/qemu-nbd-verbose.err" && pass "-v: same stderr as qemu-nbd" ||
  fail "-v: same stderr as qemu-nbd: $(cat "$out/denbd-verbose.err" "$out/qemu-nbd-verbose.err" 2>/dev/null | tr '\n' '|')"
finish
