import { closeSync, fstatSync, openSync, readFileSync } from 'node:fs';
import { Socket } from 'node:net';
import type { Worker } from 'node:worker_threads';
import {
  MAP_ANONYMOUS,
  MAP_HUGETLB,
  MAP_NORESERVE,
  MAP_PRIVATE,
  MAP_SHARED,
  MFD_CLOEXEC,
  MFD_HUGETLB,
  PROT_READ,
  PROT_WRITE,
  PageCategory,
  UFFDIO_REGISTER_MODE_MISSING,
  UFFDIO_REGISTER_MODE_WP,
  UffdFeature,
  close as closeFd,
  dialUnix,
  ftruncate,
  kernelUffdFeatures,
  memfdCreate,
  mmap,
  munmap,
  pagemapScan,
  sendWithFds,
  uffdApi,
  uffdFeaturesOfFd,
  uffdRegister,
  userfaultfd,
} from '#native';
import type { Logger } from '#logging';
import { encodeHandshake, parseHandshake, type GuestRegion } from '#uffd';
import { VmmFailure, osErrorText } from './api-error.js';
import { takeVcpuWorker } from './spare-vcpu.js';
import type { VcpuReply, VcpuRequest } from './vcpu-protocol.js';

/**
 * Write-protect on the uffd the VMM hands over. Upstream Firecracker (v1.16) negotiates only
 * UFFD_FEATURE_EVENT_REMOVE and registers MISSING only: `off`. E2B's Firecracker fork asks for
 * write-protect so the uffd handler can track writes: `async` (WP_ASYNC where the kernel has it)
 * or `sync`.
 */
export type WriteProtectMode = 'async' | 'sync' | 'off';

/** Where Firecracker v1.16 wrote during `PUT /snapshot/load` on this machine (before answering). */
export const LOAD_WRITE_OFFSET = 0xdf000;

/**
 * How the handshake spells the page size: Firecracker 1.x sends both `page_size` and the
 * deprecated `page_size_kib` (bytes, despite the name); older releases only the latter.
 */
export type PageSizeSpelling = 'both' | 'page_size' | 'page_size_kib';

export type MemoryBacking =
  /** Snapshot load with the Uffd backend: empty memory, every first touch is a fault served by the peer. */
  | {
      kind: 'uffd';
      socketPath: string;
      shareMemfd: boolean;
      writeProtect: WriteProtectMode;
      pageSizeSpelling: PageSizeSpelling;
    }
  /** Snapshot load with the File backend: the memory file mapped privately. */
  | { kind: 'file'; path: string }
  /** Cold boot: fresh memory the boot image is written into. */
  | { kind: 'boot'; shareMemfd: boolean };

export interface GuestMemoryOptions {
  sizeBytes: number;
  pageSize: number;
  backing: MemoryBacking;
  trackDirtyPages: boolean;
  logger: Logger;
}

/**
 * Guest memory of one microVM: the mapping, the userfaultfd registered over it and handed to
 * the uffd-server (Firecracker's `guest_memory_from_uffd`), the optional memfd behind it, and
 * the vCPU thread that reads and writes it. Every resource is released by `close`, also after
 * a failure half-way through `open`.
 */
export class GuestMemory {
  /**
   * vCPU threads that could not be stopped (frozen in a fault nobody serves). Node joins worker
   * threads on exit and that join would never return, so the process must end without it.
   */
  static frozenVcpus = 0;
  /** Pages written since load or the last diff snapshot (Firecracker's dirty log), when tracking. */
  readonly dirty: Uint8Array | undefined;
  uffdFeatures = 0;
  registerMode = 0;
  private uffd = -1;
  private memfd = -1;
  private handshake: Socket | undefined;
  private worker: Worker | undefined;
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private address = 0;
  private closed = false;
  private workerError: Error | undefined;

