/**
 * A real redis-server for the queue tests (and bench/queue.ts): on 127.0.0.1, on a free port, with
 * its append-only file in a temp folder so that a restart keeps the jobs (as a night's Redis should).
 * `redisMissing()` says why there is none (the tests then skip loudly).
 */
import { rmSync } from "node:fs";
import { tempDir } from "./helpers.ts";

export interface RedisServer {
  port: number;
  url: string;
  /** Stop it (SIGTERM: it writes its data first). */
  stop: () => Promise<void>;
  /** Stop it and start it again on the same port and data. */
  restart: () => Promise<void>;
  /** `redis-cli` on it: FLUSHALL between tests, for instance. */
  cli: (...args: string[]) => string;
  /** Remove its data folder (after stop). */
  cleanup: () => void;
}

export function redisMissing(): string | null {
  for (const tool of ["redis-server", "redis-cli"]) {
    if (Bun.which(tool) === null) return `${tool} is not installed (apt-get install -y redis-server)`;
  }
  return null;
}

function freePort(): number {
  const s = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = s.port;
  s.stop(true);
  return port;
}

export async function startRedis(): Promise<RedisServer> {
  const port = freePort();
  const dir = tempDir("arv-redis-");
  let proc: ReturnType<typeof Bun.spawn> | null = null;
  const cli = (...args: string[]) => {
    const r = Bun.spawnSync(["redis-cli", "-p", String(port), ...args], { stdout: "pipe", stderr: "pipe" });
    return r.stdout.toString().trim();
  };
  const start = async () => {
    proc = Bun.spawn(["redis-server", "--port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--save", "",
      "--appendonly", "yes", "--appendfsync", "always"], { stdout: "ignore", stderr: "ignore" });
    for (let i = 0; i < 100; i++) {
      if (cli("ping") === "PONG") return;
      await Bun.sleep(100);
    }
    throw new Error(`redis-server on port ${port} did not answer PING within 10 s`);
  };
  const stop = async () => {
    if (!proc) return;
    proc.kill("SIGTERM");
    await proc.exited;
    proc = null;
  };
  await start();
  return {
    port, url: `redis://127.0.0.1:${port}`, cli, stop,
    restart: async () => { await stop(); await start(); },
    cleanup: () => rmSync(dir, { recursive: true, force: true }),
  };
}
