/**
 * A sandbox's state file written behind a create instead of in its way. The saves during a
 * create only help a restarted orchestrator find what a half-created sandbox took, and the
 * restart reconciler finds those orphans by asking the services anyway; so each save starts
 * after the one before (they share a temporary file), the create goes on meanwhile, and `flush`
 * waits for all of them and throws the first failure. The save that matters (the sandbox is
 * running, queued as the VM's last steps start) is awaited through `flush` before the create
 * answers.
 */
export class BackgroundSaves {
  private chain: Promise<void> = Promise.resolve();
  private failure: { error: unknown } | undefined;
  /** A save is queued and not started: it will write the state as it is then, so no second one. */
  private queued = false;

  /** `save` writes the state as it is when it runs (so a later save covers an earlier one). */
  constructor(private readonly save: () => Promise<void>) {}

  /** Queues a save; returns at once. */
  soon(): void {
    if (this.queued) return;
    this.queued = true;
    this.chain = this.chain
      .then(() => {
        this.queued = false;
        return this.failure ? undefined : this.save();
      })
      .catch((error: unknown) => {
        this.failure ??= { error };
      });
  }

  /** Waits for every queued save; throws the first failure. */
  async flush(): Promise<void> {
    await this.chain;
    if (this.failure) throw this.failure.error;
  }

  /** Waits for every queued save, failed or not (before the sandbox's files are removed). */
  async settled(): Promise<void> {
    await this.chain;
  }
}
