/*
 * The fast folder walk of issue 10 (used by src/fs/native-walk.ts; the trust model is
 * src/fs/beneath.ts's).
 *
 * listFolder(fd) lists an open folder off the JavaScript thread (Node-API async work, so several
 * folders are listed at once on libuv's pool while JavaScript builds trees): getdents64 and an
 * fstatat(AT_SYMLINK_NOFOLLOW) of every entry in one call, sorted by name bytes, returned as a few
 * flat arrays instead of an object per entry. The folder is read through a description of its own
 * (openat(fd, ".") of a duplicate of `fd` made before the call returns), so the caller may close
 * `fd` at once and the listing is never of another folder that got its number.
 *
 * openListed(dirfd, name, dev, ino, folder) opens an entry that was listed, exactly as listed:
 * never following a link, never opening a device or FIFO (a file is first opened O_PATH, checked,
 * then reopened through /proc/self/fd; a folder is opened O_DIRECTORY|O_NOFOLLOW, which fails on
 * anything else before opening it), and only if it is still the device and inode listed; else an
 * error with code ECHANGED (or ENOENT, ELOOP, ENOTDIR: isChangedError in beneath.ts).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "addon.h"

/* Per entry, in `nums`: st_mode, uid, gid, size, nlink, rdev, errno of its fstatat (0: listed). */
#define NUMS 7
/* Per entry, in `text` (latin1): name in base64, mtime ns, ctime ns, inode, device (decimal). */
#define TEXTS 5

struct growable {
  char *data;
  size_t length;
  size_t capacity;
};

static int grow(struct growable *g, size_t more) {
  if (g->length + more <= g->capacity) return 0;
  size_t capacity = g->capacity ? g->capacity : 4096;
  while (capacity < g->length + more) capacity *= 2;
  char *data = realloc(g->data, capacity);
  if (!data) return ENOMEM;
  g->data = data;
  g->capacity = capacity;
  return 0;
}

static int append(struct growable *g, const void *bytes, size_t n) {
  int err = grow(g, n);
  if (err) return err;
  memcpy(g->data + g->length, bytes, n);
  g->length += n;
  return 0;
}

struct entry {
  uint32_t name_start;
  uint32_t name_length;
};

struct listing {
  napi_async_work work;
  napi_deferred deferred;
  int fd;
  int err;
  const char *failed_call;
  struct growable names;   /* name bytes, in getdents order */
  struct growable entries; /* struct entry, then sorted */
  /* Filled in name order once sorted. */
  struct growable sorted_names;
  uint32_t *name_ends;
  struct growable text;
  uint32_t *text_ends;
  double *nums;
  size_t count;
  /* With a parent tree (listFolder's 2nd argument): sameAsParent of the listing, on the pool. */
  napi_ref parent_ref;
  const char *parent;
  size_t parent_length;
  int64_t racy_since;
  uint32_t *same; /* offsets, or NULL: not the same */
};

static uint32_t *compare_with_parent(const char *text, const uint32_t *ends, const double *nums, size_t count, const char *parent, size_t parent_length, int64_t racy_since);

static int by_name(const void *a, const void *b, void *names) {
  const struct entry *x = a, *y = b;
  size_t n = x->name_length < y->name_length ? x->name_length : y->name_length;
  int c = memcmp((const char *)names + x->name_start, (const char *)names + y->name_start, n);
  if (c) return c;
  return x->name_length < y->name_length ? -1 : x->name_length > y->name_length;
}

static const char BASE64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* As Buffer.toString('base64'): padded. */
static int append_base64(struct growable *g, const unsigned char *in, size_t n) {
  int err = grow(g, (n + 2) / 3 * 4);
  if (err) return err;
  char *out = g->data + g->length;
  size_t i = 0;
  for (; i + 2 < n; i += 3) {
    uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
    *out++ = BASE64[v >> 18];
    *out++ = BASE64[(v >> 12) & 63];
    *out++ = BASE64[(v >> 6) & 63];
    *out++ = BASE64[v & 63];
  }
  if (i < n) {
    uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0);
    *out++ = BASE64[v >> 18];
    *out++ = BASE64[(v >> 12) & 63];
    *out++ = i + 1 < n ? BASE64[(v >> 6) & 63] : '=';
    *out++ = '=';
  }
  g->length = (size_t)(out - g->data);
  return 0;
}

