/**
 * Associated data of a sealed blob: its type and its id. Authentication then proves that the
 * bytes are the blob the index names, not just some blob of this repository.
 */
export function blobAad(type: string, id: string): string {
  return `blob:${type}:${id}`;
}
