/**
 * How Firecracker reads a request body: `serde_json::from_slice` into a `#[derive(Deserialize)]`
 * struct with `deny_unknown_fields`. A pure reader over the bytes that follows serde_json's
 * order of work (one pass, first problem wins) and its wording, including the position it
 * appends: `at line L column C`, where C counts the bytes of the line up to the last one read
 * (serde_json's SliceRead), or up to the byte looked at for errors found by peeking.
 */

export type Shape =
  | { type: 'struct'; name: string; fields: Record<string, Field> }
  | { type: 'enum'; name: string; variants: readonly string[] }
  | { type: 'string' }
  /** std::path::PathBuf: a string, with its own wording. */
  | { type: 'path' }
  | { type: 'bool' }
  | { type: 'uint'; name: 'u8' | 'u32' | 'u64' | 'usize' }
  | { type: 'seq'; item: Shape }
  /** serde_json::Value, or a field whose contents the double does not look at. */
  | { type: 'value' };

export interface Field {
  shape: Shape;
  /** `Option<T>`: may be missing or null. `default`: may be missing, not null. */
  absent?: 'option' | 'default';
}

/** A body serde_json refuses; `message` is what serde_json's Display prints. */
export class SerdeJsonError extends Error {
  readonly code = 'SERDE_JSON';
  constructor(message: string) {
    super(message);
    this.name = 'SerdeJsonError';
  }
}

const UINT_MAX: Record<'u8' | 'u32' | 'u64' | 'usize', number> = {
  u8: 255,
  u32: 4294967295,
  u64: Number.MAX_SAFE_INTEGER,
  usize: Number.MAX_SAFE_INTEGER,
};
const RECURSION_LIMIT = 128;

/** Reads one value of `shape` from `bytes`; anything but whitespace after it is an error. */
export function deserialize(bytes: Uint8Array, shape: Shape): unknown {
  const reader = new Reader(bytes);
  const value = reader.value(shape);
  if (reader.whitespace() !== undefined) throw reader.peekError('trailing characters');
  return value;
}

/** An error from a visitor (no position yet), positioned where serde_json's fix_position puts it. */
class Unpositioned {
  constructor(readonly message: string) {}
}

class Reader {
  private index = 0;
  private depth = 0;
  constructor(private readonly bytes: Uint8Array) {}

  private position(at: number): string {
    let line = 1;
    let start = 0;
    for (let i = 0; i < at; i++) {
      if (this.bytes[i] === 0x0a) {
        line++;
        start = i + 1;
      }
    }
    return `line ${line} column ${at - start}`;
  }

  /** serde_json `error`: at the last byte read. */
  error(message: string): SerdeJsonError {
    return new SerdeJsonError(`${message} at ${this.position(this.index)}`);
  }

  /** serde_json `peek_error`: at the byte looked at. */
  peekError(message: string): SerdeJsonError {
    return new SerdeJsonError(`${message} at ${this.position(Math.min(this.bytes.length, this.index + 1))}`);
  }

  private fix(err: unknown): unknown {
    return err instanceof Unpositioned ? this.error(err.message) : err;
  }

  private peek(): number | undefined {
    return this.bytes[this.index];
  }

  whitespace(): number | undefined {
    for (;;) {
      const b = this.bytes[this.index];
      if (b === 0x20 || b === 0x0a || b === 0x09 || b === 0x0d) this.index++;
      else return b;
    }
  }

  value(shape: Shape): unknown {
    switch (shape.type) {
      case 'struct':
        return this.struct(shape);
      case 'enum':
        return this.enumeration(shape);
      case 'string':
        return this.string('a string');
      case 'path':
        return this.string('path string');
      case 'bool':
        return this.bool();
      case 'uint':
        return this.uint(shape.name);
      case 'seq':
        return this.seq(shape.item);
      case 'value':
        return this.any();
    }
  }

  private nested<T>(fn: () => T): T {
    if (++this.depth > RECURSION_LIMIT) throw this.error('recursion limit exceeded');
    try {
      return fn();
    } finally {
      this.depth--;
    }
  }

  private eof(): SerdeJsonError {
    return this.peekError('EOF while parsing a value');
  }

  /** serde_json `peek_invalid_type`: reads the offending scalar, then names it. */
  private invalidType(expected: string): unknown {
    const b = this.peek();
    let unexpected: string;
    switch (b) {
      case 0x6e: // n
        this.index++;
        this.ident('ull');
        unexpected = 'null';
        break;
      case 0x74:
        this.index++;
        this.ident('rue');
        unexpected = 'boolean `true`';
        break;
      case 0x66:
        this.index++;
        this.ident('alse');
        unexpected = 'boolean `false`';
        break;
      case 0x22:
        this.index++;
        unexpected = `string ${JSON.stringify(this.stringBody())}`;
        break;
      case 0x5b:
        unexpected = 'sequence';
        break;
      case 0x7b:
        unexpected = 'map';
        break;
      default:
        if (b === 0x2d || (b !== undefined && b >= 0x30 && b <= 0x39)) {
          unexpected = describeNumber(this.number());
          break;
        }
        return this.peekError('expected value');
    }
    return this.error(`invalid type: ${unexpected}, expected ${expected}`);
  }