/* `v` in decimal at the end of `out` (24 bytes): returns where the digits start (snprintf costs several times more, four times per entry). */
static char *decimal(char *out_end, uint64_t v) {
  char *p = out_end;
  do {
    *--p = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  return p;
}

static int append_signed(struct growable *g, int64_t v) {
  char digits[24];
  char *p = decimal(digits + sizeof digits, v < 0 ? 0 - (uint64_t)v : (uint64_t)v);
  if (v < 0) *--p = '-';
  return append(g, p, (size_t)(digits + sizeof digits - p));
}

static int append_unsigned(struct growable *g, uint64_t v) {
  char digits[24];
  char *p = decimal(digits + sizeof digits, v);
  return append(g, p, (size_t)(digits + sizeof digits - p));
}

/* As Node's bigint stats: seconds * 1e9 + nanoseconds. */
static int64_t ns(struct timespec t) {
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

struct linux_dirent64 {
  uint64_t d_ino;
  int64_t d_off;
  unsigned short d_reclen;
  unsigned char d_type;
  char d_name[];
};

/* On libuv's pool: read the folder, stat every entry, sort, lay out. */
static void list_execute(napi_env env, void *data) {
  (void)env;
  struct listing *l = data;
  char buffer[64 * 1024];
  int own = openat(l->fd, ".", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (own < 0) {
    l->err = errno;
    l->failed_call = "openat";
    return;
  }
  close(l->fd);
  l->fd = own;
  for (;;) {
    long n = syscall(SYS_getdents64, l->fd, buffer, sizeof buffer);
    if (n < 0) {
      if (errno == EINTR) continue;
      l->err = errno;
      l->failed_call = "getdents64";
      return;
    }
    if (n == 0) break;
    for (long at = 0; at < n;) {
      struct linux_dirent64 *d = (struct linux_dirent64 *)(buffer + at);
      at += d->d_reclen;
      const char *name = d->d_name;
      if (name[0] == '.' && (name[1] == 0 || (name[1] == '.' && name[2] == 0))) continue;
      struct entry e = {(uint32_t)l->names.length, (uint32_t)strlen(name)};
      if ((l->err = append(&l->names, name, e.name_length + 1)) || (l->err = append(&l->entries, &e, sizeof e))) {
        l->failed_call = "listFolder";
        return;
      }
    }
  }
  struct entry *entries = (struct entry *)l->entries.data;
  l->count = l->entries.length / sizeof(struct entry);
  if (l->names.length > UINT32_MAX / 2) {
    l->err = E2BIG;
    l->failed_call = "listFolder";
    return;
  }
  /* As Buffer.compare: bytes, then the shorter first. */
  if (l->count) qsort_r(entries, l->count, sizeof *entries, by_name, l->names.data);
  l->name_ends = malloc((l->count + 1) * sizeof *l->name_ends);
  l->text_ends = malloc((l->count * TEXTS + 1) * sizeof *l->text_ends);
  l->nums = malloc((l->count * NUMS + 1) * sizeof *l->nums);
  if (!l->name_ends || !l->text_ends || !l->nums) {
    l->err = ENOMEM;
    l->failed_call = "listFolder";
    return;
  }
  for (size_t i = 0; i < l->count; i++) {
    const char *name = l->names.data + entries[i].name_start;
    size_t length = entries[i].name_length;
    struct stat st;
    int err = 0;
    if (fstatat(l->fd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
      err = errno;
      memset(&st, 0, sizeof st);
    }
    double *nums = l->nums + i * NUMS;
    nums[0] = st.st_mode;
    nums[1] = st.st_uid;
    nums[2] = st.st_gid;
    nums[3] = (double)st.st_size;
    nums[4] = (double)st.st_nlink;
    nums[5] = (double)st.st_rdev;
    nums[6] = err;
    uint32_t *ends = l->text_ends + i * TEXTS;
    if ((l->err = append(&l->sorted_names, name, length)) || (l->err = append_base64(&l->text, (const unsigned char *)name, length))) goto fail;
    ends[0] = (uint32_t)l->text.length;
    if ((l->err = append_signed(&l->text, ns(st.st_mtim)))) goto fail;
    ends[1] = (uint32_t)l->text.length;
    if ((l->err = append_signed(&l->text, ns(st.st_ctim)))) goto fail;
    ends[2] = (uint32_t)l->text.length;
    if ((l->err = append_unsigned(&l->text, st.st_ino))) goto fail;
    ends[3] = (uint32_t)l->text.length;
    if ((l->err = append_unsigned(&l->text, st.st_dev))) goto fail;
    ends[4] = (uint32_t)l->text.length;
    l->name_ends[i] = (uint32_t)l->sorted_names.length;
  }
  if (l->parent) l->same = compare_with_parent(l->text.data ? l->text.data : "", l->text_ends, l->nums, l->count, l->parent, l->parent_length, l->racy_since);
  return;
fail:
  l->failed_call = "listFolder";
}

static napi_status typed_array(napi_env env, napi_typedarray_type type, const void *data, size_t count, size_t size, napi_value *result) {
  void *bytes;
  napi_value buffer;
  napi_status s = napi_create_arraybuffer(env, count * size, &bytes, &buffer);
  if (s != napi_ok) return s;
  if (count) memcpy(bytes, data, count * size);
  return napi_create_typedarray(env, type, count, buffer, 0, result);
}

static napi_status buffer_copy(napi_env env, const struct growable *g, napi_value *result) {
  return napi_create_buffer_copy(env, g->length, g->length ? g->data : "", NULL, result);
}

static void free_listing(struct listing *l) {
  if (l->fd >= 0) close(l->fd);
  free(l->names.data);
  free(l->entries.data);
  free(l->sorted_names.data);
  free(l->text.data);
  free(l->name_ends);
  free(l->text_ends);
  free(l->nums);
  free(l->same);
  free(l);
}

static napi_value errno_error(napi_env env, int err, const char *syscall) {
  char message[256];
  snprintf(message, sizeof message, "%s: %s", syscall, strerror(err));
  napi_value msg, error, code;
  const char *name = strerrorname_np(err);
  napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &msg);
  napi_create_error(env, NULL, msg, &error);
  napi_create_string_utf8(env, name ? name : "EUNKNOWN", NAPI_AUTO_LENGTH, &code);
  napi_set_named_property(env, error, "code", code);
  return error;
}

static void list_complete(napi_env env, napi_status status, void *data) {
  struct listing *l = data;
  napi_value result = NULL;
  if (status == napi_ok && l->err == 0) {
    napi_value names, name_ends, text, text_ends, nums, count;
    if (buffer_copy(env, &l->sorted_names, &names) == napi_ok && typed_array(env, napi_uint32_array, l->name_ends, l->count, 4, &name_ends) == napi_ok &&
        buffer_copy(env, &l->text, &text) == napi_ok && typed_array(env, napi_uint32_array, l->text_ends, l->count * TEXTS, 4, &text_ends) == napi_ok &&
        typed_array(env, napi_float64_array, l->nums, l->count * NUMS, 8, &nums) == napi_ok && napi_create_uint32(env, (uint32_t)l->count, &count) == napi_ok &&
        napi_create_object(env, &result) == napi_ok) {
      napi_set_named_property(env, result, "count", count);
      napi_set_named_property(env, result, "names", names);
      napi_set_named_property(env, result, "nameEnds", name_ends);
      napi_set_named_property(env, result, "text", text);
      napi_set_named_property(env, result, "textEnds", text_ends);
      napi_set_named_property(env, result, "nums", nums);
      napi_value same;
      if (!l->same || typed_array(env, napi_uint32_array, l->same, l->count * 2, 4, &same) != napi_ok) napi_get_null(env, &same);
      napi_set_named_property(env, result, "same", same);
      napi_resolve_deferred(env, l->deferred, result);
    } else {
      napi_reject_deferred(env, l->deferred, errno_error(env, ENOMEM, "listFolder"));
    }
  } else {
    napi_reject_deferred(env, l->deferred, errno_error(env, l->err ? l->err : EIO, l->failed_call ? l->failed_call : "listFolder"));
  }
  napi_delete_async_work(env, l->work);
  if (l->parent_ref) napi_delete_reference(env, l->parent_ref);
  free_listing(l);
}

/* listFolder(fd, parent?: Buffer, racySince?: bigint | null) */
static napi_value list_folder(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], promise, resource_name;
  int32_t fd;
  bool has_parent = false;
  char *parent = NULL;
  size_t parent_length = 0;
  int64_t racy_since = INT64_MAX;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      (argc >= 2 && (napi_is_buffer(env, argv[1], &has_parent) != napi_ok)) ||
      (has_parent && napi_get_buffer_info(env, argv[1], (void **)&parent, &parent_length) != napi_ok)) {
    napi_throw_type_error(env, NULL, "listFolder(fd: number, parent?: Buffer, racySince?: bigint | null)");
    return NULL;
  }
  if (has_parent && argc >= 3) {
    napi_valuetype racy_type;
    bool lossless;
    if (napi_typeof(env, argv[2], &racy_type) == napi_ok && racy_type == napi_bigint) napi_get_value_bigint_int64(env, argv[2], &racy_since, &lossless);
  }
  struct listing *l = calloc(1, sizeof *l);
  if (!l) return cvat_throw_errno(env, ENOMEM, "listFolder");
  /* The parent's bytes are read on the pool: a reference keeps the Buffer (and its memory) alive. */
  if (has_parent && napi_create_reference(env, argv[1], 1, &l->parent_ref) != napi_ok) {
    free(l);
    return cvat_throw_errno(env, ENOMEM, "listFolder");
  }
  l->parent = has_parent ? (parent ? parent : "") : NULL;
  l->parent_length = parent_length;
  l->racy_since = racy_since;
  /* A reference of our own, made now: it stays this folder whatever `fd` becomes. The pool thread
   * opens a description of its own through it (its offset is ours), which costs this thread a
   * path lookup less. */
  l->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (l->fd < 0) {
    int err = errno;
    if (l->parent_ref) napi_delete_reference(env, l->parent_ref);
    free(l);
    return cvat_throw_errno(env, err, "dup");
  }
  napi_create_string_utf8(env, "cvat_listFolder", NAPI_AUTO_LENGTH, &resource_name);
  if (napi_create_promise(env, &l->deferred, &promise) != napi_ok ||
      napi_create_async_work(env, NULL, resource_name, list_execute, list_complete, l, &l->work) != napi_ok || napi_queue_async_work(env, l->work) != napi_ok) {
    if (l->parent_ref) napi_delete_reference(env, l->parent_ref);
    free_listing(l);
    return cvat_throw_errno(env, EIO, "listFolder");
  }
  return promise;
}

static int get_u64(napi_env env, napi_value value, uint64_t *out) {
  char digits[32];
  size_t n;
  if (napi_get_value_string_latin1(env, value, digits, sizeof digits, &n) != napi_ok || n == 0 || n >= sizeof digits - 1) return 0;
  char *end;
  errno = 0;
  *out = strtoull(digits, &end, 10);
  return errno == 0 && *end == 0;
}

static napi_value changed(napi_env env, const char *name, size_t length) {
  char message[300];
  snprintf(message, sizeof message, "'%.*s' changed while it was read", (int)(length > 200 ? 200 : length), name);
  napi_value msg, error, code;
  napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &msg);
  napi_create_error(env, NULL, msg, &error);
  napi_create_string_utf8(env, "ECHANGED", NAPI_AUTO_LENGTH, &code);
  napi_set_named_property(env, error, "code", code);
  napi_throw(env, error);
  return NULL;
}

