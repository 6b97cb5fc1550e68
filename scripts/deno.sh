#!/usr/bin/env bash
# Runs the project's pinned Deno, installing it from npm into .deno/ on first use.
# The Deno version is pinned here and nowhere else.
set -euo pipefail
DENO_VERSION=2.9.6
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/.deno/node_modules/.bin"
if [ ! -x "$bin/deno" ] || [ "$("$bin/deno" --version 2>/dev/null | head -n 1 | cut -d' ' -f2)" != "$DENO_VERSION" ]; then
  echo "Installing Deno $DENO_VERSION from npm into .deno/ ..." >&2
  mkdir -p "$root/.deno"
  npm install --prefix "$root/.deno" --no-save --no-audit --no-fund --loglevel=error "deno@$DENO_VERSION" >&2
fi
export PATH="$bin:$PATH"
cd "$root"
exec deno "$@"