  private ident(rest: string): void {
    for (let i = 0; i < rest.length; i++) {
      const b = this.bytes[this.index];
      if (b === undefined) throw this.error('EOF while parsing a value');
      this.index++;
      if (b !== rest.charCodeAt(i)) throw this.error('expected ident');
    }
  }

  private bool(): boolean {
    const b = this.whitespace();
    if (b === undefined) throw this.eof();
    if (b === 0x74) {
      this.index++;
      this.ident('rue');
      return true;
    }
    if (b === 0x66) {
      this.index++;
      this.ident('alse');
      return false;
    }
    throw this.invalidType('a boolean');
  }

  private string(expected: string): string {
    const b = this.whitespace();
    if (b === undefined) throw this.eof();
    if (b !== 0x22) throw this.invalidType(expected);
    this.index++;
    return this.stringBody();
  }

  /** After the opening quote: up to and including the closing one. */
  private stringBody(): string {
    const bytes: number[] = [];
    for (;;) {
      const b = this.bytes[this.index];
      if (b === undefined) throw this.error('EOF while parsing a string');
      this.index++;
      if (b === 0x22) break;
      if (b < 0x20) throw this.error('control character (\\u0000-\\u001F) found while parsing a string');
      if (b !== 0x5c) {
        bytes.push(b);
        continue;
      }
      const e = this.bytes[this.index];
      if (e === undefined) throw this.error('EOF while parsing a string');
      this.index++;
      const simple: Record<number, number> = {
        0x22: 0x22,
        0x5c: 0x5c,
        0x2f: 0x2f,
        0x62: 8,
        0x66: 12,
        0x6e: 10,
        0x72: 13,
        0x74: 9,
      };
      if (simple[e] !== undefined) {
        bytes.push(simple[e]);
        continue;
      }
      if (e !== 0x75) throw this.error('invalid escape');
      let code = this.hex4();
      if (code >= 0xd800 && code <= 0xdbff) {
        if (this.bytes[this.index] !== 0x5c || this.bytes[this.index + 1] !== 0x75) {
          throw this.error('lone leading surrogate in hex escape');
        }
        this.index += 2;
        const low = this.hex4();
        if (low < 0xdc00 || low > 0xdfff) throw this.error('lone leading surrogate in hex escape');
        code = 0x10000 + ((code - 0xd800) << 10) + (low - 0xdc00);
      }
      bytes.push(...Buffer.from(String.fromCodePoint(code)));
    }
    try {
      return new TextDecoder('utf-8', { fatal: true }).decode(Uint8Array.from(bytes));
    } catch {
      throw this.error('invalid unicode code point');
    }
  }

  private hex4(): number {
    if (this.index + 4 > this.bytes.length) {
      this.index = this.bytes.length;
      throw this.error('EOF while parsing a string');
    }
    let v = 0;
    for (let i = 0; i < 4; i++) {
      const c = String.fromCharCode(this.bytes[this.index + i] ?? 0);
      const d = parseInt(c, 16);
      if (Number.isNaN(d)) {
        this.index += 4;
        throw this.error('invalid escape');
      }
      v = v * 16 + d;
    }
    this.index += 4;
    return v;
  }

  /** JSON number grammar, serde_json's errors; at a '-' or a digit. */
  private number(): { value: number; float: boolean } {
    const start = this.index;
    if (this.peek() === 0x2d) this.index++;
    const digit = (b: number | undefined) => b !== undefined && b >= 0x30 && b <= 0x39;
    const first = this.bytes[this.index];
    if (first === undefined) throw this.eof();
    this.index++;
    if (first === 0x30) {
      if (digit(this.peek())) throw this.peekError('invalid number');
    } else if (!digit(first)) {
      throw this.error('invalid number');
    } else {
      while (digit(this.peek())) this.index++;
    }
    if (this.peek() === 0x2e) {
      this.index++;
      if (!digit(this.peek())) throw this.peek() === undefined ? this.eof() : this.peekError('invalid number');
      while (digit(this.peek())) this.index++;
    }
    if (this.peek() === 0x65 || this.peek() === 0x45) {
      this.index++;
      if (this.peek() === 0x2b || this.peek() === 0x2d) this.index++;
      if (!digit(this.peek())) throw this.peek() === undefined ? this.eof() : this.peekError('invalid number');
      while (digit(this.peek())) this.index++;
    }
    const text = Buffer.from(this.bytes.subarray(start, this.index)).toString('latin1');
    const value = Number(text);
    if (!Number.isFinite(value)) throw this.error('number out of range');
    return { value, float: /[.eE]/.test(text) };
  }

