/**
 * The permission flags that cannot import lib/permissions.ts -- the deno.json tasks, the
 * scripts/bin/denbd wrapper, the usage comment of scripts/http_bench.ts and the README -- must
 * spell exactly {@linkcode DENBD_PERMISSIONS}, in its order. main.ts may still spell them out
 * until it imports the module; while it does, its list must match too.
 */

import assert from "node:assert/strict";
import { DENBD_PERMISSIONS } from "../../lib/permissions.ts";

const ROOT = decodeURIComponent(new URL("../../", import.meta.url).pathname);

/**
 * Every run of permission flags in `text`: flags (`--allow-*`, `--deny-*`, `-A`, `--allow-all`)
 * separated only by blanks, quotes, commas and line continuations form one run.
 */
function flagRuns(text: string): string[][] {
  const flag = String.raw`(?:--(?:allow|deny)-[a-z-]+(?:=[^\s"',\\]*)?|-A(?![\w-]))`;
  const sep = String.raw`["'\s,\\]*`;
  const runs: string[][] = [];
  for (const m of text.matchAll(new RegExp(`${flag}(?:${sep}${flag})*`, "g"))) {
    runs.push([...m[0].matchAll(new RegExp(flag, "g"))].map((f) => f[0]));
  }
  return runs;
}

Deno.test("permissions: the module's list is the documented set", () => {
  assert.deepEqual([...DENBD_PERMISSIONS], [
    "--allow-read",
    "--allow-write",
    "--allow-net",
    "--allow-ffi",
    "--allow-env",
    "--allow-run",
  ]);
  assert.ok(Object.isFrozen(DENBD_PERMISSIONS));
});

Deno.test("permissions: flagRuns finds each run of flags apart", () => {
  assert.deepEqual(
    flagRuns(`deno run --allow-read  "--allow-net", \\\n --allow-env x.ts; deno run -A y.ts`),
    [["--allow-read", "--allow-net", "--allow-env"], ["-A"]],
  );
  assert.deepEqual(flagRuns(`qemu-nbd -r -A -t`), [["-A"]]);
  assert.deepEqual(flagRuns(`no flags -All here`), []);
});

Deno.test("permissions: every deno.json task that runs denbd's code grants exactly the list", async () => {
  const tasks = JSON.parse(await Deno.readTextFile(`${ROOT}deno.json`)).tasks as Record<
    string,
    string
  >;
  let checked = 0;
  for (const [name, cmd] of Object.entries(tasks)) {
    if (!/\bdeno (run|test|compile)\b/.test(cmd)) continue;
    checked++;
    assert.deepEqual(flagRuns(cmd), [[...DENBD_PERMISSIONS]], `deno task ${name}: ${cmd}`);
  }
  // start, demo, test, bench and compile today.
  assert.ok(checked >= 5, `only ${checked} deno.json tasks run deno`);
});

for (
  const [file, required] of [
    ["scripts/bin/denbd", true],
    ["scripts/http_bench.ts", true],
    ["README.md", true],
    ["main.ts", false],
  ] as const
) {
  Deno.test(`permissions: ${file} spells exactly the list`, async () => {
    // A lone flag is prose ("`--allow-run` is for `--fork`"); two or more in a row are a list.
    const runs = flagRuns(await Deno.readTextFile(`${ROOT}${file}`)).filter((r) => r.length > 1);
    if (required) assert.ok(runs.length > 0, `${file} lists no permission flags any more`);
    for (const r of runs) assert.deepEqual(r, [...DENBD_PERMISSIONS], `${file}: ${r.join(" ")}`);
  });
}
