export { loadConfig, describeConfig, ConfigInvalid, type ConfigSource } from './load-config.js';
export { describeFlags } from './config-help.js';
