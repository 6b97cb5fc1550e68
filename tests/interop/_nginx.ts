/**
 * Starts Debian's nginx (/usr/sbin/nginx) on loopback for tests and benchmarks: a private config,
 * pid, logs and temp paths inside one directory, `daemon off`, serving that directory over http
 * and (optionally) https with a fresh self-signed certificate.
 *
 * Locations besides `/` (all aliases of the root):
 * - `/norange/`: no byte ranges (`max_ranges 0`: no `Accept-Ranges`, ranges ignored);
 * - `/slow/`: responses limited to `slowRate` bytes/s after the first 64 KiB, to catch a
 *   transfer in the middle.
 *
 * ```ts
 * const ngx = await startNginx({ root: dir, tls: true });
 * try { fetch(ngx.url("/disk.img")); } finally { await ngx.stop(); }
 * ```
 *
 * @module
 */

const NGINX = "/usr/sbin/nginx";
const OPENSSL = "/usr/bin/openssl";

/** What to serve and how. */
export interface NginxOptions {
  /** Directory served at `/`; config, logs and certificate go in a private directory inside. */
  readonly root: string;
  /** Also listen with TLS (self-signed certificate for 127.0.0.1). */
  readonly tls?: boolean;
  /** Worker processes (default 1; "auto" = one per CPU). */
  readonly workers?: number | "auto";
  /** Bytes per second for `/slow/` (default 256 KiB/s). */
  readonly slowRate?: number;
}

/** A running nginx. */
export interface Nginx {
  readonly port: number;
  /** 0 without `tls`. */
  readonly tlsPort: number;
  /** `http://127.0.0.1:PORT` + path. */
  url(path: string): string;
  /** `https://127.0.0.1:TLSPORT` + path. */
  tlsUrl(path: string): string;
  /** The access log so far (`$request $status $body_bytes_sent` per line). */
  accessLog(): Promise<string[]>;
  /** Stops nginx (SIGTERM: active connections are cut), then waits for it. */
  stop(): Promise<void>;
  /** Starts it again on the same ports after {@link stop}. */
  restart(): Promise<void>;
}

/** A loopback TCP port that was free a moment ago. */
export function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

async function run(cmd: string, args: string[]): Promise<void> {
  const out = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  if (!out.success) {
    throw new Error(`${cmd} ${args.join(" ")} failed: ${new TextDecoder().decode(out.stderr)}`);
  }
}

/** A self-signed certificate for 127.0.0.1 (EC P-256: quick to make). */
export async function makeSelfSignedCert(dir: string): Promise<{ cert: string; key: string }> {
  const cert = `${dir}/cert.pem`, key = `${dir}/key.pem`;
  await run(OPENSSL, [
    "req",
    "-x509",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
    "-keyout",
    key,
    "-out",
    cert,
    "-days",
    "2",
    "-subj",
    "/CN=127.0.0.1",
    "-addext",
    "subjectAltName=IP:127.0.0.1",
  ]);
  return { cert, key };
}

/**
 * True when nginx's workers would drop to "nobody" and lose access to the (0700) temp dirs: we
 * run as root, seen from the owner of a file we just made (Deno.uid() needs --allow-sys and
 * /proc/self needs --allow-all, which the tests do not grant).
 */
function ownedByRoot(path: string): boolean {
  return Deno.statSync(path).uid === 0;
}

function config(
  o: NginxOptions,
  conf: string,
  port: number,
  tlsPort: number,
  cert?: { cert: string; key: string },
): string {
  const root = o.root.replace(/\/$/, "");
  const isRoot = ownedByRoot(conf);
  const locations = `
    root ${root};
    location /norange/ { alias ${root}/; max_ranges 0; }
    location /slow/ { alias ${root}/; limit_rate_after 64k; limit_rate ${o.slowRate ?? 262144}; }`;
  return `daemon off;
${isRoot ? "user root;" : ""}
worker_processes ${o.workers ?? 1};
pid ${conf}/nginx.pid;
error_log ${conf}/error.log;
events { worker_connections 512; }
http {
  log_format tiny '$request $status $body_bytes_sent';
  access_log ${conf}/access.log tiny;
  client_body_temp_path ${conf}/body;
  proxy_temp_path ${conf}/proxy;
  fastcgi_temp_path ${conf}/fastcgi;
  uwsgi_temp_path ${conf}/uwsgi;
  scgi_temp_path ${conf}/scgi;
  default_type application/octet-stream;
  sendfile on;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:${port};${locations}
  }
${
    cert === undefined ? "" : `  server {
    listen 127.0.0.1:${tlsPort} ssl;
    ssl_certificate ${cert.cert};
    ssl_certificate_key ${cert.key};${locations}
  }
`
  }}
`;
}

async function waitListening(port: number, child: Deno.ChildProcess, done: Promise<unknown>) {
  let exited = false;
  done.then(() => exited = true);
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    if (exited) return false;
    try {
      const c = await Deno.connect({ hostname: "127.0.0.1", port });
      c.close();
      return true;
    } catch {
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  child.kill("SIGKILL");
  throw new Error(`nginx did not listen on ${port} within 10 s`);
}

/** Starts nginx serving `opts.root`; callers put `stop()` in `finally`. */
export async function startNginx(opts: NginxOptions): Promise<Nginx> {
  const conf = await Deno.makeTempDir({ dir: opts.root, prefix: ".nginx-" });
  const cert = opts.tls ? await makeSelfSignedCert(conf) : undefined;
  let port = 0, tlsPort = 0;
  let child: Deno.ChildProcess | undefined;
  let status: Promise<Deno.CommandStatus> | undefined;
  let stderr: Promise<string> | undefined;

  const launch = async (): Promise<boolean> => {
    await Deno.writeTextFile(`${conf}/nginx.conf`, config(opts, conf, port, tlsPort, cert));
    child = new Deno.Command(NGINX, {
      args: ["-c", `${conf}/nginx.conf`, "-p", conf, "-e", `${conf}/error.log`],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    stderr = new Response(child.stderr).text();
    status = child.status;
    if (await waitListening(port, child, status)) {
      if (tlsPort !== 0 && !(await waitListening(tlsPort, child, status))) return false;
      return true;
    }
    await status;
    return false;
  };

  // A free port can be taken between the probe and nginx's bind: a few fresh tries.
  for (let attempt = 0;; attempt++) {
    port = freePort();
    tlsPort = opts.tls ? freePort() : 0;
    if (await launch()) break;
    const err = await stderr;
    if (attempt >= 4) throw new Error(`nginx failed to start: ${err}`);
  }

  const stop = async () => {
    if (child === undefined) return;
    const c = child;
    child = undefined;
    try {
      c.kill("SIGTERM");
    } catch { /* already gone */ }
    const timer = setTimeout(() => {
      try {
        c.kill("SIGKILL");
      } catch { /* gone */ }
    }, 5000);
    await status;
    await stderr;
    clearTimeout(timer);
  };

  return {
    port,
    tlsPort,
    url: (p) => `http://127.0.0.1:${port}${p}`,
    tlsUrl: (p) => `https://127.0.0.1:${tlsPort}${p}`,
    accessLog: async () => {
      try {
        return (await Deno.readTextFile(`${conf}/access.log`)).split("\n").filter((l) => l !== "");
      } catch {
        return [];
      }
    },
    stop,
    restart: async () => {
      if (child !== undefined) return;
      if (!(await launch())) throw new Error(`nginx failed to restart: ${await stderr}`);
    },
  };
}
