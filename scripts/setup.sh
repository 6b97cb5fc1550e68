#!/usr/bin/env bash
# Installs what the test suite needs, only when missing: Deno (from npm, version pinned in
# package.json) and the real NBD peers from Debian. Prints exactly what it could not install.
set -euo pipefail
cd "$(dirname "$0")/.."

# Installs the pinned Deno into .deno/ when missing.
bash scripts/deno.sh --version >/dev/null

need=()
command -v qemu-nbd >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need+=(python3-libnbd)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v fio >/dev/null || need+=(fio)
# QEMU's iotests (deno task test:iotests) start qemu-system and qemu-storage-daemon; 233 needs certtool.
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v certtool >/dev/null || need+=(gnutls-bin)
# The http(s) driver is tested against a real HTTP server and compared with qemu's curl driver.
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
[ -e /usr/lib/x86_64-linux-gnu/qemu/block-curl.so ] || need+=(qemu-block-extra)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${need[*]} with apt-get"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "setup: missing Debian packages: ${need[*]}" >&2
    echo "setup: install them with: sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
fi
