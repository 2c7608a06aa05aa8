import { pino, type Logger, type LoggerOptions } from 'pino';

export type { Logger } from 'pino';

export interface LoggerSettings {
  /** The process name, on every line as `service`. */
  service: string;
  level?: string;
  /** Where lines go; standard output when absent (tests pass a stream to read them back). */
  destination?: pino.DestinationStream;
}

/** The one way a process gets its root logger: pino JSON, one line per event. */
export function createLogger(settings: LoggerSettings): Logger {
  const options: LoggerOptions = {
    level: settings.level ?? process.env['LOG_LEVEL'] ?? 'info',
    base: { service: settings.service, pid: process.pid },
    timestamp: pino.stdTimeFunctions.isoTime,
    formatters: { level: (label) => ({ level: label }) },
  };
  return settings.destination ? pino(options, settings.destination) : pino(options);
}

/** A child logger for everything about one sandbox: every line carries `sandboxId`. */
export function sandboxLogger(parent: Logger, sandboxId: string): Logger {
  return parent.child({ sandboxId });
}
