/** How loop.ts ends: its exit codes, and the error that carries one up from deep inside a phase. */

export const EXIT = { ok: 0, error: 1, refused: 2, paused: 3, aborted: 130 } as const;

/** Ends the loop with an exit code and a message (empty: nothing more to say); caught in loop.ts's main. */
export class Stop extends Error {
  constructor(readonly code: number, message: string) { super(message); }
}
