// JSON with exact 64-bit integers: seeds go up to 2^64-1, JS numbers are exact only to 2^53.
//
// `parse` turns an integer literal that a Number cannot hold exactly into a BigInt (the
// reviver sees the literal's source text); `stringify` writes a BigInt as a bare JSON number.

const MARK = "\u0000bigint:";

/** JSON.parse that keeps large integers exact as BigInt. */
export function parse(text) {
  return JSON.parse(text, (key, value, context) => {
    if (typeof value === "number" && !Number.isSafeInteger(value) && /^-?\d+$/.test(context?.source ?? "")) {
      return BigInt(context.source);
    }
    return value;
  });
}

/** JSON.stringify that writes BigInts as plain JSON integers. */
export function stringify(value, space) {
  const text = JSON.stringify(value, (key, v) => (typeof v === "bigint" ? MARK + v.toString() : v), space);
  return text?.replace(/"\\u0000bigint:(-?\d+)"/g, "$1");
}
