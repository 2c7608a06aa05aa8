export { nativeLibraryPath } from './native-library.js';
export { SyscallError, errno } from './syscall-error.js';
export * from './fd.js';
export * from './memory.js';
export * from './unix-socket.js';
export * from './userfaultfd.js';
export * from './pagemap-scan.js';
export * from './uffd-serve-engine.js';