  private constructor(
    readonly size: number,
    readonly pageSize: number,
    private readonly logger: Logger,
    trackDirty: boolean,
  ) {
    this.dirty = trackDirty ? new Uint8Array(Math.ceil(size / pageSize)) : undefined;
  }

  static async open(options: GuestMemoryOptions): Promise<GuestMemory> {
    const { sizeBytes, pageSize, backing } = options;
    if (sizeBytes <= 0 || sizeBytes % pageSize !== 0) {
      throw new VmmFailure('MEMORY_SIZE', `memory size ${sizeBytes} is not a positive multiple of ${pageSize}`);
    }
    const memory = new GuestMemory(sizeBytes, pageSize, options.logger, options.trackDirtyPages);
    try {
      memory.map(backing);
      if (backing.kind === 'uffd') memory.handOver(backing);
      await memory.startVcpu();
    } catch (err) {
      await memory.close();
      throw err;
    }
    return memory;
  }

  private map(backing: MemoryBacking): void {
    const huge = this.pageSize !== 4096;
    const prot = PROT_READ | PROT_WRITE;
    if (backing.kind === 'file') {
      let fd: number;
      try {
        fd = openSync(backing.path, 'r');
      } catch (err) {
        throw new VmmFailure('MEMORY_FILE', `Failed to load guest memory: ${osErrorText(err)}`, { path: backing.path });
      }
      try {
        const fileSize = fstatSync(fd).size;
        // Touching a private file mapping past EOF is SIGBUS: refuse a short file up front.
        if (fileSize < this.size) {
          throw new VmmFailure(
            'MEMORY_FILE',
            `Failed to load guest memory: memory file ${backing.path} has ${fileSize} bytes, the snapshot needs ${this.size}`,
            { path: backing.path, fileSize, needed: this.size },
          );
        }
        this.address = mmap(0, this.size, prot, MAP_PRIVATE | MAP_NORESERVE, fd, 0);
      } finally {
        closeSync(fd);
      }
      return;
    }
    if (backing.shareMemfd) {
      this.memfd = memfdCreate('guest_mem', MFD_CLOEXEC | (huge ? MFD_HUGETLB : 0));
      ftruncate(this.memfd, this.size);
      this.address = mmap(0, this.size, prot, MAP_SHARED | MAP_NORESERVE, this.memfd, 0);
    } else {
      this.address = mmap(0, this.size, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (huge ? MAP_HUGETLB : 0));
    }
  }

