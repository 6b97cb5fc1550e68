/**
 * The contract between `--object` parsing (lib/objects/) and the object types it creates. qemu
 * creates each object when its `--object` is parsed (user_creatable_process_cmdline): the
 * properties are checked against the type's QAPI members, then the object is built and kept
 * by id; other options find it by id later (`--tls-creds`, `--tls-authz`, `passwordid`).
 *
 * @module
 */

/** How one property is checked and converted (qemu's QAPI visitor rules). */
export type PropSpec =
  | { readonly kind: "string"; readonly required?: boolean }
  | { readonly kind: "bool" }
  | {
    readonly kind: "enum";
    readonly values: readonly string[];
    /** The QAPI type name `TYPE,help` prints. */
    readonly typeName: string;
    readonly required?: boolean;
  }
  /** qemu accepts it but it may not be set (a read-only QOM property such as `loaded`). */
  | { readonly kind: "readonly" }
  /** A list of structs, written `NAME.0.KEY=...` (authz-list's rules). */
  | { readonly kind: "list"; readonly item: Readonly<Record<string, PropSpec>> };

/** One converted property value. */
export type PropValue = string | boolean | readonly Readonly<Record<string, PropValue>>[];

/** Converted property values, by name; unset properties are absent. */
export type PropValues = Readonly<Record<string, PropValue | undefined>>;

/** A created object: its QOM type, its id, its classes (e.g. "tls-creds", "authz"), its value. */
export interface UserObject {
  readonly type: string;
  readonly id: string;
  /** qemu's class chain above the type, nearest first (for "... is not TLS credentials"). */
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
  /** The QAPI members, in the order qemu visits them (base type first). */
  readonly props: Readonly<Record<string, PropSpec>>;
  /** Build the object, or throw ObjectError with qemu's message. */
  create(id: string, values: PropValues, lookup: ObjectLookup): unknown;
}

/** A failure creating an object: `message` is what qemu-nbd prints after "qemu-nbd: ". */
export class ObjectError extends Error {
  override name = "ObjectError";
}