/* openListed(dirfd, name: Buffer, dev: string, ino: string, folder: boolean): number */
static napi_value open_listed(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  int32_t dirfd;
  char *name;
  size_t length;
  uint64_t dev, ino;
  bool folder;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 5 || napi_get_value_int32(env, argv[0], &dirfd) != napi_ok ||
      napi_get_buffer_info(env, argv[1], (void **)&name, &length) != napi_ok || !get_u64(env, argv[2], &dev) || !get_u64(env, argv[3], &ino) ||
      napi_get_value_bool(env, argv[4], &folder) != napi_ok) {
    napi_throw_type_error(env, NULL, "openListed(dirfd: number, name: Buffer, dev: string, ino: string, folder: boolean)");
    return NULL;
  }
  char component[NAME_MAX + 1];
  /* One path component only (as beneath.ts's isComponent). */
  if (length == 0 || length > NAME_MAX || memchr(name, '/', length) || memchr(name, 0, length) ||
      (name[0] == '.' && (length == 1 || (length == 2 && name[1] == '.')))) {
    return cvat_throw_errno(env, EINVAL, "openListed");
  }
  memcpy(component, name, length);
  component[length] = 0;
  /* A folder: O_DIRECTORY refuses anything else before opening it, O_NOFOLLOW a link. A file:
   * O_PATH opens nothing (no device side effect, no FIFO wait) until it is checked. */
  int fd = openat(dirfd, component, folder ? O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC : O_PATH | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return cvat_throw_errno(env, errno, "openat");
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int err = errno;
    close(fd);
    return cvat_throw_errno(env, err, "fstat");
  }
  if ((folder ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode)) || st.st_dev != dev || st.st_ino != ino) {
    close(fd);
    return changed(env, component, length);
  }
  int opened = fd;
  if (!folder) {
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
    opened = open(self, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    int err = errno;
    close(fd);
    if (opened < 0) return cvat_throw_errno(env, err, "open");
  }
  napi_value result;
  napi_create_int32(env, opened, &result);
  return result;
}

