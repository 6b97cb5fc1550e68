/**
 * qemu's curl `bdrv_parse_filename` for http:// and https:// filenames: the whole string is the
 * `url` option, untouched. Query strings and fragments stay part of it (curl sends the query and
 * drops the fragment when it requests the resource), and commas need no escaping here because a
 * plain filename never goes through qemu's option parser.
 *
 * @module
 */

/** The curl driver's options for a plain `http://...` or `https://...` filename. */
export function parseHttpFilename(filename: string): Record<string, string> {
  return { url: filename };
}
