/**
 * `--object secret,id=ID,data=...|file=...[,format=raw|base64][,keyid=KEY,iv=IV]`: bytes other
 * objects use by id (a TLS key's password now, image keys later). With keyid the data is
 * AES-256-CBC ciphertext under the secret KEY (32 bytes) and the base64 IV, as qemu decrypts it.
 *
 * @module
 */

import { createDecipheriv } from "node:crypto";
import { ObjectError, type ObjectType, type PropValues } from "./types.ts";

/** A loaded secret. */
export interface Secret {
  readonly bytes: Uint8Array;
}

/** qemu's base64 decoder: the same alphabet check and message. */
export function decodeBase64(text: string): Uint8Array {
  if (!/^[A-Za-z0-9+/=\s]*$/.test(text)) {
    throw new ObjectError("Base64 data contains invalid characters");
  }
  try {
    const bin = atob(text.replace(/\s+/g, ""));
    return Uint8Array.from(bin, (c) => c.charCodeAt(0));
  } catch {
    throw new ObjectError("Base64 data contains invalid characters");
  }
}

function decrypt(
  input: Uint8Array,
  values: PropValues,
  key: Uint8Array,
): Uint8Array {
  if (key.length !== 32) throw new ObjectError("Key should be 32 bytes in length");
  const ivText = values.iv as string | undefined;
  if (ivText === undefined) throw new ObjectError("IV is required to decrypt secret");
  const iv = decodeBase64(ivText);
  if (iv.length !== 16) throw new ObjectError(`IV should be 16 bytes in length not ${iv.length}`);
  const cipher = values.format === "base64" ? decodeBase64(new TextDecoder().decode(input)) : input;
  if (cipher.length === 0 || cipher.length % 16 !== 0) {
    throw new ObjectError(
      "Plaintext size must be a multiple of the cipher block size",
    );
  }
  const d = createDecipheriv("aes-256-cbc", key, iv);
  d.setAutoPadding(false);
  const plain = new Uint8Array([...d.update(cipher), ...d.final()]);
  const pad = plain[plain.length - 1]!;
  if (pad > 16 || pad > plain.length) {
    throw new ObjectError(`Incorrect number of padding bytes (${pad}) found on decrypted data`);
  }
  return plain.subarray(0, plain.length - pad);
}

function errnoText(e: unknown): string {
  if (e instanceof Deno.errors.NotFound) return "No such file or directory";
  if (e instanceof Deno.errors.PermissionDenied) return "Permission denied";
  const msg = e instanceof Error ? e.message : String(e);
  return /^(.*?) \(os error \d+\)/.exec(msg)?.[1] ?? msg;
}

export const SECRET_TYPE: ObjectType = {
  name: "secret",
  parents: ["secret_common"],
  props: {
    loaded: { kind: "readonly" },
    format: { kind: "enum", values: ["raw", "base64"], typeName: "QCryptoSecretFormat" },
    keyid: { kind: "string" },
    iv: { kind: "string" },
    data: { kind: "string" },
    file: { kind: "string" },
  },
  create(_id, values, lookup): Secret {
    const data = values.data as string | undefined;
    const file = values.file as string | undefined;
    let input: Uint8Array;
    if (file !== undefined) {
      if (data !== undefined) throw new ObjectError("'file' and 'data' are mutually exclusive");
      try {
        input = Deno.readFileSync(file);
      } catch (e) {
        throw new ObjectError(
          `Unable to read ${file}: Failed to open file “${file}”: ${errnoText(e)}`,
        );
      }
    } else if (data !== undefined) {
      input = new TextEncoder().encode(data);
    } else {
      throw new ObjectError("Either 'file' or 'data' must be provided");
    }
    const keyid = values.keyid as string | undefined;
    if (keyid !== undefined) return { bytes: decrypt(input, values, lookup.secretBytes(keyid)) };
    if (values.format === "base64") {
      return { bytes: decodeBase64(new TextDecoder().decode(input)) };
    }
    return { bytes: input };
  },
};
