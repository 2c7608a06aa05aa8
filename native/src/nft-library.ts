import { createRequire } from 'node:module';

/**
 * nftables through libnftables (the library behind the `nft` command) loaded with koffi: one
 * transaction per call like `nft -f`, without a process per slot.
 *
 * A context opens its netlink socket when it is created, and that socket stays bound to the
 * network namespace of the thread at that moment; so a context made inside NetnsSwitch.run
 * programs that slot's namespace even though the transaction itself runs later on a worker
 * thread (koffi's async call), where its wait for the kernel's commit does not block the
 * event loop and several namespaces commit in parallel.
 */
type Fn = ((...args: unknown[]) => unknown) & {
  async: (...args: unknown[]) => void;
};

interface Bindings {
  ctxNew: Fn;
  ctxFree: Fn;
  bufferError: Fn;
  bufferOutput: Fn;
  errorBuffer: Fn;
  run: Fn;
}

export class NftFailed extends Error {
  readonly code = 'NFT_FAILED';
  constructor(
    readonly where: string,
    readonly detail: string,
  ) {
    super(`nft in ${where} failed: ${detail.trim().slice(0, 2000)}`);
    this.name = 'NftFailed';
  }
}

export class NftContext {
  private freed = false;

  constructor(
    private readonly lib: Bindings,
    private readonly ctx: unknown,
    private readonly where: string,
  ) {}

  /** Runs one ruleset text as a single transaction, then frees the context. */
  run(text: string): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.lib.run.async(this.ctx, text, (err: unknown, rc: number) => {
        const detail = err ? String(err) : rc !== 0 ? String(this.lib.errorBuffer(this.ctx) ?? '') : '';
        this.free();
        if (err || rc !== 0) reject(new NftFailed(this.where, detail || `exit ${rc}`));
        else resolve();
      });
    });
  }

  free(): void {
    if (this.freed) return;
    this.freed = true;
    this.lib.ctxFree(this.ctx);
  }
}

export class NftLibrary {
  private constructor(private readonly lib: Bindings) {}

  /** undefined when libnftables cannot be loaded (then the `nft` command is used). */
  static load(): NftLibrary | undefined {
    try {
      const require = createRequire(import.meta.url);
      const koffi = require('koffi') as { load(name: string): { func(signature: string): Fn } };
      const l = koffi.load('libnftables.so.1');
      return new NftLibrary({
        ctxNew: l.func('void *nft_ctx_new(uint32_t flags)'),
        ctxFree: l.func('void nft_ctx_free(void *ctx)'),
        bufferError: l.func('int nft_ctx_buffer_error(void *ctx)'),
        bufferOutput: l.func('int nft_ctx_buffer_output(void *ctx)'),
        errorBuffer: l.func('const char *nft_ctx_get_error_buffer(void *ctx)'),
        run: l.func('int nft_run_cmd_from_buffer(void *ctx, const char *buf)'),
      });
    } catch {
      return undefined;
    }
  }

  /** A context bound to the calling thread's current network namespace. */
  context(where: string): NftContext {
    const ctx = this.lib.ctxNew(0);
    if (!ctx) throw new NftFailed(where, 'nft_ctx_new returned NULL');
    // Errors and output go to buffers we read, not to the agent's stdout/stderr.
    this.lib.bufferError(ctx);
    this.lib.bufferOutput(ctx);
    return new NftContext(this.lib, ctx, where);
  }
}