  private uint(name: 'u8' | 'u32' | 'u64' | 'usize'): number {
    const b = this.whitespace();
    if (b === undefined) throw this.eof();
    if (b !== 0x2d && !(b >= 0x30 && b <= 0x39)) throw this.invalidType(name);
    const n = this.number();
    if (n.float) throw this.error(`invalid type: ${describeNumber(n)}, expected ${name}`);
    if (n.value < 0 || n.value > UINT_MAX[name]) {
      throw this.error(`invalid value: integer \`${n.value}\`, expected ${name}`);
    }
    return n.value;
  }

  private enumeration(shape: Extract<Shape, { type: 'enum' }>): string {
    const b = this.whitespace();
    if (b === undefined) throw this.eof();
    if (b === 0x22) {
      this.index++;
      const name = this.stringBody();
      if (!shape.variants.includes(name)) {
        throw this.error(`unknown variant \`${name}\`, ${oneOf(shape.variants, 'variants')}`);
      }
      return name;
    }
    if (b === 0x7b) {
      // {"Variant": null} is a unit variant too.
      return this.nested(() => {
        this.index++;
        const k = this.whitespace();
        if (k !== 0x22) throw k === undefined ? this.eof() : this.peekError('expected value');
        this.index++;
        const name = this.stringBody();
        if (!shape.variants.includes(name)) {
          throw this.error(`unknown variant \`${name}\`, ${oneOf(shape.variants, 'variants')}`);
        }
        this.colon();
        const v = this.whitespace();
        if (v === undefined) throw this.eof();
        if (v === 0x6e) {
          this.index++;
          this.ident('ull');
        } else {
          throw this.invalidType('unit');
        }
        this.endMap();
        return name;
      });
    }
    throw this.peekError('expected value');
  }

  private colon(): void {
    const c = this.whitespace();
    if (c === 0x3a) {
      this.index++;
      return;
    }
    throw c === undefined ? this.peekError('EOF while parsing an object') : this.peekError('expected `:`');
  }

  private endMap(): void {
    const b = this.whitespace();
    if (b === 0x7d) {
      this.index++;
      return;
    }
    if (b === 0x2c) throw this.peekError('trailing comma');
    if (b === undefined) throw this.peekError('EOF while parsing an object');
    throw this.peekError('trailing characters');
  }

  private endSeq(): void {
    const b = this.whitespace();
    if (b === 0x5d) {
      this.index++;
      return;
    }
    if (b === 0x2c) {
      this.index++;
      if (this.whitespace() === 0x5d) throw this.peekError('trailing comma');
      throw this.peekError('trailing characters');
    }
    if (b === undefined) throw this.peekError('EOF while parsing a list');
    throw this.peekError('trailing characters');
  }

  /** serde_json MapAccess::next_key_seed: the next key, or undefined at the closing brace. */
  private nextKey(first: boolean): string | undefined {
    let b = this.whitespace();
    if (b === 0x7d) return undefined;
    if (b === 0x2c && !first) {
      this.index++;
      b = this.whitespace();
    } else if (b === undefined) {
      throw this.peekError('EOF while parsing an object');
    } else if (!first) {
      throw this.peekError('expected `,` or `}`');
    }
    if (b === 0x22) {
      this.index++;
      return this.stringBody();
    }
    if (b === 0x7d) throw this.peekError('trailing comma');
    if (b === undefined) throw this.eof();
    throw this.peekError('key must be a string');
  }

  /** serde_json SeqAccess::next_element_seed: true when an element follows. */
  private nextElement(first: boolean): boolean {
    let b = this.whitespace();
    if (b === 0x5d) return false;
    if (b === 0x2c && !first) {
      this.index++;
      b = this.whitespace();
    } else if (b === undefined) {
      throw this.peekError('EOF while parsing a list');
    } else if (!first) {
      throw this.peekError('expected `,` or `]`');
    }
    if (b === 0x5d) throw this.peekError('trailing comma');
    if (b === undefined) throw this.eof();
    return true;
  }

