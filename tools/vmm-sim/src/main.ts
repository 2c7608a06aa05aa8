import { z } from 'zod';
import { ConfigInvalid, describeConfig, loadConfig } from '#config';
import { createLogger, type Logger } from '#logging';
import { ApiServer } from './api-server.js';
import { GuestMemory } from './guest-memory.js';
import { PreparedNetwork } from './prepared-network.js';
import { startSpareVcpu } from './spare-vcpu.js';
import { warmUpLoadPath } from './warm-up.js';
import type { MicrovmSettings } from './microvm.js';
import { VMM_VERSION, VmmController } from './vmm-controller.js';

/**
 * `./sbx vmm-sim --api-sock <path>`: the Firecracker test double. Takes Firecracker's
 * command line (flags it does not know, like --id's siblings --level or --no-seccomp, are
 * ignored), serves the API subset the node uses on the socket, and runs a "guest" whose memory
 * comes through userfaultfd and whose disk is the real device or NBD socket. A test and
 * local-mode tool: no service depends on it at run time.
 */
const schema = z.object({
  apiSock: z.string().min(1),
  id: z.string().min(1).max(64).default('anonymous-instance'),
  guestListen: z
    .string()
    .regex(/^[^:]+:\d+$/, 'host:port, e.g. 127.0.0.1:49983')
    .optional(),
  guestAddress: z.ipv4().default('169.254.0.21'),
  guestPrefixLength: z.coerce.number().int().min(1).max(32).default(30),
  tapCidr: z
    .string()
    .regex(/^\d+\.\d+\.\d+\.\d+\/\d+$/, 'an IPv4 CIDR like 169.254.0.22/30')
    .default('169.254.0.22/30'),
  shareMemfd: z.stringbool().default(false),
  e2bForkWriteProtect: z.enum(['async', 'sync', 'off']).default('off'),
  uffdPageSizeField: z.enum(['both', 'page_size', 'page_size_kib']).default('both'),
  nbdExportName: z.string().default(''),
  prepareTap: z.string().default('tap0'),
  logLevel: z.enum(['trace', 'debug', 'info', 'warn', 'error']).default('info'),
});

const BOOLEAN_FLAGS = new Set(['share-memfd']);

const USAGE = `usage: ./sbx vmm-sim --api-sock <path> [options] [other Firecracker flags, ignored]

The Firecracker test double (DESIGN.md §8). Serves Firecracker's API subset on --api-sock.

options (env SBX_VMM_SIM_<NAME>):
  --api-sock <path>             API Unix socket (required)
  --id <id>                     instance id reported by GET / (default anonymous-instance)
  --guest-listen <host:port>    run the guest agent on this loopback address instead of in the
                                slot network (no tap0 needed; for tests without net-agent)
  --guest-address <ip>          guest address at cold boot (default 169.254.0.21)
  --guest-prefix-length <n>     (default 30)
  --tap-cidr <cidr>             slot side of the guest link (default 169.254.0.22/30)
  --share-memfd                 back guest memory with a memfd and send it with the uffd
  --e2b-fork-write-protect <m>  off (default): upstream Firecracker v1.16, the uffd negotiates only
                                EVENT_REMOVE and is registered MISSING only. async | sync: E2B's
                                Firecracker fork, which adds uffd write-protect (WP_ASYNC where the
                                kernel has it, else synchronous WP faults) so the uffd-server can
                                track writes
  --uffd-page-size-field <f>    both | page_size | page_size_kib (older Firecracker) (default both)
  --nbd-export-name <name>      export to ask for when a drive is an NBD socket (default "")
  --prepare-tap <name>          when this tap is in the VMM's namespace at start, plumb the guest link
                                over it while waiting for a load, so the load finds it ready (default
                                tap0; "" = plumb at load only)
  --log-level <level>           pino level (default info)
  --version                     print the Firecracker version this double answers as
`;

