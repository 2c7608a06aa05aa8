export { loadConfig, describeConfig, ConfigInvalid, type ConfigSource } from './load-config.js';
