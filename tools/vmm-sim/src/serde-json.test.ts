import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { SerdeJsonError, deserialize, type Shape } from './serde-json.js';

function error(text: string | Uint8Array, shape: Shape): string {
  try {
    deserialize(typeof text === 'string' ? Buffer.from(text) : text, shape);
  } catch (err) {
    if (err instanceof SerdeJsonError) return err.message;
    throw err;
  }
  throw new Error(`${String(text)} was accepted`);
}

const VALUE: Shape = { type: 'value' };
const VM: Shape = {
  type: 'struct',
  name: 'Vm',
  fields: { state: { shape: { type: 'enum', name: 'VmState', variants: ['Paused', 'Resumed'] } } },
};
// serde_json's own test types (tests/test.rs): Outer { inner: Vec<Inner> }, Inner { a: (), b: usize, c: Vec<String> }.
const INNER: Shape = {
  type: 'struct',
  name: 'Inner',
  fields: {
    a: { shape: VALUE },
    b: { shape: { type: 'uint', name: 'usize' } },
    c: { shape: { type: 'seq', item: { type: 'string' } } },
  },
};
const OUTER: Shape = { type: 'struct', name: 'Outer', fields: { inner: { shape: { type: 'seq', item: INNER } } } };

describe('serde_json as Firecracker reads request bodies', () => {
  it('words and positions what real Firecracker v1.16.1 answered', () => {
    expect(error('{"state":"Frozen"}', VM)).toBe(
      'unknown variant `Frozen`, expected `Paused` or `Resumed` at line 1 column 17',
    );
    expect(error('{}', VM)).toBe('missing field `state` at line 1 column 2');
    expect(deserialize(Buffer.from(' { "state" : "Paused" } '), VM)).toEqual({ state: 'Paused' });
  });

  it('matches serde_json test suite messages for syntax errors', () => {
    const cases: [string, string][] = [
      ['+', 'expected value at line 1 column 1'],
      ['-', 'EOF while parsing a value at line 1 column 1'],
      ['00', 'invalid number at line 1 column 2'],
      ['0x80', 'trailing characters at line 1 column 2'],
      ['1.', 'EOF while parsing a value at line 1 column 2'],
      ['1.a', 'invalid number at line 1 column 3'],
      ['1e+', 'EOF while parsing a value at line 1 column 3'],
      ['"', 'EOF while parsing a string at line 1 column 1'],
      ['"lol', 'EOF while parsing a string at line 1 column 4'],
      ['"\n"', 'control character (\\u0000-\\u001F) found while parsing a string at line 2 column 0'],
      ['[', 'EOF while parsing a list at line 1 column 1'],
      ['[1,', 'EOF while parsing a value at line 1 column 3'],
      ['[1,]', 'trailing comma at line 1 column 4'],
      ['[1 2]', 'expected `,` or `]` at line 1 column 4'],
      ['{', 'EOF while parsing an object at line 1 column 1'],
      ['{1', 'key must be a string at line 1 column 2'],
      ['{"a" 1', 'expected `:` at line 1 column 6'],
      ['{"a":1 1', 'expected `,` or `}` at line 1 column 8'],
      ['{}a', 'trailing characters at line 1 column 3'],
      ['{\n  "foo":\n "bar"', 'EOF while parsing an object at line 3 column 6'],
    ];
    for (const [text, message] of cases) expect(error(text, VALUE), text).toBe(message);
    expect(error(Uint8Array.from([0x22, 159, 146, 150, 0x22]), VALUE)).toBe(
      'invalid unicode code point at line 1 column 5',
    );
  });

  it('matches serde_json test suite messages for structs', () => {
    expect(error('5', OUTER)).toBe('invalid type: integer `5`, expected struct Outer at line 1 column 1');
    expect(error('"hello"', OUTER)).toBe('invalid type: string "hello", expected struct Outer at line 1 column 7');
    expect(error('{"inner": true}', OUTER)).toBe(
      'invalid type: boolean `true`, expected a sequence at line 1 column 14',
    );
    expect(error('{"inner": [{"b": 42, "c": []}]}', OUTER)).toBe('missing field `a` at line 1 column 29');
    expect(error('null', { type: 'string' })).toBe('invalid type: null, expected a string at line 1 column 4');
    expect(deserialize(Buffer.from('[[[null, 2, ["abc", "xyz"]]]]'), OUTER)).toEqual({
      inner: [{ a: null, b: 2, c: ['abc', 'xyz'] }],
    });
  });

  it('refuses unknown fields and mistyped numbers with positions', () => {
    expect(error('{"stat":"Paused"}', VM)).toBe('unknown field `stat`, expected `state` at line 1 column 7');
    expect(error('{"toString":"Paused"}', VM)).toBe('unknown field `toString`, expected `state` at line 1 column 11');
    expect(deserialize(Buffer.from('{"__proto__":[1]}'), VALUE)).toEqual(JSON.parse('{"__proto__":[1]}'));
    const u8: Shape = { type: 'struct', name: 'M', fields: { n: { shape: { type: 'uint', name: 'u8' } } } };
    expect(error('{"n": 300}', u8)).toBe('invalid value: integer `300`, expected u8 at line 1 column 9');
    expect(error('{"n": -1}', u8)).toBe('invalid value: integer `-1`, expected u8 at line 1 column 8');
    expect(error('{"n": 2.0}', u8)).toBe('invalid type: floating point `2.0`, expected u8 at line 1 column 9');
    expect(error('{"n": "2"}', u8)).toBe('invalid type: string "2", expected u8 at line 1 column 9');
    expect(error('{"n": 1, "n": 2}', u8)).toBe('duplicate field `n` at line 1 column 12');
  });

  it('reads any JSON value exactly as JSON.parse does, and fails only with SerdeJsonError (fuzz)', () => {
    fc.assert(
      fc.property(fc.json(), (text) => {
        expect(deserialize(Buffer.from(text), VALUE)).toEqual(JSON.parse(text));
      }),
      { numRuns: 2000 },
    );
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 64 }), (bytes) => {
        try {
          deserialize(bytes, VM);
        } catch (err) {
          expect(err).toBeInstanceOf(SerdeJsonError);
          expect((err as Error).message).toMatch(/ at line \d+ column \d+$/);
        }
      }),
      { numRuns: 2000 },
    );
  });
});
