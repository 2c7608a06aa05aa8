import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import { TemplateNotFound } from './orchestrator-errors.js';

export interface TemplateEntry {
  templateId: string;
  buildId: string;
  createdAt: string;
  rootfsBytes?: number;
  memoryBytes?: number;
}

/** Template id → build id, in one JSON file in the data dir (local mode and tests). */
export class TemplateCatalogue {
  private entries = new Map<string, TemplateEntry>();
  private writing: Promise<void> = Promise.resolve();

  constructor(private readonly path: string) {}

  async load(): Promise<void> {
    try {
      const parsed = JSON.parse(await readFile(this.path, 'utf8')) as { templates?: TemplateEntry[] };
      this.entries = new Map((parsed.templates ?? []).map((t) => [t.templateId, t]));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      this.entries = new Map();
    }
  }

  get(templateId: string): TemplateEntry | undefined {
    return this.entries.get(templateId);
  }

  buildOf(templateId: string): string {
    const entry = this.entries.get(templateId);
    if (!entry) throw new TemplateNotFound(templateId);
    return entry.buildId;
  }

  list(): TemplateEntry[] {
    return [...this.entries.values()].sort((a, b) => a.templateId.localeCompare(b.templateId));
  }

  async set(entry: TemplateEntry): Promise<void> {
    this.entries.set(entry.templateId, entry);
    const body = JSON.stringify({ templates: this.list() }, null, 2);
    this.writing = this.writing.then(async () => {
      await mkdir(dirname(this.path), { recursive: true });
      await writeFile(`${this.path}.tmp`, body);
      await rename(`${this.path}.tmp`, this.path);
    });
    await this.writing;
  }
}
