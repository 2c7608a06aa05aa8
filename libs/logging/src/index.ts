export { createLogger, sandboxLogger, type Logger, type LoggerSettings } from './logger.js';