  /**
   * Creates the userfaultfd as the VMM does, registers the whole mapping, connects to the
   * uffd-server and sends the regions as JSON with the uffd (and the memfd) as SCM_RIGHTS. The
   * connection stays open for the VMM's lifetime: its end is how the uffd-server learns the VMM
   * is gone. Upstream Firecracker (persist.rs `guest_memory_from_uffd`) asks for EVENT_REMOVE
   * only and registers MISSING only, whatever the memory (hugetlbfs and shmem need no feature
   * bit for missing faults). The E2B fork's write-protect adds PAGEFAULT_FLAG_WP (+ WP_ASYNC,
   * + WP_HUGETLBFS_SHMEM) and registers MODE_WP too.
   */
  private handOver(backing: Extract<MemoryBacking, { kind: 'uffd' }>): void {
    const offered = kernelUffdFeatures();
    const shmem = this.memfd >= 0;
    let want = UffdFeature.EVENT_REMOVE;
    const wpPossible =
      (offered & UffdFeature.PAGEFAULT_FLAG_WP) !== 0 &&
      (!shmem && this.pageSize === 4096 ? true : (offered & UffdFeature.WP_HUGETLBFS_SHMEM) !== 0);
    let wp = false;
    if (backing.writeProtect !== 'off') {
      if (!wpPossible) {
        throw new VmmFailure(
          'UFFD_WP_UNSUPPORTED',
          `Failed to restore from snapshot: Failed to load guest memory: Error creating guest memory from uffd: the kernel offers no userfaultfd write-protect for this memory (features 0x${offered.toString(16)})`,
        );
      }
      wp = true;
      want |= UffdFeature.PAGEFAULT_FLAG_WP;
      if (shmem || this.pageSize !== 4096) want |= UffdFeature.WP_HUGETLBFS_SHMEM;
      if (this.pageSize !== 4096) want |= UffdFeature.MISSING_HUGETLBFS;
      if (shmem) want |= UffdFeature.MISSING_SHMEM;
      if (backing.writeProtect === 'async' && (offered & UffdFeature.WP_ASYNC) !== 0) want |= UffdFeature.WP_ASYNC;
    }
    this.uffd = userfaultfd();
    // Upstream asks for exactly its feature (a kernel without it fails the load, as in
    // Firecracker); the fork's optional bits are taken where offered.
    uffdApi(this.uffd, wp ? want & offered : want);
    // UFFDIO_API answers with everything the kernel supports; fdinfo shows what this fd got
    // (bit 31 is the kernel's internal "initialized" flag).
    this.uffdFeatures = uffdFeaturesOfFd(this.uffd) & 0x7fffffff;
    this.registerMode = UFFDIO_REGISTER_MODE_MISSING | (wp ? UFFDIO_REGISTER_MODE_WP : 0);
    uffdRegister(this.uffd, this.address, this.size, this.registerMode);
    const regions: GuestRegion[] = [{ base: this.address, size: this.size, offset: 0, pageSize: this.pageSize }];
    const payload = handshakePayload(regions, backing.pageSizeSpelling);
    const fds = shmem ? [this.uffd, this.memfd] : [this.uffd];
    // What we send must be what the uffd-server's codec accepts (libs/uffd).
    parseHandshake(payload, { fdCount: fds.length, memorySize: this.size });
    let sock: number;
    try {
      sock = dialUnix(backing.socketPath);
    } catch (err) {
      throw new VmmFailure(
        'UFFD_CONNECT',
        `Failed to restore from snapshot: Failed to load guest memory: Error creating guest memory from uffd: Failed to connect to UDS Unix stream: ${(err as Error).message}`,
        { socketPath: backing.socketPath },
      );
    }
    try {
      sendWithFds(sock, payload, fds);
    } catch (err) {
      closeFd(sock);
      throw new VmmFailure(
        'UFFD_SEND',
        `Failed to restore from snapshot: Failed to load guest memory: Error creating guest memory from uffd: Failed to sends file descriptor: ${(err as Error).message}`,
      );
    }
    const socket = new Socket({ fd: sock, readable: true, writable: false });
    socket.on('data', () => undefined);
    socket.on('error', () => undefined);
    socket.on('end', () => {
      if (!this.closed) this.logger.warn({ socketPath: backing.socketPath }, 'uffd-server closed the handshake socket');
    });
    this.handshake = socket;
    this.logger.info(
      {
        socketPath: backing.socketPath,
        regions,
        memfd: shmem,
        uffdFeatures: `0x${this.uffdFeatures.toString(16)}`,
        writeProtect: wp ? ((this.uffdFeatures & UffdFeature.WP_ASYNC) !== 0 ? 'async' : 'sync') : 'off',
      },
      'uffd handed over',
    );
  }

  /** Takes the vCPU thread (started ahead when the VMM waited: spare-vcpu.ts) and gives it the mapping. */
  private startVcpu(): Promise<void> {
    const worker = takeVcpuWorker();
    worker.on('message', (reply: VcpuReply) => {
      const waiter = this.waiting.get(reply.id);
      if (!waiter) return;
      this.waiting.delete(reply.id);
      if (reply.ok) waiter.resolve(reply.result);
      else waiter.reject(new VmmFailure('GUEST_MEMORY', reply.error));
    });
    worker.on('error', (err) => {
      this.workerError = err;
      for (const w of this.waiting.values()) w.reject(err);
      this.waiting.clear();
    });
    this.worker = worker;
    return this.call<void>({ op: 'attach', address: this.address, size: this.size, pageSize: this.pageSize });
  }

