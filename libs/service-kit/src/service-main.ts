import type { z } from 'zod';
import { ConfigInvalid, describeConfig, describeFlags, loadConfig } from '#config';
import { onShutdownSignals } from '#grpc';
import { createLogger, type Logger } from '#logging';
import type { RunningService } from './service-start.js';

export interface ServiceCommand<S extends z.ZodObject = z.ZodObject> {
  /** The subcommand: `serve`, `cleanup`, `serve-file`. */
  name: string;
  /** Arguments shown after the command in usage, when the flags alone do not say it. */
  synopsis?: string;
  /** What the command does, for --help; the flags are listed from the schema. */
  about: string;
  /** The one schema of its flags and environment; must have `logLevel`. */
  schema: S;
  /** Chooses between commands of the same name (block-server's standalone `serve --base`). */
  when?: (args: string[]) => boolean;
  /**
   * Runs the command. A RunningService is served until SIGTERM/SIGINT, then stopped; a number
   * is the exit code of a command that finishes by itself. `signal` aborts a start (or a
   * one-shot command) a signal interrupted.
   */
  run(config: z.infer<S>, logger: Logger, signal: AbortSignal): Promise<RunningService | number>;
}

/**
 * The `main` of a service: `./sbx <service> <command> [flags]`. Prints help made from each
 * command's schema, loads the configuration (flags, `SBX_<SERVICE>_<FLAG>`, aliases; a bad field
 * exits 2 naming it), logs it with secrets masked, runs the command and stops it on a signal.
 */
export async function serviceMain(service: string, argv: string[], commands: ServiceCommand[]): Promise<number> {
  const envPrefix = `SBX_${service.replace(/-/g, '_').toUpperCase()}_`;
  const help = (list: ServiceCommand[]) =>
    list
      .map((c) =>
        [
          `usage: ./sbx ${service} ${c.name} ${c.synopsis ?? '[flags]'}`,
          c.about.replace(/^(?=.)/gm, '  '),
          describeFlags(c.schema, envPrefix),
        ].join('\n\n'),
      )
      .join('\n\n');
  const [name, ...rest] = argv;
  const named = commands.filter((c) => c.name === name);
  const command = named.find((c) => c.when?.(rest) ?? true);
  const wantsHelp = (args: string[]) => args.includes('--help') || args.includes('-h');
  if (!name || name === 'help' || wantsHelp([name])) {
    console.log(help(commands));
    return name ? 0 : 2;
  }
  if (!command) {
    console.error(`${service}: unknown command ${JSON.stringify(name)}\n\n${help(commands)}`);
    return 2;
  }
  if (wantsHelp(rest)) {
    console.log(help(named));
    return 0;
  }
  let config: z.infer<typeof command.schema>;
  try {
    config = loadConfig(service, command.schema, envPrefix, { argv: rest });
  } catch (err) {
    if (!(err instanceof ConfigInvalid)) throw err;
    console.error(`${err.message}\n(./sbx ${service} ${name} --help lists the flags)`);
    return 2;
  }
  const logger = createLogger({ service, level: (config as { logLevel?: string }).logLevel });
  logger.info({ config: describeConfig(config), command: name }, `${service} starting`);
  const abort = new AbortController();
  const started = command.run(config, logger, abort.signal);
  // Signals are taken from the start on, so one that arrives mid-start rolls the start back.
  onShutdownSignals(logger, async () => {
    abort.abort();
    const running = await started.catch(() => undefined);
    if (typeof running === 'object') await running.stop();
  });
  // A start a signal interrupted is rolled back; the signal handler then exits the process.
  const running = await started.catch((err: unknown) =>
    abort.signal.aborted ? new Promise<never>(() => undefined) : Promise.reject(err),
  );
  // A service serves until a signal: onShutdownSignals exits the process once it has stopped.
  return typeof running === 'number' ? running : new Promise<number>(() => undefined);
}
