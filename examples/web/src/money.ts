// Amounts travel as integers in minor units (Money.amount_minor, an int64,
// so a bigint here); these convert to and from what people read and type,
// without floating point.
import type { Money } from "./gen/vcn/v1/vcn_pb.js";

/** Digits after the decimal point of an ISO 4217 currency (EUR 2, JPY 0). */
export function minorDigits(currency: string): number {
  return new Intl.NumberFormat("en", { style: "currency", currency })
    .resolvedOptions().maximumFractionDigits ?? 2;
}

/** "12.50 EUR" for { amountMinor: 1250n, currency: "EUR" }; "" when unset. */
export function formatMoney(m: Money | undefined): string {
  if (!m) return "";
  const digits = minorDigits(m.currency);
  const negative = m.amountMinor < 0n;
  const text = (negative ? -m.amountMinor : m.amountMinor).toString().padStart(digits + 1, "0");
  const major = text.slice(0, text.length - digits);
  const minor = digits > 0 ? "." + text.slice(text.length - digits) : "";
  return `${negative ? "-" : ""}${major}${minor} ${m.currency}`;
}

/**
 * "50", "50.5" or "50.00" in `currency` as minor units (5000n for EUR), or
 * an error message naming the field.
 */
export function parseAmount(text: string, currency: string): bigint | string {
  const digits = minorDigits(currency);
  const m = /^(\d{1,15})(?:\.(\d*))?$/.exec(text.trim());
  if (!m || (m[2] ?? "").length > digits) {
    return `amount: write it like 50${digits > 0 ? "." + "0".repeat(digits) : ""} (${currency} has ${digits} decimals)`;
  }
  const minor = BigInt(m[1]) * 10n ** BigInt(digits) + BigInt((m[2] ?? "").padEnd(digits, "0") || "0");
  return minor > 0n ? minor : "amount: must be above 0";
}