  private call<T>(request: DistributiveOmit<VcpuRequest, 'id'>, transfer: ArrayBuffer[] = []): Promise<T> {
    if (this.closed || !this.worker)
      return Promise.reject(new VmmFailure('GUEST_MEMORY_CLOSED', 'guest memory is closed'));
    if (this.workerError) return Promise.reject(this.workerError);
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.waiting.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.worker?.postMessage({ ...request, id }, transfer);
    });
  }

  private markDirty(offset: number, length: number): void {
    if (!this.dirty || length === 0) return;
    const first = Math.floor(offset / this.pageSize);
    const last = Math.floor((offset + length - 1) / this.pageSize);
    this.dirty.fill(1, first, Math.min(last + 1, this.dirty.length));
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new RangeError(`bad guest memory range offset ${offset} length ${length}`);
    }
    if (offset + length > this.size) {
      throw new RangeError(`guest memory range [${offset}, ${offset + length}) past the end (${this.size} bytes)`);
    }
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.checkRange(offset, data.length);
    const copy = new Uint8Array(data);
    await this.call({ op: 'write', offset, data: copy }, [copy.buffer]);
    this.markDirty(offset, data.length);
  }

  async fill(offset: number, length: number, pattern: Uint8Array): Promise<void> {
    this.checkRange(offset, length);
    await this.call({ op: 'fill', offset, length, pattern });
    this.markDirty(offset, length);
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    this.checkRange(offset, length);
    return this.call<Uint8Array>({ op: 'read', offset, length });
  }

  async hash(offset: number, length: number): Promise<string> {
    this.checkRange(offset, length);
    return this.call<string>({ op: 'hash', offset, length });
  }

  /**
   * Loads one byte of every page of `runs` (`[offset, length]`, in order) on the vCPU thread:
   * missing pages fault in as a guest's would. Returns the pages loaded and a checksum of the
   * loaded bytes (h = h * 31 + byte, in order, mod 2^32).
   */
  async touchRuns(runs: [number, number][]): Promise<{ pages: number; checksum: number }> {
    for (const [offset, length] of runs) this.checkRange(offset, length);
    return this.call<{ pages: number; checksum: number }>({ op: 'touch-runs', runs });
  }

  /** Writes the cold-boot image and counts every page as written, as a boot would. */
  async boot(seed: number): Promise<void> {
    await this.call({ op: 'boot', seed });
    this.markDirty(0, this.size);
  }

  /**
   * The write Firecracker makes to guest memory while it restores a snapshot, before
   * `PUT /snapshot/load` answers (v1.16.1 on this machine wrote near guest 0xdf000): the page
   * must be served through the uffd first, so a load with nobody serving faults never answers.
   * The byte is written back as it was read, so snapshots stay byte-exact; like any write by
   * the VMM it is in the dirty log.
   */
  async restoreWrite(): Promise<void> {
    const offset = Math.min(LOAD_WRITE_OFFSET, this.size - 1);
    await this.call({ op: 'rewrite', offset });
    this.markDirty(offset, 1);
  }

  /**
   * The memory file of a snapshot. Full: all of guest memory, faulting in whatever is not
   * present yet. Diff: with dirty tracking, the pages written since load (or since the last
   * snapshot: KVM's dirty log); without, every page present in memory (Firecracker ≥ 1.13
   * asks mincore(2); PAGEMAP_SCAN's PRESENT gives the same pages for our mappings). A Diff is
   * laid over the file if it exists. Both restart the dirty log, as Firecracker does.
   */
  async dump(path: string, type: 'Full' | 'Diff'): Promise<number> {
    if (type === 'Full') {
      const written = await this.call<number>({ op: 'dump', path, ranges: [[0, this.size]], merge: false });
      this.dirty?.fill(0);
      return written;
    }
    const ranges: [number, number][] = [];
    const add = (start: number, length: number) => {
      const last = ranges[ranges.length - 1];
      if (last && last[0] + last[1] === start) last[1] += length;
      else ranges.push([start, length]);
    };
    if (this.dirty) {
      for (let page = 0; page < this.dirty.length; page++)
        if (this.dirty[page]) add(page * this.pageSize, this.pageSize);
    } else {
      for (const r of this.presentRanges()) add(r.start, r.end - r.start);
    }
    const written = await this.call<number>({ op: 'dump', path, ranges, merge: true });
    this.dirty?.fill(0);
    return written;
  }

  /** Offsets of the guest pages present in this process (faulted in, copied in or written). */
  presentRanges(): { start: number; end: number }[] {
    const fd = openSync('/proc/self/pagemap', 'r');
    try {
      return pagemapScan(fd, this.address, this.address + this.size, {
        categoryMask: PageCategory.PRESENT,
        returnMask: PageCategory.PRESENT,
      }).map((r) => ({ start: r.start - this.address, end: r.end - this.address }));
    } finally {
      closeSync(fd);
    }
  }

  /**
   * Bytes of guest memory present in this process (faulted in or written): the mapping's Rss
   * in /proc/self/smaps. What a guest kernel would count as used is not knowable here; what
   * the guest has touched is the honest stand-in.
   */
  residentBytes(): number {
    if (this.address === 0) return 0;
    const smaps = readFileSync('/proc/self/smaps', 'utf8');
    const at = smaps.indexOf(`${this.address.toString(16)}-`);
    if (at < 0) return 0;
    const rss = /\nRss:\s+(\d+) kB/.exec(smaps.slice(at, at + 2000));
    // An unregistered anonymous mapping may share its VMA with a neighbour: never report more
    // than the guest has.
    return rss?.[1] ? Math.min(this.size, Number(rss[1]) * 1024) : 0;
  }

  /** Number of pages written since load (for metrics and logs). */
  dirtyPages(): number {
    if (!this.dirty) return 0;
    let n = 0;
    for (const d of this.dirty) n += d;
    return n;
  }

  /**
   * Releases everything in reverse: the vCPU thread first (nothing may touch the mapping once
   * it is gone), then the handshake socket, the uffd, the mapping and the memfd. Idempotent.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const w of this.waiting.values()) w.reject(new VmmFailure('GUEST_MEMORY_CLOSED', 'guest memory closed'));
    this.waiting.clear();
    // A vCPU frozen in a fault nobody serves cannot be stopped; the mapping then stays until
    // the process exits, which is what a Firecracker vCPU stuck the same way costs too.
    let workerStopped = true;
    if (this.worker) {
      workerStopped = await Promise.race([
        this.worker.terminate().then(() => true),
        new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 2000).unref()),
      ]);
      this.worker = undefined;
      if (!workerStopped) GuestMemory.frozenVcpus++;
    }
    this.handshake?.destroy();
    this.handshake = undefined;
    if (this.uffd >= 0) closeFd(this.uffd);
    this.uffd = -1;
    if (this.address !== 0 && workerStopped) munmap(this.address, this.size);
    this.address = 0;
    if (this.memfd >= 0) closeFd(this.memfd);
    this.memfd = -1;
  }
}

/** Firecracker's message (persist.rs GuestRegionUffdMapping), with both spellings by default. */
function handshakePayload(regions: GuestRegion[], spelling: PageSizeSpelling): Uint8Array {
  if (spelling !== 'both') return encodeHandshake(regions, spelling);
  return Buffer.from(
    JSON.stringify(
      regions.map((r) => ({
        base_host_virt_addr: r.base,
        size: r.size,
        offset: r.offset,
        page_size: r.pageSize,
        page_size_kib: r.pageSize,
      })),
    ),
  );
}

type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;
