/**
 * Running a child process the loop can always get back from: its own process group, a deadline,
 * its output live on the terminal and in log files, and a hard kill of the whole group.
 */
import { writeSync } from "node:fs";

export interface Ran {
  code: number;
  timedOut: boolean;
  /** It printed its result (`finished.when`) but did not exit in time, and was killed. */
  lingered: boolean;
  stdout: string;
  /** stdout and stderr interleaved as they arrived. */
  all: string;
  seconds: number;
  maxRss: number | null;
  /** Killed because it printed nothing for `silenceS` (a stuck download), before its deadline. */
  silent: boolean;
}

/** What a caller hears from a child: its output (log files), its pid, and the loop's own remarks. */
export interface ChildHooks {
  /** Open file descriptors that get every chunk of output. */
  logs: number[];
  /** Called with the pid (the process group) as soon as the child runs. */
  onSpawn: (pid: number) => void;
  log: (line: string) => void;
}

interface ChildOptions extends Partial<ChildHooks> {
  cwd: string;
  timeoutS: number;
  /** Copy every chunk of output to this process's stdout/stderr as it is printed. */
  echo: boolean;
  stdin?: Blob;
  env?: Record<string, string>;
  /**
   * `when` says the child has printed what the caller needs (given its stdout so far); it then has
   * `lingerS` to exit before it is killed, and its result stands.
   */
  finished?: { when: (stdout: string) => boolean; lingerS: number };
  /** Kill it after this long without a byte of output: a stall ends long before a generous deadline. */
  silenceS?: number;
}

/** SIGKILL a process group: the child runs detached, so this reaches its own children too. */
export function killGroup(pid: number): void {
  try { process.kill(-pid, "SIGKILL"); } catch { /* already gone */ }
}

/**
 * Run `argv` in its own process group. Output is read as it is printed (not after the end), so a
 * live terminal and the logs see it at once. At the deadline the whole group is SIGKILLed: a hang
 * ends as a timeout, never as a stuck loop.
 */
export async function runChild(argv: string[], o: ChildOptions): Promise<Ran> {
  const t0 = performance.now();
  const proc = Bun.spawn(argv, {
    cwd: o.cwd, stdin: o.stdin ?? "ignore", stdout: "pipe", stderr: "pipe", detached: true,
    env: { ...process.env, ...o.env },
  });
  o.onSpawn?.(proc.pid);
  let timedOut = false;
  let lingered = false;
  let lingerTimer: ReturnType<typeof setTimeout> | null = null;
  let silent = false;
  let lastOutput = t0;
  // One fixed deadline: nothing the child prints moves it.
  const timer = setInterval(() => {
    const now = performance.now();
    silent = o.silenceS !== undefined && now - lastOutput > o.silenceS * 1000;
    if (!silent && now - t0 <= o.timeoutS * 1000) return;
    timedOut = true;
    clearInterval(timer);
    killGroup(proc.pid);
  }, 100);
  let out = "";
  const all: string[] = [];
  const pump = async (stream: ReadableStream<Uint8Array>, sink: NodeJS.WriteStream, isStdout: boolean) => {
    const reader = stream.getReader();
    const dec = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done || !value) break;
      lastOutput = performance.now();
      if (o.echo) sink.write(value);
      for (const fd of o.logs ?? []) writeSync(fd, value);
      const s = dec.decode(value, { stream: true });
      all.push(s);
      if (!isStdout) continue;
      out += s;
      if (lingerTimer === null && o.finished?.when(out)) {
        lingerTimer = setTimeout(() => { lingered = true; killGroup(proc.pid); }, o.finished.lingerS * 1000);
      }
    }
  };
  const pumps = Promise.all([pump(proc.stdout, process.stdout, true), pump(proc.stderr, process.stderr, false)]);
  const code = await proc.exited;
  clearInterval(timer);
  if (lingerTimer !== null) clearTimeout(lingerTimer);
  killGroup(proc.pid); // grandchildren that outlive the command would hold the pipes open
  await Promise.race([pumps, Bun.sleep(2000)]);
  if (lingered && o.finished) {
    const what = argv.slice(1, 3).join(" ");
    o.log?.(`${what} printed its result but did not exit within ${o.finished.lingerS}s: killed it, the result stands`);
  }
  return {
    code, timedOut: timedOut && !lingered, lingered, stdout: out, all: all.join(""),
    seconds: (performance.now() - t0) / 1000, maxRss: proc.resourceUsage()?.maxRSS ?? null,
    silent: silent && timedOut && !lingered,
  };
}
