#!/bin/busybox sh
# Runs inside the test VM (PID 1 of a busybox initramfs; see tests/vm/run.sh). For each server
# (denbd, qemu-nbd) and image (raw, qcow2) it binds the image to /dev/nbd0 with -c, does O_DIRECT
# I/O through the block device, partitions it, makes and fills a filesystem, disconnects with -d,
# then binds it again read-only and reads the files back. Every check prints one line
# "VMTEST <server> <image> <check> ok|FAIL <detail>"; the images go back to the host on the
# second disk (a tar), with results.txt. VM_BENCH=1 (kernel command line) runs fio instead.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/usr/sbin:/sbin HOME=/tmp DENO_DIR=/denodir NO_COLOR=1
# The checkout sits at its host path, so the modules Deno compiled on the host are found.
DENBD_MAIN=$(cat /denbd-main)
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# /tmp stays part of the initramfs (already in RAM): the checkout may live under it.
mkdir -p /tmp
mkdir -p /run/lock /var /mnt /out
ln -s /run/lock /var/lock
for m in $(cat /modules/order); do insmod "/modules/$m" || echo "VMTEST - - insmod FAIL $m"; done
insmod /modules/nbd.ko nbds_max=2 max_part=8 || echo "VMTEST - - insmod FAIL nbd.ko"
mode=test
grep -q VM_BENCH=1 /proc/cmdline && mode=bench
for kv in $(cat /proc/cmdline); do
  case $kv in BENCH_SECONDS=* | BENCH_WARMUP=*) export "${kv?}" ;; esac
done
echo "=== guest up after $(cut -d' ' -f1 /proc/uptime)s, mode $mode"

cd /out
tar -xf /dev/vda || echo "VMTEST - - input FAIL tar"
DEV=/dev/nbd0
RESULTS=/out/results.txt
: > "$RESULTS"

say() { # server image check ok|FAIL detail...
  echo "VMTEST $*" | tee -a "$RESULTS"
}
check() { # server image check detail command...
  s=$1 i=$2 c=$3 d=$4
  shift 4
  if "$@" > /tmp/check.out 2>&1; then say "$s" "$i" "$c" ok "$d"; else
    say "$s" "$i" "$c" FAIL "$d: $(tr '\n' ' ' < /tmp/check.out | cut -c1-300)"
  fi
}

server_cmd() {
  case $1 in
    denbd) echo "deno run --allow-read --allow-write --allow-net --allow-ffi --allow-env --allow-run $DENBD_MAIN" ;;
    qemu-nbd) echo "qemu-nbd" ;;
  esac
}