  private struct(shape: Extract<Shape, { type: 'struct' }>): Record<string, unknown> {
    const b = this.whitespace();
    if (b === undefined) throw this.eof();
    const names = Object.keys(shape.fields);
    if (b === 0x7b) {
      return this.nested(() => {
        this.index++;
        const out: Record<string, unknown> = {};
        let problem: unknown;
        try {
          for (let first = true; ; first = false) {
            const key = this.nextKey(first);
            if (key === undefined) break;
            // Own keys only: a body's "toString" or "__proto__" is just an unknown field.
            const field = Object.hasOwn(shape.fields, key) ? shape.fields[key] : undefined;
            if (!field) throw this.error(`unknown field \`${key}\`, ${oneOf(names, 'fields')}`);
            if (Object.hasOwn(out, key)) throw new Unpositioned(`duplicate field \`${key}\``);
            this.colon();
            out[key] = this.fieldValue(field);
          }
          for (const name of names) {
            const field = shape.fields[name];
            if (!Object.hasOwn(out, name) && !field?.absent) throw new Unpositioned(`missing field \`${name}\``);
          }
        } catch (err) {
          problem = err;
        }
        // serde_json ends the map even after an error, and positions the error after that.
        try {
          this.endMap();
        } catch (err) {
          problem ??= err;
        }
        if (problem !== undefined) throw this.fix(problem);
        return withoutNone(out, shape);
      });
    }
    if (b === 0x5b) {
      return this.nested(() => {
        this.index++;
        const out: Record<string, unknown> = {};
        let problem: unknown;
        try {
          names.forEach((name, i) => {
            if (!this.nextElement(i === 0)) {
              throw new Unpositioned(
                `invalid length ${i}, expected struct ${shape.name} with ${names.length} elements`,
              );
            }
            out[name] = this.fieldValue(shape.fields[name] as Field);
          });
        } catch (err) {
          problem = err;
        }
        try {
          this.endSeq();
        } catch (err) {
          problem ??= err;
        }
        if (problem !== undefined) throw this.fix(problem);
        return withoutNone(out, shape);
      });
    }
    throw this.invalidType(`struct ${shape.name}`);
  }

  private fieldValue(field: Field): unknown {
    if (field.absent === 'option') {
      if (this.whitespace() === 0x6e) {
        this.index++;
        this.ident('ull');
        return null;
      }
    }
    return this.value(field.shape);
  }

  private seq(item: Shape): unknown[] {
    const b = this.whitespace();
    if (b === undefined) throw this.eof();
    if (b !== 0x5b) throw this.invalidType('a sequence');
    return this.nested(() => {
      this.index++;
      const out: unknown[] = [];
      let problem: unknown;
      try {
        for (let first = true; this.nextElement(first); first = false) out.push(this.value(item));
      } catch (err) {
        problem = err;
      }
      if (problem === undefined) this.endSeq();
      else throw this.fix(problem);
      return out;
    });
  }

  private any(): unknown {
    const b = this.whitespace();
    if (b === undefined) throw this.eof();
    switch (b) {
      case 0x6e:
        this.index++;
        this.ident('ull');
        return null;
      case 0x74:
      case 0x66:
        return this.bool();
      case 0x22:
        this.index++;
        return this.stringBody();
      case 0x5b:
        return this.seq({ type: 'value' });
      case 0x7b:
        return this.nested(() => {
          this.index++;
          const out: Record<string, unknown> = {};
          for (let first = true; ; first = false) {
            const key = this.nextKey(first);
            if (key === undefined) break;
            this.colon();
            // A key named "__proto__" is data, not the object's prototype (as in JSON.parse).
            Object.defineProperty(out, key, {
              value: this.any(),
              enumerable: true,
              writable: true,
              configurable: true,
            });
          }
          this.endMap();
          return out;
        });
    }
    if (b === 0x2d || (b >= 0x30 && b <= 0x39)) return this.number().value;
    throw this.peekError('expected value');
  }
}

/** An `Option` field sent as null is the same as one left out. */
function withoutNone(out: Record<string, unknown>, shape: Extract<Shape, { type: 'struct' }>): Record<string, unknown> {
  for (const k of Object.keys(out)) if (out[k] === null && shape.fields[k]?.absent === 'option') delete out[k];
  return out;
}

/** serde's OneOf: "expected `a`", "expected `a` or `b`", "expected one of `a`, `b`, `c`". */
function oneOf(names: readonly string[], what: 'variants' | 'fields'): string {
  const quoted = names.map((n) => `\`${n}\``);
  if (quoted.length === 0) return `there are no ${what}`;
  if (quoted.length === 1) return `expected ${quoted[0]}`;
  if (quoted.length === 2) return `expected ${quoted[0]} or ${quoted[1]}`;
  return `expected one of ${quoted.join(', ')}`;
}

/** serde's Unexpected: integers as read, floats always with a decimal point. */
function describeNumber(n: { value: number; float: boolean }): string {
  if (!n.float) return `integer \`${n.value}\``;
  return `floating point \`${Number.isInteger(n.value) ? `${n.value}.0` : n.value}\``;
}
