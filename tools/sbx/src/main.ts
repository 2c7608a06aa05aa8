import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { commands } from './commands.js';
import { loadEnvFile } from './env-file.js';

// dist/tools/sbx/src/main.js → dist/
const distRoot = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');

function usage(): string {
  const width = Math.max(...commands.map((c) => c.name.length));
  const lines = commands.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`);
  return ['usage: ./sbx <command> [args...]', '', 'commands:', ...lines, '', 'Each command takes --help.'].join('\n');
}

async function run(argv: string[]): Promise<number> {
  // Settings a Nomad template rendered for this start (SBX_ENV_FILE), before any command reads them.
  loadEnvFile();
  const [name, ...rest] = argv;
  if (!name || name === '--help' || name === '-h' || name === 'help') {
    console.log(usage());
    return name ? 0 : 2;
  }
  const entry = commands.find((c) => c.name === name);
  if (!entry) {
    console.error(`sbx: unknown command "${name}"\n\n${usage()}`);
    return 2;
  }
  const file = join(distRoot, `${entry.module}.js`);
  if (!existsSync(file)) {
    console.error(`sbx: ${name} is not built (${file} missing); run npm run build`);
    return 1;
  }
  const mod = (await import(pathToFileURL(file).href)) as Record<string, (argv: string[]) => Promise<number | void>>;
  const run = mod[entry.exportName ?? 'main'];
  if (!run) throw new Error(`${file} does not export ${entry.exportName ?? 'main'}`);
  return (await run(rest)) ?? 0;
}

run(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    console.error(`sbx: ${err instanceof Error ? err.message : String(err)}`);
    process.exitCode = 1;
  },
);
