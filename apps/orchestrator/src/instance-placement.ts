/**
 * Several instances of one service: a sandbox is placed on the instance serving the fewest
 * sandboxes and stays there; after a restart `learn` rebuilds the placement from their lists.
 */
export class Placement<C> {
  private readonly owner = new Map<string, number>();
  constructor(readonly clients: C[]) {}

  place(sandboxId: string): C {
    const known = this.owner.get(sandboxId);
    if (known !== undefined) return this.clients[known]!;
    const load = this.clients.map(() => 0);
    for (const i of this.owner.values()) load[i]!++;
    const index = load.indexOf(Math.min(...load));
    this.owner.set(sandboxId, index);
    return this.clients[index]!;
  }

  of(sandboxId: string): C {
    return this.clients[this.owner.get(sandboxId) ?? 0]!;
  }

  /** The instance the sandbox was placed on, if it was. */
  indexOf(sandboxId: string): number | undefined {
    return this.owner.get(sandboxId);
  }

  learn(sandboxId: string, index: number): void {
    this.owner.set(sandboxId, index);
  }

  forget(sandboxId: string): void {
    this.owner.delete(sandboxId);
  }

  counts(): number[] {
    const load = this.clients.map(() => 0);
    for (const i of this.owner.values()) load[i]!++;
    return load;
  }
}
