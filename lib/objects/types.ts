/**
 * The contract between `--object` parsing (lib/objects/) and the object types it creates. qemu
 * creates each object when its `--object` is parsed (user_creatable_process_cmdline), checks the
 * properties against the type's declared ones, and keeps the object by id; other options find it
 * by id later (`--tls-creds`, `--tls-authz`, a secret's `passwordid`/`key-secret`).
 *
 * @module
 */

/** How one property's text value is checked and converted (qemu's QOM visitor rules). */
export type PropSpec =
  | { readonly kind: "string"; readonly default?: string }
  | { readonly kind: "bool"; readonly default?: boolean }
  | { readonly kind: "enum"; readonly values: readonly string[]; readonly default?: string }
  /** A list property that may repeat with an index, as authz-list's rules.N.match (raw texts). */
  | { readonly kind: "raw" };

/** Converted property values, by name; unset properties without a default are absent. */
export type PropValues = Readonly<Record<string, string | boolean | undefined>>;

/** A created object: its QOM type, its id, its classes (e.g. "tls-creds", "authz"), its value. */
export interface UserObject {
  readonly type: string;
  readonly id: string;
  /** qemu's class chain, nearest first (for "Object with id 'X' is not TLS credentials"). */
  readonly classes: readonly string[];
  readonly value: unknown;
}

/** What a type's `create` may ask of the objects created before it. */
export interface ObjectLookup {
  get(id: string): UserObject | undefined;
  /** The bytes of secret `id`, or throws ObjectError with qemu's wording. */
  secretBytes(id: string): Uint8Array;
}

/** One creatable type (a row of the registry's table). */
export interface ObjectType {
  readonly name: string;
  /** qemu's class chain above the type itself, nearest first. */
  readonly parents: readonly string[];
  readonly props: Readonly<Record<string, PropSpec>>;
  /** Build the object, or throw ObjectError with qemu's message. */
  create(id: string, values: PropValues, lookup: ObjectLookup): unknown;
}

/** A failure creating an object: `message` is what qemu-nbd prints after "qemu-nbd: ". */
export class ObjectError extends Error {
  override name = "ObjectError";
}
