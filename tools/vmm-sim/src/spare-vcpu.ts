import { Worker } from 'node:worker_threads';

/**
 * A vCPU worker thread started before any VM needs one. Starting a worker (a V8 isolate plus
 * the worker's modules) took 40–100 ms on this machine, most of a snapshot load; a VMM waiting
 * in the orchestrator's pool has nothing else to do, so it starts its vCPU thread while it
 * waits and the load only attaches guest memory to it (vcpu-worker.ts, `attach`). Firecracker
 * spawns its vCPU threads at load too, but in microseconds. One spare per process: a VMM runs
 * one VM.
 */
let spare: { worker: Worker; failed: boolean } | undefined;

function startWorker(): Worker {
  const worker = new Worker(new URL('./vcpu-worker.js', import.meta.url));
  worker.unref();
  return worker;
}

/** Starts the spare if there is none. */
export function startSpareVcpu(): void {
  if (spare) return;
  const entry = { worker: startWorker(), failed: false };
  // An error with no listener would end the process: a spare that failed is replaced at take.
  entry.worker.once('error', () => (entry.failed = true));
  entry.worker.once('exit', () => (entry.failed = true));
  spare = entry;
}

/** The spare (started ahead) when it is healthy, else a worker started now. */
export function takeVcpuWorker(): Worker {
  const entry = spare;
  spare = undefined;
  if (entry && !entry.failed) {
    entry.worker.removeAllListeners('error');
    entry.worker.removeAllListeners('exit');
    return entry.worker;
  }
  if (entry) void entry.worker.terminate();
  return startWorker();
}