export async function main(argv: string[]): Promise<number | void> {
  if (argv.includes('--help') || argv.includes('-h')) {
    console.log(USAGE);
    return 0;
  }
  if (argv.includes('--version')) {
    console.log(`Firecracker v${VMM_VERSION} (vmm-sim test double)`);
    return 0;
  }
  // The old name defaulted to write-protect; dropping it silently (as unknown Firecracker
  // flags are) would turn a test of the fork's mode into one of upstream's.
  if (
    argv.some((a) => a === '--uffd-write-protect' || a.startsWith('--uffd-write-protect=')) ||
    process.env['SBX_VMM_SIM_UFFD_WRITE_PROTECT'] !== undefined
  ) {
    console.error(
      `--uffd-write-protect is now --e2b-fork-write-protect (default off: upstream Firecracker)\n\n${USAGE}`,
    );
    return 2;
  }
  let config: z.infer<typeof schema>;
  try {
    config = loadConfig('vmm-sim', schema, 'SBX_VMM_SIM_', { argv: ownFlags(argv) });
  } catch (err) {
    if (err instanceof ConfigInvalid) {
      console.error(`${err.message}\n\n${USAGE}`);
      return 2;
    }
    throw err;
  }
  const logger = createLogger({ service: 'vmm-sim', level: config.logLevel }).child({ instanceId: config.id });
  logger.warn(
    { config: describeConfig(config) },
    'vmm-sim: the Firecracker TEST DOUBLE is running (no real guest kernel); memory via userfaultfd, disk via the real device or NBD',
  );
  let guestListen: MicrovmSettings['guestListen'];
  if (config.guestListen) {
    const at = config.guestListen.lastIndexOf(':');
    guestListen = { host: config.guestListen.slice(0, at), port: Number(config.guestListen.slice(at + 1)) };
  }
  const settings: MicrovmSettings = {
    logger,
    guestListen,
    guestAddress: config.guestAddress,
    guestPrefixLength: config.guestPrefixLength,
    tapCidr: config.tapCidr,
    shareMemfd: config.shareMemfd,
    uffdWriteProtect: config.e2bForkWriteProtect,
    uffdPageSizeSpelling: config.uffdPageSizeField,
    nbdExportName: config.nbdExportName,
    preparedNetwork:
      config.guestListen || !config.prepareTap
        ? undefined
        : PreparedNetwork.start({
            tapName: config.prepareTap,
            tapCidr: config.tapCidr,
            guestAddress: config.guestAddress,
            guestPrefixLength: config.guestPrefixLength,
            logger,
          }),
  };
  // The vCPU thread starts now, while the VMM waits for a load or boot (spare-vcpu.ts).
  startSpareVcpu();
  const controller = new VmmController(settings, config.id);
  let stopping: Promise<void> | undefined;
  const running: { api?: ApiServer } = {};
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      controller.abandonLoad();
      await running.api?.close().catch((err: unknown) => logger.error({ err }, 'closing the API socket failed'));
      await controller.shutdown();
      await settings.preparedNetwork
        ?.close()
        .catch((err: unknown) => logger.error({ err }, 'putting the prepared tap back failed'));
    })();
    return stopping;
  };
  running.api = await ApiServer.listen({
    path: config.apiSock,
    controller,
    logger,
    onFatal: (fault) => {
      logger.error({ fault: fault.faultMessage }, 'fatal API error: exiting as Firecracker does');
      void stop()
        .catch((err: unknown) => logger.error({ err }, 'cleanup after fatal error failed'))
        .finally(() => exitProcess(1, logger));
    },
  });
  logger.info({ apiSock: config.apiSock }, 'API server started');
  // While nothing asks for anything yet (a pooled VMM waits here): the load's code, run once cold.
  void warmUpLoadPath(logger);
  return new Promise<number>((resolve) => {
    let signals = 0;
    const onSignal = (signal: NodeJS.Signals) => {
      signals++;
      if (signals > 1) exitProcess(130, logger, true);
      logger.info({ signal }, 'shutting down');
      // A clean stop waits on peers (the NBD server, the uffd-server) that may be gone; a VMM
      // that ignores SIGTERM for ever is worse than one that leaves a little undone.
      const deadline = setTimeout(() => {
        logger.error({ afterMs: STOP_DEADLINE_MS }, 'shutdown did not finish: exiting anyway');
        exitProcess(1, logger, true);
      }, STOP_DEADLINE_MS);
      stop().then(
        () => {
          clearTimeout(deadline);
          logger.info('stopped cleanly');
          resolve(0);
          // Worker threads or the handshake socket must not keep a stopped VMM alive.
          setImmediate(() => exitProcess(0, logger));
        },
        (err: unknown) => {
          clearTimeout(deadline);
          logger.error({ err }, 'shutdown failed');
          resolve(1);
          setImmediate(() => exitProcess(1, logger));
        },
      );
    };
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);
  });
}

const STOP_DEADLINE_MS = 5000;

/**
 * process.exit joins every worker thread first, and a vCPU thread frozen in a page fault nobody
 * serves (its uffd-server gone) never joins: then only the kernel can end the process, as it
 * ends a Firecracker whose vCPU is stuck the same way.
 */
function exitProcess(code: number, logger: Logger, hard = false): void {
  if (GuestMemory.frozenVcpus > 0 || hard) {
    logger.warn({ frozenVcpus: GuestMemory.frozenVcpus, code }, 'ending with SIGKILL: a vCPU may be frozen in a fault');
    logger.flush?.();
    process.kill(process.pid, 'SIGKILL');
  }
  process.exit(code);
}

/**
 * Keeps the flags this double defines and drops Firecracker's others (with their values), so
 * the orchestrator can start it with exactly Firecracker's command line.
 */
function ownFlags(argv: string[]): string[] {
  const known = new Set(Object.keys(schema.shape).map((k) => k.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase())));
  const kept: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] ?? '';
    if (!arg.startsWith('--')) continue;
    const [name, inline] = arg.slice(2).split('=', 2) as [string, string | undefined];
    const takesValue = inline === undefined && i + 1 < argv.length && !(argv[i + 1] ?? '').startsWith('--');
    if (known.has(name)) {
      if (BOOLEAN_FLAGS.has(name) && inline === undefined) kept.push(`--${name}=true`);
      else if (inline !== undefined) kept.push(arg);
      else if (takesValue) kept.push(arg, argv[++i] ?? '');
      else kept.push(arg);
    } else if (takesValue) {
      i++;
    }
  }
  return kept;
}
