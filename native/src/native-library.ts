import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import koffi from 'koffi';

/**
 * The two libraries every binding uses: our C helpers (native/build/libsbxnative.so, built by
 * `make -C native`) and libc. The .so is found by walking up from this module, so the same code
 * works from native/src (tests, tsx) and from dist/native/src (the built services).
 */
function findLibrary(): string {
  const fromEnv = process.env['SBX_NATIVE_LIB'];
  if (fromEnv) return fromEnv;
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    const candidate = join(dir, 'native', 'build', 'libsbxnative.so');
    if (existsSync(candidate)) return candidate;
    const sibling = join(dir, 'build', 'libsbxnative.so');
    if (existsSync(sibling)) return sibling;
    dir = dirname(dir);
  }
  throw new Error('libsbxnative.so not found: run `make -C native` (or bash scripts/build.sh)');
}

export const nativeLibraryPath = findLibrary();
export const sbx = koffi.load(nativeLibraryPath);
