#!/usr/bin/env bash
# QEMU 7.2's own qemu-iotests against denbd (deno task test:iotests; .ci/run counts its result).
# Runs the shared harness (../shared/iotests/iotests.sh, see its header) with denbd started as
# "qemu-nbd" through scripts/bin/denbd, on the tests its baseline lists as passing with qemu-nbd
# 7.2, less the ones for features denbd does not have yet (EXPECTED_MISSING below).
# Extra arguments go to the harness (a format or suite: raw, qcow2, nbd-raw, file-qcow2, ...).
# One test at a time by default: the suite gives a server started with -nbd one second to listen
# ("sleep 1" in common.rc), and denbd under `deno run` needs ~0.15 s of CPU for that.
# Ends with the harness's "N passed, M failed, K skipped" line; exit 0 iff nothing failed.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
shared="${DENBD_SHARED:-$root/../shared}"
harness="$shared/iotests/iotests.sh"
[ -f "$harness" ] || { echo "iotests: $harness not found (set DENBD_SHARED)" >&2; echo "0 passed, 1 failed"; exit 1; }

# Tests of the baseline that need a feature denbd does not offer yet, each with the reason.
# (none since TLS landed; keep the mechanism for the next feature)
EXPECTED_MISSING=()

# Paths must not contain "raw" or "qcow2": the suite's output filters rewrite those words.
work="${IOTESTS_WORK:-${TMPDIR:-/tmp}/denbd-iotests}"
mkdir -p "$work/bin"
ln -sf "$root/scripts/bin/denbd" "$work/bin/qemu-nbd"
bash "$root/scripts/deno.sh" --version >/dev/null || exit 1
# Warm Deno's module cache once, so the first test does not pay for it.
"$work/bin/qemu-nbd" --version >/dev/null

baseline="$work/baseline.txt"
skip_re=""
for m in "${EXPECTED_MISSING[@]}"; do
  t=${m%%:*}
  echo "iotests: not run: $t (${m#*:}: not supported yet)" >&2
  skip_re+="${skip_re:+|}$t"
done
if [ -n "$skip_re" ]; then
  grep -Ev "^(${skip_re})([[:space:]]|$)" "$shared/iotests/iotests-baseline.txt" > "$baseline"
else
  cp "$shared/iotests/iotests-baseline.txt" "$baseline"
fi

IOTESTS_WORK="$work" IOTESTS_BASELINE="${IOTESTS_BASELINE:-$baseline}" \
  IOTESTS_TEST_TIMEOUT="${IOTESTS_TEST_TIMEOUT:-120}" IOTESTS_JOBS="${IOTESTS_JOBS:-1}" \
  bash "$harness" "$work/bin/qemu-nbd" "$@"