/*
 * sameAsParent(text, textEnds, nums, parent: Buffer, racySince: bigint | null): Uint32Array | null
 *
 * Whether a folder's listing is, entry by entry, its parent tree (the JSON of the parent snapshot's
 * tree of that folder) as the archiver would write it again: each entry a file with one link whose
 * node in the parent, at the same position, is byte for byte `{"name":..,"type":"file",...,"size":N,`
 * for what was listed, followed by its "content" and nothing else, or a folder likewise followed
 * by its "subtree"; and the parent has no other node. A file whose mtime or ctime is at or after
 * racySince does not count as the same. Returns the start and end offsets of every node's text in
 * `parent` (two per entry), or null (the archiver then compares node by node).
 */
static int expect(const char *p, size_t length, size_t *at, const char *what, size_t n) {
  if (*at + n > length || memcmp(p + *at, what, n) != 0) return 0;
  *at += n;
  return 1;
}

static napi_value same_as_parent(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5], null_value;
  napi_get_null(env, &null_value);
  char *text, *parent;
  size_t text_length, parent_length, ends_length, nums_length;
  void *ends_data, *nums_data;
  napi_typedarray_type ends_type, nums_type;
  int64_t racy_since = INT64_MAX;
  napi_valuetype racy_type;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 5 || napi_get_buffer_info(env, argv[0], (void **)&text, &text_length) != napi_ok ||
      napi_get_typedarray_info(env, argv[1], &ends_type, &ends_length, &ends_data, NULL, NULL) != napi_ok || ends_type != napi_uint32_array ||
      napi_get_typedarray_info(env, argv[2], &nums_type, &nums_length, &nums_data, NULL, NULL) != napi_ok || nums_type != napi_float64_array ||
      napi_get_buffer_info(env, argv[3], (void **)&parent, &parent_length) != napi_ok || napi_typeof(env, argv[4], &racy_type) != napi_ok ||
      ends_length % TEXTS != 0 || nums_length != ends_length / TEXTS * NUMS) {
    napi_throw_type_error(env, NULL, "sameAsParent(text, textEnds, nums, parent, racySince)");
    return NULL;
  }
  if (racy_type == napi_bigint) {
    bool lossless;
    napi_get_value_bigint_int64(env, argv[4], &racy_since, &lossless);
  }
  uint32_t *offsets = compare_with_parent(text, ends_data, nums_data, ends_length / TEXTS, parent, parent_length, racy_since);
  napi_value result = null_value;
  if (offsets && typed_array(env, napi_uint32_array, offsets, ends_length / TEXTS * 2, 4, &result) != napi_ok) result = null_value;
  free(offsets);
  return result;
}

