// Type declarations of groupcast.js, the protocol-2 client of groupcast.

/** Any JSON value: what send() publishes and what onMessage receives. */
export type Json = string | number | boolean | null | Json[] | { [key: string]: Json };

/** A group id: strings and integers name the same group (`123` is `"123"`). */
export type GroupId = string | number;

export interface Position {
  /** Opaque; a new epoch means the history behind the offsets was lost. */
  epoch: string;
  /** Offset of the last message (0 before the first). */
  offset: number;
}

export interface ConnectOptions {
  /** Connection token (JWT), sent as `?token=`; a function is asked again before each connection. */
  token?: string | (() => string | Promise<string>);
  /** Protocol version; only 2 is supported (the default). */
  protocol?: 2;
  /** WebSocket constructor; default globalThis.WebSocket (Node 20: run with --experimental-websocket). */
  WebSocket?: new (url: string) => WebSocket;
  /** Reconnect back-off in ms: full jitter under min * 2^attempt, capped at max. Default {min: 100, max: 10000}. */
  backoff?: { min?: number; max?: number };
  /** Most send() calls kept while disconnected; beyond, send() rejects with code "queue_full". Default 1000. */
  maxQueue?: number;
  /** A connection not open after this many ms is dropped and retried. Default 10000. */
  connectTimeout?: number;
}

/** A join's reply. `recovered` is present only on rejoins (with `since`). */
export interface JoinReply extends Position {
  id: number;
  ok: true;
  recovered?: boolean;
}

export interface MessageMeta {
  group: string;
  offset: number;
  epoch: string | null;
}

export type StateEvent =
  | { state: "connecting"; attempt: number }
  | { state: "open" }
  | { state: "closed"; code: number; reason: string; deliberate: boolean }
  | { state: "reconnecting"; delay: number; attempt: number };

/** The group's stream went on after `offset` of `epoch`; the messages after `from` up to it are lost. */
export interface GapEvent extends Position {
  group: string;
  /** Where the client was, or null if it had no position yet. */
  from: Position | null;
}

/** A rejoin got every missed message; the group is at this position again. */
export interface RecoveredEvent extends Position {
  group: string;
}

/**
 * A server error frame without a reply to settle (`{"error":..,"detail":..}`), a rejoin refused
 * for good (`group` set), a frame that is not JSON (`bad_frame`), or an exception thrown by a
 * handler (`handler`, `listener`).
 */
export interface ErrorEvent {
  error: string;
  detail?: string;
  group?: string;
  [key: string]: unknown;
}

export interface EventMap {
  state: StateEvent;
  recovered: RecoveredEvent;
  gap: GapEvent;
  error: ErrorEvent;
}

/** An error reply of the server (`code` is its `error`), or a local refusal: "closed", "disconnected", "queue_full", "left". */
export class GroupcastError extends Error {
  readonly code: string;
  readonly detail?: string;
  readonly reply?: unknown;
}

export interface GroupcastClient {
  /** "idle" (before the first attempt), "connecting", "open", "closed" or "reconnecting". */
  readonly state: "idle" | StateEvent["state"];
  /** Joins `group` (also while disconnected); a promise of the first join reply. */
  join(group: GroupId, onMessage: (message: Json, meta: MessageMeta) => void): Promise<JoinReply>;
  /** Leaves `group`: no more messages, no rejoin. */
  leave(group: GroupId): Promise<void>;
  /** Publishes `message`; a promise of its offset (undefined when the server cannot know it). */
  send(group: GroupId, message: Json): Promise<number | undefined>;
  /** Adds a listener; returns a function that removes it. */
  on<E extends keyof EventMap>(event: E, fn: (payload: EventMap[E]) => void): () => void;
  off<E extends keyof EventMap>(event: E, fn: (payload: EventMap[E]) => void): void;
  /** Closes for good; waiting joins and sends reject with code "closed". */
  close(): void;
}

export function connect(url: string, options?: ConnectOptions): GroupcastClient;

/** The delay before reconnect attempt `attempt` (0-based). */
export function backoffDelay(attempt: number, backoff: { min: number; max: number }, random?: () => number): number;
