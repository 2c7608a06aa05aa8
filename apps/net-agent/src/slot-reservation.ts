import { TypedError } from '#service-kit';
/** A slot index held in the reservation store. */
export interface ReservedSlot {
  idx: number;
  key: string;
  /**
   * For reservations found at start: true when a previous run of an agent on this host and
   * network namespace wrote it (or the host rebooted since), so it may be cleaned up; false
   * when another live agent using the same node id elsewhere holds it.
   */
  fromPredecessor?: boolean;
}

/**
 * Who may use a slot index on this node: in memory for a single node, or Consul KV so that
 * every process reserving for the same node id agrees (DESIGN §5).
 */
export interface SlotReservation {
  readonly kind: 'memory' | 'consul';
  /** Takes a free index; SlotsExhausted when none is free, ReservationUnavailable when the store is down. */
  reserve(): Promise<ReservedSlot>;
  /** Gives an index back; only the holder's reservation is removed (delete-CAS on the read index). */
  release(slot: ReservedSlot): Promise<void>;
  /** Takes a specific index (a slot adopted at reconcile); true when it is now ours. */
  claim(idx: number): Promise<boolean>;
  /** The store key of an index. */
  keyOf(idx: number): string;
  /** Every index currently held for this node. */
  held(): Promise<ReservedSlot[]>;
  /**
   * Gives back indexes whose reservation may have landed without its answer (a timed-out
   * create read back too early); the number given back. Called before the agent stops.
   */
  settle?(): Promise<number>;
  close(): void;
}

export class SlotsExhausted extends TypedError {
  readonly code = 'SLOTS_EXHAUSTED';
  constructor(
    readonly store: string,
    readonly slotCount: number,
  ) {
    super(`no free slot index in ${store} (all ${slotCount} taken)`);
  }
}

export class ReservationUnavailable extends TypedError {
  readonly code = 'RESERVATION_UNAVAILABLE';
  constructor(
    readonly store: string,
    readonly operation: string,
    override readonly cause: unknown,
  ) {
    super(`slot reservation store ${store} unavailable during ${operation}: ${describe(cause)}`);
  }
}

export class SlotAlreadyReleased extends TypedError {
  readonly code = 'SLOT_ALREADY_RELEASED';
  constructor(
    readonly idx: number,
    readonly key: string,
  ) {
    super(`slot ${idx} (${key}) was already released`);
  }
}

export class SlotReallocated extends TypedError {
  readonly code = 'SLOT_REALLOCATED';
  constructor(
    readonly idx: number,
    readonly key: string,
  ) {
    super(`slot ${idx} (${key}) changed since it was read: someone else holds it now`);
  }
}

function describe(cause: unknown): string {
  if (cause instanceof Error) {
    const code = (cause as { code?: string }).code;
    return code ? `${cause.message} (${code})` : cause.message;
  }
  return String(cause);
}