/*
 * A decimal field of the listing's text (`n` bytes: the fields are back to back, with no end
 * mark, so strtoll would run into the next one). INT64_MAX when it does not fit: racy.
 */
static int64_t parse_ns(const char *p, size_t n) {
  int negative = n > 0 && p[0] == '-';
  int64_t v = 0;
  for (size_t i = negative; i < n; i++) {
    if (p[i] < '0' || p[i] > '9' || v > (INT64_MAX - 9) / 10) return INT64_MAX;
    v = v * 10 + (p[i] - '0');
  }
  return negative ? -v : v;
}

/* The offsets of sameAsParent (malloc'ed, the caller frees them), or NULL. No Node-API: also runs on the pool. */
static uint32_t *compare_with_parent(const char *text, const uint32_t *ends, const double *nums, size_t count, const char *parent, size_t parent_length, int64_t racy_since) {
  uint32_t *offsets = malloc((count * 2 + 1) * sizeof *offsets);
  if (!offsets) return NULL;
  size_t at = 0;
  int same = parent_length < UINT32_MAX && expect(parent, parent_length, &at, "{\"nodes\":[", 10);
  for (size_t i = 0; same && i < count; i++) {
    const double *n = nums + i * NUMS;
    const uint32_t *e = ends + i * TEXTS;
    uint32_t t0 = i == 0 ? 0 : ends[i * TEXTS - 1];
    int is_file = ((mode_t)n[0] & S_IFMT) == S_IFREG, is_dir = ((mode_t)n[0] & S_IFMT) == S_IFDIR;
    if (n[6] != 0 || !(is_dir || (is_file && n[4] == 1))) {
      same = 0;
      break;
    }
    if (is_file && racy_since != INT64_MAX) {
      int64_t mtime = parse_ns(text + e[0], e[1] - e[0]), ctime = parse_ns(text + e[1], e[2] - e[1]);
      if (mtime >= racy_since || ctime >= racy_since) {
        same = 0;
        break;
      }
    }
    /* The node's text up to its content or subtree, compared piece by piece (no formatting of a
     * prefix: this runs for every entry). */
    if (i > 0 && !expect(parent, parent_length, &at, ",", 1)) {
      same = 0;
      break;
    }
    offsets[i * 2] = (uint32_t)at;
    char d[24], *end = d + sizeof d, *p;
#define PIECE(s, n) (same = same && expect(parent, parent_length, &at, (s), (n)))
#define LITERAL(s) PIECE(s, sizeof(s) - 1)
#define NUMBER(v) (p = decimal(end, (v)), PIECE(p, (size_t)(end - p)))
    LITERAL("{\"name\":\"");
    PIECE(text + t0, e[0] - t0);
    if (is_file) LITERAL("\",\"type\":\"file\",\"mode\":");
    else LITERAL("\",\"type\":\"dir\",\"mode\":");
    NUMBER((uint64_t)((mode_t)n[0] & 07777));
    LITERAL(",\"uid\":");
    NUMBER((uint64_t)n[1]);
    LITERAL(",\"gid\":");
    NUMBER((uint64_t)n[2]);
    LITERAL(",\"mtimeNs\":\"");
    PIECE(text + e[0], e[1] - e[0]);
    LITERAL("\",\"ctimeNs\":\"");
    PIECE(text + e[1], e[2] - e[1]);
    LITERAL("\",\"inode\":\"");
    PIECE(text + e[2], e[3] - e[2]);
    LITERAL("\",\"size\":");
    NUMBER(is_file ? (uint64_t)n[3] : 0);
    if (is_file) LITERAL(",\"content\":[");
    else LITERAL(",\"subtree\":\"");
#undef NUMBER
#undef LITERAL
#undef PIECE
    if (!same) break;
    /* Chunk ids and a subtree id hold no ']' or '"'. */
    const char *close = memchr(parent + at, is_file ? ']' : '"', parent_length - at);
    if (!close) {
      same = 0;
      break;
    }
    at = (size_t)(close - parent) + 1;
    same = expect(parent, parent_length, &at, "}", 1);
    offsets[i * 2 + 1] = (uint32_t)at;
  }
  if (same) same = expect(parent, parent_length, &at, "]}", 2) && at == parent_length;
  if (!same) {
    free(offsets);
    return NULL;
  }
  return offsets;
}

napi_status cvat_register_walk(napi_env env, napi_value exports) {
  napi_property_descriptor properties[] = {
      {"listFolder", NULL, list_folder, NULL, NULL, NULL, napi_default, NULL},
      {"openListed", NULL, open_listed, NULL, NULL, NULL, napi_default, NULL},
      {"sameAsParent", NULL, same_as_parent, NULL, NULL, NULL, napi_default, NULL},
  };
  return napi_define_properties(env, exports, sizeof properties / sizeof *properties, properties);
}