# Wait (bounded) until the server behind $DEV (or $2) is gone after -d: its /sys/block/*/pid goes
# and no process of the server is left.
wait_gone() {
  for _ in $(seq 200); do
    [ ! -e "/sys/block/$(basename "${2:-$DEV}")/pid" ] && ! pidof "$1" > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

# The partition appears once the kernel rescans (-c does it; fdisk's write does it again).
wait_part() {
  for _ in $(seq 100); do
    [ -b ${DEV}p1 ] && return 0
    sleep 0.1
  done
  return 1
}

suite() { # server format
  s=$1 f=$2
  img=/out/$s-$f.img
  cp "/out/in/$f.img" "$img"
  cmd=$(server_cmd "$s")
  proc=$s
  [ "$s" = denbd ] && proc=deno
  t0=$(cut -d' ' -f1 /proc/uptime)
  check "$s" "$f" connect "-c returns once the device is usable" $cmd -c $DEV -f "$f" "$img"
  t1=$(cut -d' ' -f1 /proc/uptime)
  say "$s" "$f" connect-time ok "$t0 -> $t1"
  size=$(blockdev --getsize64 $DEV)
  check "$s" "$f" size "$size bytes" test "$size" = 67108864
  if [ "$s" = qemu-nbd ] && ! wait_part; then
    say "$s" "$f" partitions-seen note "no nbd0p1 after -c (qemu-nbd's rescan race); blockdev --rereadpt"
    blockdev --rereadpt $DEV
  fi
  check "$s" "$f" partitions-seen "image's own partition table" wait_part
  # O_DIRECT write and read-back of 4 MiB past the partition.
  dd if=/out/in/pattern.bin of=$DEV bs=1M seek=60 count=4 oflag=direct conv=fsync 2> /dev/null
  dd if=$DEV of=/tmp/back.bin bs=1M skip=60 count=4 iflag=direct 2> /dev/null
  check "$s" "$f" direct-io "sha256 of 4 MiB written and read with O_DIRECT" \
    cmp /out/in/pattern.bin /tmp/back.bin
  sha256sum /tmp/back.bin | cut -d' ' -f1 > "/out/$s-$f.direct.sha256"
  # A new partition table: one Linux partition of 48 MiB from 1 MiB.
  printf 'o\nn\np\n1\n2048\n+48M\nw\n' | fdisk $DEV > /tmp/fdisk.out 2>&1
  check "$s" "$f" partition "fdisk, /dev/nbd0p1 appears" wait_part
  check "$s" "$f" mkfs "mke2fs on nbd0p1" mke2fs -q ${DEV}p1
  check "$s" "$f" mount "mount nbd0p1" mount -t ext4 ${DEV}p1 /mnt
  cp -r /out/in/files /mnt/files
  sync
  check "$s" "$f" umount "umount" umount /mnt
  check "$s" "$f" disconnect "-d prints the device" sh -c "$cmd -d $DEV | grep -qx '$DEV disconnected'"
  check "$s" "$f" server-exit "the -c server exits after -d" wait_gone "$proc"
  # Second binding, read-only: the files come back.
  check "$s" "$f" reconnect "-c -r" $cmd -c $DEV -r -f "$f" "$img"
  if [ "$s" = qemu-nbd ] && ! wait_part; then
    # qemu-nbd's show_parts thread opens the device without waiting for NBD_DO_IT, so the kernel
    # may not rescan; a user then rereads the table. (denbd waits until the device is live.)
    say "$s" "$f" partition-again note "no nbd0p1 after -c (qemu-nbd's rescan race); blockdev --rereadpt"
    blockdev --rereadpt $DEV
  fi
  check "$s" "$f" partition-again "nbd0p1 after -c" wait_part
  check "$s" "$f" mount-ro "mount -o ro" mount -t ext4 -o ro ${DEV}p1 /mnt
  (cd /mnt/files && find . -type f | sort | xargs sha256sum) > "/out/$s-$f.files.sha256"
  check "$s" "$f" files-back "files read back" \
    sh -c "test -s /out/$s-$f.files.sha256 && cmp /out/in/files.sha256 /out/$s-$f.files.sha256"
  check "$s" "$f" write-refused "read-only device refuses writes" \
    sh -c "! dd if=/dev/zero of=$DEV bs=4096 count=1 oflag=direct 2>/dev/null"
  umount /mnt
  $cmd -d $DEV > /dev/null
  check "$s" "$f" server-exit-again "the -r server exits after -d" wait_gone "$proc"
}

# -v: the server stays in the foreground and prints qemu-nbd's line once connected.
verbose() { # server
  s=$1
  cmd=$(server_cmd "$s")
  proc=$s
  [ "$s" = denbd ] && proc=deno
  $cmd -v -c $DEV -f raw -r /out/in/raw.img > /tmp/v.out 2> /tmp/v.err &
  for _ in $(seq 300); do grep -q "now connected" /tmp/v.err && break; sleep 0.1; done
  check "$s" raw verbose-line "-v prints the connect line" \
    grep -qx "NBD device $DEV is now connected to /out/in/raw.img" /tmp/v.err
  $cmd -d $DEV > /dev/null
  wait
  check "$s" raw verbose-exit "-v server ends after -d" wait_gone "$proc"
  sed "s/^[a-z-]*: /SERVER: /" /tmp/v.err > "/out/$s-verbose.err"
}

# denbd's --connections: the device bound over netlink with two sockets (MULTI_CONN).
netlink() {
  s=denbd f=raw
  D=/dev/nbd1
  cmd=$(server_cmd denbd)
  cp /out/in/raw.img /tmp/nl.img
  check $s $f netlink-connect "-c --connections=2 -e 2 --dead-conn-timeout=5" \
    $cmd -c $D --connections=2 -e 2 --dead-conn-timeout=5 -f raw /tmp/nl.img
  check $s $f netlink-size "size over netlink" test "$(blockdev --getsize64 $D)" = 67108864
  check $s $f netlink-partitions "nbd1p1 after a netlink connect" sh -c "for i in \$(seq 100); do [ -b ${D}p1 ] && exit 0; sleep 0.1; done; exit 1"
  dd if=/out/in/pattern.bin of=$D bs=1M seek=60 count=4 oflag=direct conv=fsync 2> /dev/null
  dd if=$D of=/tmp/nlback.bin bs=1M skip=60 count=4 iflag=direct 2> /dev/null
  check $s $f netlink-direct-io "O_DIRECT over two connections" cmp /out/in/pattern.bin /tmp/nlback.bin
  check $s $f netlink-disconnect "-d" sh -c "$cmd -d $D | grep -qx '$D disconnected'"
  check $s $f netlink-exit "server exits after -d" wait_gone deno $D
  dd if=/tmp/nl.img of=/tmp/nlimg.bin bs=1M skip=60 count=4 2> /dev/null
  check $s $f netlink-image "the writes reached the image" cmp /out/in/pattern.bin /tmp/nlimg.bin
  rm -f /tmp/nl.img
}

bench() { # server format
  s=$1 f=$2
  img=/out/$s-$f-bench.img
  cp "/out/in/$f.img" "$img"
  cmd=$(server_cmd "$s")
  proc=$s
  [ "$s" = denbd ] && proc=deno
  $cmd -c $DEV -f "$f" "$img" || { say "$s" "$f" bench FAIL "-c"; return; }
  # Warm-up, unmeasured: under TCG a JIT (V8's, in denbd) needs a while to reach its steady state.
  fio --name=w --filename=$DEV --direct=1 --ioengine=libaio --rw=randrw --bs=4k --iodepth=32 \
    --runtime="${BENCH_WARMUP:-10}" --time_based --size=56M > /dev/null 2>&1
  for job in randread:4k:32 randwrite:4k:32 read:1m:4; do
    rw=${job%%:*} rest=${job#*:} bs=${rest%%:*} qd=${rest#*:}
    fio --name=b --filename=$DEV --direct=1 --ioengine=libaio --rw="$rw" --bs="$bs" \
      --iodepth="$qd" --runtime="${BENCH_SECONDS:-10}" --time_based --size=56M \
      --output-format=terse --terse-version=3 > /tmp/fio.out 2>&1
    # terse v3: field 8 read IOPS, 49 write IOPS, 7 read KiB/s, 48 write KiB/s
    line=$(grep '^3;' /tmp/fio.out | head -1)
    riops=$(echo "$line" | cut -d';' -f8) wiops=$(echo "$line" | cut -d';' -f49)
    rbw=$(echo "$line" | cut -d';' -f7) wbw=$(echo "$line" | cut -d';' -f48)
    say "$s" "$f" "bench-$rw-$bs-qd$qd" ok "read_iops=$riops write_iops=$wiops read_kibs=$rbw write_kibs=$wbw"
  done
  $cmd -d $DEV > /dev/null
  wait_gone "$proc" || say "$s" "$f" bench FAIL "server did not exit"
  rm -f "$img"
}

if [ $mode = test ]; then
  for s in denbd qemu-nbd; do
    for f in raw qcow2; do suite $s $f; done
    verbose $s
  done
  netlink
else
  for f in raw qcow2; do
    for s in denbd qemu-nbd; do bench $s $f; done
  done
fi
rm -rf /out/in
echo "=== guest done after $(cut -d' ' -f1 /proc/uptime)s"
tar -cf /dev/vdb -C /out . || echo "VMTEST - - output FAIL tar"
sync
poweroff -f
