/*
 * fanotify: the change journal of issue 10 (src/fs/fanotify-journal.ts is its JavaScript side).
 *
 * One fanotify group per journal, one FAN_MARK_FILESYSTEM mark per distinct filesystem of the
 * volume roots, events reported as (directory file handle, name) (FAN_REPORT_DFID_NAME): no watch
 * per folder, so no race with folders created while the journal runs. A reader thread drains the
 * group's queue continuously (FAN_MODIFY fires on every write()), drops this process's own events
 * (our repository may sit on the same filesystem) and folds the rest into a set of distinct
 * (directory, name) pairs. Directories outside every volume root are dropped the first time they
 * are seen (their handle is resolved to a path once and the verdict cached): a filesystem mark sees
 * the whole filesystem (Docker's own files, logs, other programs). That verdict is safe at any
 * moment: a folder moved into a volume later shows up as a MOVED_TO in the volume, which the
 * JavaScript side turns into a full walk of that folder.
 *
 * collect() (async, in libuv's pool) reads the queue up to "now" under the lock the reader takes
 * around every read-and-fold, so every event the stopped writers produced is folded, then maps
 * each directory handle to its current path (open_by_handle_at + readlink of /proc/self/fd/N). A
 * folder deleted since (ESTALE, or no links left) is dropped: its removal shows in its parent.
 *
 * Past `maxEntries` distinct folders + names, or on FAN_Q_OVERFLOW, the journal is overflowed: it
 * frees its sets, keeps draining the queue, and collect() reports why.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/fanotify.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include "addon.h"

#define EVENT_MASK \
  (FAN_MODIFY | FAN_ATTRIB | FAN_CREATE | FAN_DELETE | FAN_MOVED_FROM | FAN_MOVED_TO | FAN_ONDIR)
#define LISTING_EVENTS (FAN_CREATE | FAN_DELETE | FAN_MOVED_FROM | FAN_MOVED_TO)
#define READ_BUFFER (256 * 1024)
/* Pause between two drains of the queue (collect() drains it itself, so this delays nothing). */
#define READ_PAUSE_MS 20
/* Cached "outside every volume" verdicts are forgotten past this many (they are only a cache). */
#define MAX_OUTSIDE_DIRS 65536

/* name flags */
#define NAME_NEW_FOLDER 1 /* a folder was created or moved in under this name */

typedef struct {
  uint64_t hash;
  uint32_t len;
  uint32_t flags;
  char name[];
} name_entry;

/* dir flags */
#define DIR_INSIDE 1   /* under a volume root (else outside: events dropped) */
#define DIR_SELF 2     /* the folder's own metadata changed (event named ".") */
#define DIR_LISTING 4  /* entries were created, deleted or renamed in it */

typedef struct {
  uint64_t hash;
  int fs;         /* index into journal.fs */
  int view;       /* index into journal.views it was last found inside through, or -1 */
  uint32_t flags;
  name_entry **names; /* open addressing, capacity names_cap (power of 2) */
  uint32_t nnames, names_cap;
  struct file_handle fh; /* followed by fh.handle_bytes bytes */
} dir_entry;

typedef struct {
  __kernel_fsid_t fsid; /* events name their filesystem by it */
} watched_fs;

/* A mount of a watched filesystem that holds volume roots: a handle resolved through it reads as a
 * path under that mount, comparable with those roots' paths (a bind mount of a subfolder, e.g.
 * Docker's data root bound elsewhere, names the same folders differently). */
typedef struct {
  int fs;
  int mount_id;
  int mount_fd; /* the first root seen on that mount */
} mount_view;

typedef struct {
  char *path; /* realpath, no trailing slash except "/" */
  size_t len;
  int view; /* -1: not watched */
} volume_root;

typedef struct journal {
  int fan_fd, wake_fd;
  pid_t own_pid;
  pthread_t thread;
  int thread_started;
  atomic_int stopping;
  atomic_int reader_tid;
  pthread_mutex_t lock;
  int closed;
  napi_env env;

  watched_fs *fs;
  int nfs;
  mount_view *views;
  int nviews;
  volume_root *roots;
  int nroots;

  dir_entry **dirs; /* open addressing */
  size_t dirs_cap, ndirs, noutside;
  size_t entries, max_entries; /* inside dirs + names */
  size_t bytes;                /* heap held by the sets */
  char overflow[160];          /* '' = not overflowed */

  uint64_t events, own_events, outside_events, resolutions;
  char *buffer;
} journal;

/* ---- hashing and sets ------------------------------------------------------------------- */

static uint64_t hash_bytes(uint64_t h, const void *data, size_t len) {
  const unsigned char *p = data;
  for (size_t i = 0; i < len; i++) {
    h ^= p[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

static uint64_t dir_hash(const __kernel_fsid_t *fsid, const struct file_handle *fh) {
  uint64_t h = 0xcbf29ce484222325ULL;
  h = hash_bytes(h, fsid, sizeof *fsid);
  h = hash_bytes(h, &fh->handle_type, sizeof fh->handle_type);
  return hash_bytes(h, fh->f_handle, fh->handle_bytes);
}

static void free_dir(journal *j, dir_entry *d) {
  for (uint32_t i = 0; i < d->names_cap; i++) {
    if (d->names[i]) {
      j->bytes -= sizeof(name_entry) + d->names[i]->len + 1;
      free(d->names[i]);
    }
  }
  j->bytes -= d->names_cap * sizeof(name_entry *) + sizeof(dir_entry) + d->fh.handle_bytes;
  free(d->names);
  free(d);
}

static void free_sets(journal *j) {
  for (size_t i = 0; i < j->dirs_cap; i++)
    if (j->dirs[i]) free_dir(j, j->dirs[i]);
  j->bytes -= j->dirs_cap * sizeof(dir_entry *);
  free(j->dirs);
  j->dirs = NULL;
  j->dirs_cap = j->ndirs = j->noutside = j->entries = 0;
}

static void set_overflow(journal *j, const char *why) {
  if (j->overflow[0]) return;
  snprintf(j->overflow, sizeof j->overflow, "%s", why);
  free_sets(j);
}

/* Rebuilds the folder table at `cap`, leaving out the "outside" verdicts when `drop_outside`. */
static int rehash_dirs(journal *j, size_t cap, int drop_outside) {
  dir_entry **table = calloc(cap, sizeof *table);
  if (!table) return -1;
  for (size_t i = 0; i < j->dirs_cap; i++) {
    dir_entry *d = j->dirs[i];
    if (!d) continue;
    if (drop_outside && !(d->flags & DIR_INSIDE)) {
      free_dir(j, d);
      j->ndirs--;
      continue;
    }
    size_t k = d->hash & (cap - 1);
    while (table[k]) k = (k + 1) & (cap - 1);
    table[k] = d;
  }
  j->bytes += cap * sizeof *table;
  j->bytes -= j->dirs_cap * sizeof *table;
  free(j->dirs);
  j->dirs = table;
  j->dirs_cap = cap;
  if (drop_outside) j->noutside = 0;
  return 0;
}

/* Path of a folder handle through a view's mount: 0, -ESTALE when the folder is gone, -errno. */
static int resolve_path(journal *j, int view, struct file_handle *fh, char *path, size_t size) {
  j->resolutions++;
  int fd = open_by_handle_at(j->views[view].mount_fd, fh, O_PATH | O_CLOEXEC);
  if (fd < 0) return errno == ESTALE || errno == ENOENT ? -ESTALE : -errno;
  struct stat st;
  if (fstat(fd, &st) != 0 || st.st_nlink == 0) {
    close(fd);
    return -ESTALE;
  }
  char link[64];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, path, size - 1);
  int err = n < 0 ? errno : 0;
  close(fd);
  if (n < 0) return -err;
  if ((size_t)n >= size - 1) return -ENAMETOOLONG;
  path[n] = 0;
  return 0;
}

/* The deepest volume root (seen through `view`) that `path` lies in, or -1. */
static int root_of(const journal *j, int view, const char *path) {
  size_t len = strlen(path);
  int found = -1;
  for (int i = 0; i < j->nroots; i++) {
    const volume_root *r = &j->roots[i];
    if (r->view != view || (found >= 0 && j->roots[found].len >= r->len)) continue;
    if (r->len == 1 || (len >= r->len && memcmp(path, r->path, r->len) == 0 && (len == r->len || path[r->len] == '/'))) found = i;
  }
  return found;
}

/*
 * Where a folder is now: 0 = inside a volume (`path` set, through d->view), 1 = outside every
 * volume, -ESTALE = gone, -errno = cannot tell. Tries the view it was last found through first.
 */
static int locate_dir(journal *j, dir_entry *d, char *path, size_t size, int *root) {
  int err = 0;
  for (int pass = 0; pass < 2; pass++) {
    for (int v = 0; v < j->nviews; v++) {
      if (j->views[v].fs != d->fs || (pass == 0) != (v == d->view)) continue;
      int r = resolve_path(j, v, &d->fh, path, size);
      if (r == -ESTALE) return r; /* the inode is gone, whatever the mount */
      if (r < 0) {
        err = r;
      } else if ((*root = root_of(j, v, path)) >= 0) {
        d->view = v;
        return 0;
      }
    }
  }
  return err ? err : 1;
}

static dir_entry *find_or_add_dir(journal *j, int fs, const __kernel_fsid_t *fsid, const struct file_handle *fh) {
  uint64_t h = dir_hash(fsid, fh);
  if (j->dirs_cap) {
    size_t k = h & (j->dirs_cap - 1);
    for (dir_entry *d; (d = j->dirs[k]); k = (k + 1) & (j->dirs_cap - 1)) {
      if (d->hash == h && d->fs == fs && d->fh.handle_type == fh->handle_type &&
          d->fh.handle_bytes == fh->handle_bytes && memcmp(d->fh.f_handle, fh->f_handle, fh->handle_bytes) == 0)
        return d;
    }
  }
  if (j->noutside >= MAX_OUTSIDE_DIRS && rehash_dirs(j, j->dirs_cap, 1) != 0) return NULL;
  if ((j->ndirs + 1) * 2 > j->dirs_cap && rehash_dirs(j, j->dirs_cap ? j->dirs_cap * 2 : 64, 0) != 0) return NULL;
  dir_entry *d = calloc(1, sizeof *d + fh->handle_bytes);
  if (!d) return NULL;
  d->hash = h;
  d->fs = fs;
  d->view = -1;
  d->fh.handle_bytes = fh->handle_bytes;
  d->fh.handle_type = fh->handle_type;
  memcpy(d->fh.f_handle, fh->f_handle, fh->handle_bytes);
  char path[PATH_MAX];
  int root;
  int r = locate_dir(j, d, path, sizeof path, &root);
  /* Unresolvable for another reason than "gone": keep it, collect() resolves it again. */
  if (r == 0 || (r < 0 && r != -ESTALE)) d->flags |= DIR_INSIDE;
  size_t k = h & (j->dirs_cap - 1);
  while (j->dirs[k]) k = (k + 1) & (j->dirs_cap - 1);
  j->dirs[k] = d;
  j->ndirs++;
  j->bytes += sizeof *d + fh->handle_bytes;
  if (d->flags & DIR_INSIDE) j->entries++;
  else j->noutside++;
  return d;
}

static int add_name(journal *j, dir_entry *d, const char *name, size_t len, uint32_t flags) {
  uint64_t h = hash_bytes(0xcbf29ce484222325ULL, name, len);
  if (d->names_cap) {
    size_t k = h & (d->names_cap - 1);
    for (name_entry *e; (e = d->names[k]); k = (k + 1) & (d->names_cap - 1)) {
      if (e->hash == h && e->len == len && memcmp(e->name, name, len) == 0) {
        e->flags |= flags;
        return 0;
      }
    }
  }
  if ((d->nnames + 1) * 2 > d->names_cap) {
    uint32_t cap = d->names_cap ? d->names_cap * 2 : 4;
    name_entry **table = calloc(cap, sizeof *table);
    if (!table) return -1;
    for (uint32_t i = 0; i < d->names_cap; i++) {
      name_entry *e = d->names[i];
      if (!e) continue;
      size_t k = e->hash & (cap - 1);
      while (table[k]) k = (k + 1) & (cap - 1);
      table[k] = e;
    }
    j->bytes += (cap - d->names_cap) * sizeof *table;
    free(d->names);
    d->names = table;
    d->names_cap = cap;
  }
  name_entry *e = malloc(sizeof *e + len + 1);
  if (!e) return -1;
  e->hash = h;
  e->len = (uint32_t)len;
  e->flags = flags;
  memcpy(e->name, name, len);
  e->name[len] = 0;
  size_t k = h & (d->names_cap - 1);
  while (d->names[k]) k = (k + 1) & (d->names_cap - 1);
  d->names[k] = e;
  d->nnames++;
  j->entries++;
  j->bytes += sizeof *e + len + 1;
  return 0;
}

/* ---- events ------------------------------------------------------------------------------ */

static void fold_event(journal *j, const struct fanotify_event_metadata *m) {
  j->events++;
  if (m->fd >= 0) close(m->fd); /* not with FID reporting, but never leak one */
  if (m->mask & FAN_Q_OVERFLOW) {
    set_overflow(j, "the kernel's fanotify queue overflowed");
    return;
  }
  if (m->pid == j->own_pid) {
    j->own_events++;
    return;
  }
  if (j->overflow[0]) return;
  const char *p = (const char *)m + m->metadata_len, *end = (const char *)m + m->event_len;
  while (p + sizeof(struct fanotify_event_info_header) <= end) {
    const struct fanotify_event_info_header *hdr = (const void *)p;
    if (hdr->len < sizeof *hdr || p + hdr->len > end) break;
    if (hdr->info_type == FAN_EVENT_INFO_TYPE_DFID_NAME || hdr->info_type == FAN_EVENT_INFO_TYPE_DFID) {
      const struct fanotify_event_info_fid *fid = (const void *)p;
      const struct file_handle *fh = (const void *)fid->handle;
      const char *after = (const char *)fh->f_handle + fh->handle_bytes;
      if ((const char *)fh->f_handle > p + hdr->len || after > p + hdr->len) break;
      int fs = -1;
      for (int i = 0; i < j->nfs; i++)
        if (memcmp(&j->fs[i].fsid, &fid->fsid, sizeof fid->fsid) == 0) fs = i;
      if (fs < 0) return; /* not a filesystem we marked */
      dir_entry *d = find_or_add_dir(j, fs, &fid->fsid, fh);
      if (!d) {
        set_overflow(j, "out of memory");
        return;
      }
      if (!(d->flags & DIR_INSIDE)) {
        j->outside_events++;
        return;
      }
      size_t len = 0;
      if (hdr->info_type == FAN_EVENT_INFO_TYPE_DFID_NAME) len = strnlen(after, (size_t)(p + hdr->len - after));
      if (m->mask & LISTING_EVENTS) d->flags |= DIR_LISTING;
      if (len == 0 || (len == 1 && after[0] == '.')) {
        d->flags |= DIR_SELF; /* an event on the folder itself */
      } else {
        uint32_t flags = (m->mask & FAN_ONDIR) && (m->mask & (FAN_CREATE | FAN_MOVED_TO)) ? NAME_NEW_FOLDER : 0;
        if (add_name(j, d, after, len, flags) != 0) {
          set_overflow(j, "out of memory");
          return;
        }
      }
      if (j->entries > j->max_entries) {
        char why[160];
        snprintf(why, sizeof why, "more than %zu changed entries (the journal's memory bound)", j->max_entries);
        set_overflow(j, why);
      }
      return;
    }
    p += hdr->len;
  }
}

/* Reads and folds one batch; the caller holds the lock. 1 = more may be queued, 0 = empty, -errno. */
static int drain_batch(journal *j) {
  ssize_t n = read(j->fan_fd, j->buffer, READ_BUFFER);
  if (n < 0) return errno == EAGAIN ? 0 : errno == EINTR ? 1 : -errno;
  if (n == 0) return 0;
  const struct fanotify_event_metadata *m = (const void *)j->buffer;
  for (; FAN_EVENT_OK(m, n); m = FAN_EVENT_NEXT(m, n)) {
    if (m->vers != FANOTIFY_METADATA_VERSION) {
      set_overflow(j, "unexpected fanotify event format");
      continue;
    }
    fold_event(j, m);
  }
  return 1;
}

static void *reader(void *arg) {
  journal *j = arg;
  atomic_store(&j->reader_tid, (int)syscall(SYS_gettid));
  struct pollfd fds[2] = {{.fd = j->fan_fd, .events = POLLIN}, {.fd = j->wake_fd, .events = POLLIN}};
  while (!atomic_load(&j->stopping)) {
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (fds[1].revents) break;
    int r;
    do {
      pthread_mutex_lock(&j->lock);
      r = j->closed ? 0 : drain_batch(j);
      if (r < 0) set_overflow(j, "reading the fanotify queue failed");
      pthread_mutex_unlock(&j->lock);
    } while (r > 0 && !atomic_load(&j->stopping));
    /* Let events gather before the next read: the kernel merges repeated writes to one file while
     * they wait in the queue, and the writers are not woken into a reader on every write(). */
    if (poll(&fds[1], 1, READ_PAUSE_MS) > 0) break;
  }
  return NULL;
}

/* ---- lifetime ---------------------------------------------------------------------------- */

static void close_journal(journal *j) {
  if (j->thread_started) {
    atomic_store(&j->stopping, 1);
    uint64_t one = 1;
    ssize_t ignored = write(j->wake_fd, &one, sizeof one);
    (void)ignored;
    pthread_join(j->thread, NULL);
    j->thread_started = 0;
  }
  pthread_mutex_lock(&j->lock);
  if (!j->closed) {
    j->closed = 1;
    if (j->fan_fd >= 0) close(j->fan_fd);
    if (j->wake_fd >= 0) close(j->wake_fd);
    j->fan_fd = j->wake_fd = -1;
    for (int i = 0; i < j->nviews; i++) close(j->views[i].mount_fd);
    j->nviews = j->nfs = 0;
    free_sets(j);
    free(j->buffer);
    j->buffer = NULL;
  }
  pthread_mutex_unlock(&j->lock);
}

static void cleanup_hook(void *arg) { close_journal(arg); }

static void finalize_journal(napi_env env, void *data, void *hint) {
  (void)hint;
  journal *j = data;
  if (!j->closed) napi_remove_env_cleanup_hook(env, cleanup_hook, j);
  close_journal(j);
  for (int i = 0; i < j->nroots; i++) free(j->roots[i].path);
  free(j->roots);
  free(j->fs);
  free(j->views);
  pthread_mutex_destroy(&j->lock);
  free(j);
}

/* ---- JavaScript functions ---------------------------------------------------------------- */

#define CHECK(call) \
  do { \
    if ((call) != napi_ok) return NULL; \
  } while (0)

static napi_value throw_type(napi_env env, const char *message) {
  napi_throw_type_error(env, NULL, message);
  return NULL;
}

static journal *get_journal(napi_env env, napi_value value) {
  void *data = NULL;
  if (napi_get_value_external(env, value, &data) != napi_ok || !data) {
    throw_type(env, "expected a fanotify journal");
    return NULL;
  }
  return data;
}

static napi_value error_object(napi_env env, int err, const char *syscall) {
  napi_value obj, code, message;
  char text[200];
  snprintf(text, sizeof text, "%s: %s", syscall, strerror(err));
  const char *name = strerrorname_np(err);
  napi_create_object(env, &obj);
  napi_create_string_utf8(env, name ? name : "EUNKNOWN", NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &message);
  napi_set_named_property(env, obj, "code", code);
  napi_set_named_property(env, obj, "message", message);
  return obj;
}

static int get_bool(napi_env env, napi_value obj, const char *key, int fallback) {
  napi_value v;
  bool b;
  if (napi_get_named_property(env, obj, key, &v) != napi_ok || napi_get_value_bool(env, v, &b) != napi_ok) return fallback;
  return b;
}

/*
 * fanotifyStart(roots: Buffer[] (real paths), options: { maxEntries: number, unlimitedQueue?: boolean,
 *   reader?: boolean }) -> { journal: External, errors: Array<null | { code, message }> }.
 * Throws (code = errno name) when fanotify itself is unavailable; a root whose filesystem cannot be
 * marked gets an error in `errors` and is not watched.
 */
static napi_value fanotify_start(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  bool is_array;
  if (argc < 2 || napi_is_array(env, argv[0], &is_array) != napi_ok || !is_array) return throw_type(env, "fanotifyStart(roots, options)");
  uint32_t nroots;
  CHECK(napi_get_array_length(env, argv[0], &nroots));
  napi_value v;
  double max_entries = 0;
  if (napi_get_named_property(env, argv[1], "maxEntries", &v) != napi_ok || napi_get_value_double(env, v, &max_entries) != napi_ok || max_entries < 1)
    return throw_type(env, "options.maxEntries must be a positive number");
  int unlimited = get_bool(env, argv[1], "unlimitedQueue", 1);
  int start_reader = get_bool(env, argv[1], "reader", 1);

  journal *j = calloc(1, sizeof *j);
  if (!j) return cvat_throw_errno(env, ENOMEM, "calloc");
  j->fan_fd = j->wake_fd = -1;
  j->own_pid = getpid();
  j->max_entries = (size_t)max_entries;
  j->env = env;
  pthread_mutex_init(&j->lock, NULL);
  j->roots = calloc(nroots ? nroots : 1, sizeof *j->roots);
  j->fs = calloc(nroots ? nroots : 1, sizeof *j->fs);
  j->views = calloc(nroots ? nroots : 1, sizeof *j->views);
  j->buffer = malloc(READ_BUFFER);
  napi_value errors;
  napi_create_array_with_length(env, nroots, &errors);
  int failed_errno = 0;
  const char *failed_call = NULL;
  if (!j->roots || !j->fs || !j->views || !j->buffer) {
    failed_errno = ENOMEM;
    failed_call = "malloc";
    goto fail;
  }
  unsigned int flags = FAN_CLASS_NOTIF | FAN_REPORT_DFID_NAME | FAN_NONBLOCK | FAN_CLOEXEC | (unlimited ? FAN_UNLIMITED_QUEUE : 0);
  j->fan_fd = fanotify_init(flags, O_RDONLY | O_CLOEXEC | O_LARGEFILE);
  if (j->fan_fd < 0) {
    failed_errno = errno;
    failed_call = "fanotify_init";
    goto fail;
  }
  j->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (j->wake_fd < 0) {
    failed_errno = errno;
    failed_call = "eventfd";
    goto fail;
  }
  for (uint32_t i = 0; i < nroots; i++) {
    napi_value item, error;
    napi_get_null(env, &error);
    void *data;
    size_t len;
    CHECK(napi_get_element(env, argv[0], i, &item));
    if (napi_get_buffer_info(env, item, &data, &len) != napi_ok || len == 0 || len >= PATH_MAX) {
      close_journal(j);
      finalize_journal(env, j, NULL);
      return throw_type(env, "roots must be non-empty Buffers");
    }
    char *path = malloc(len + 1);
    memcpy(path, data, len);
    path[len] = 0;
    j->roots[j->nroots].path = path;
    j->roots[j->nroots].len = len;
    j->nroots++;
    j->roots[j->nroots - 1].view = -1;
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    struct statfs sfs;
    struct {
      struct file_handle fh;
      unsigned char bytes[MAX_HANDLE_SZ];
    } probe;
    probe.fh.handle_bytes = MAX_HANDLE_SZ;
    int mount_id = -1;
    if (fd < 0) {
      error = error_object(env, errno, "open");
    } else if (fstatfs(fd, &sfs) != 0) {
      error = error_object(env, errno, "fstatfs");
    } else if (name_to_handle_at(fd, "", &probe.fh, &mount_id, AT_EMPTY_PATH) != 0) {
      error = error_object(env, errno, "name_to_handle_at");
    } else {
      int fs = -1, view = -1;
      for (int k = 0; k < j->nfs; k++)
        if (memcmp(&j->fs[k].fsid, &sfs.f_fsid, sizeof sfs.f_fsid) == 0) fs = k;
      if (fs < 0) {
        if (fanotify_mark(j->fan_fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, EVENT_MASK, fd, NULL) != 0) {
          error = error_object(env, errno, "fanotify_mark");
        } else {
          fs = j->nfs++;
          memcpy(&j->fs[fs].fsid, &sfs.f_fsid, sizeof sfs.f_fsid);
        }
      }
      if (fs >= 0) {
        for (int k = 0; k < j->nviews; k++)
          if (j->views[k].fs == fs && j->views[k].mount_id == mount_id) view = k;
        if (view < 0) {
          view = j->nviews++;
          j->views[view].fs = fs;
          j->views[view].mount_id = mount_id;
          j->views[view].mount_fd = fd;
          fd = -1; /* kept */
        }
        j->roots[j->nroots - 1].view = view;
      }
    }
    if (fd >= 0) close(fd);
    napi_set_element(env, errors, i, error);
  }
  if (start_reader) {
    if ((errno = pthread_create(&j->thread, NULL, reader, j)) != 0) {
      failed_errno = errno;
      failed_call = "pthread_create";
      goto fail;
    }
    j->thread_started = 1;
  }
  napi_add_env_cleanup_hook(env, cleanup_hook, j);
  napi_value result, external;
  CHECK(napi_create_object(env, &result));
  CHECK(napi_create_external(env, j, finalize_journal, NULL, &external));
  CHECK(napi_set_named_property(env, result, "journal", external));
  CHECK(napi_set_named_property(env, result, "errors", errors));
  return result;
fail:
  close_journal(j);
  j->closed = 1; /* no cleanup hook was added */
  finalize_journal(env, j, NULL);
  return cvat_throw_errno(env, failed_errno, failed_call);
}

/* collect()'s answer, one Buffer for all folders (not objects and Buffers per folder: a final pass
 * may see tens of thousands of folders, and this runs while CVAT is down). Per folder, integers
 * little-endian: u32 root index, u32 length + path relative to that root, u32 length + names
 * (each NUL-terminated), u32 length + the names under which a folder was created or moved in,
 * u8 flags (1: the folder's own metadata changed, 2: entries were created, deleted or renamed). */
typedef struct {
  char *data;
  size_t len, cap;
  int failed;
} out_buffer;

static void out_reserve(out_buffer *o, size_t more) {
  if (o->failed || o->len + more <= o->cap) return;
  size_t cap = o->cap ? o->cap : 65536;
  while (cap < o->len + more) cap *= 2;
  char *data = realloc(o->data, cap);
  if (!data) {
    o->failed = 1;
    return;
  }
  o->data = data;
  o->cap = cap;
}

static void out_bytes(out_buffer *o, const void *data, size_t len) {
  out_reserve(o, len);
  if (o->failed) return;
  memcpy(o->data + o->len, data, len);
  o->len += len;
}

static void out_u32(out_buffer *o, size_t value) {
  unsigned char b[4] = {(unsigned char)value, (unsigned char)(value >> 8), (unsigned char)(value >> 16), (unsigned char)(value >> 24)};
  out_bytes(o, b, 4);
}

/* The names of `d` that have all of `want_flags`, length-prefixed, each NUL-terminated. */
static void out_names(out_buffer *o, const dir_entry *d, uint32_t want_flags) {
  size_t total = 0;
  for (uint32_t i = 0; i < d->names_cap; i++) {
    const name_entry *e = d->names[i];
    if (e && (e->flags & want_flags) == want_flags) total += e->len + 1;
  }
  out_u32(o, total);
  for (uint32_t i = 0; i < d->names_cap; i++) {
    const name_entry *e = d->names[i];
    if (e && (e->flags & want_flags) == want_flags) out_bytes(o, e->name, e->len + 1);
  }
}

typedef struct {
  journal *j;
  napi_ref ref;
  napi_deferred deferred;
  napi_async_work work;
  int err;
  const char *err_call;
  char overflow[160];
  out_buffer out;
  size_t folders;
  uint64_t events, own_events, outside_events, resolutions, entries, bytes;
  double drain_ms, resolve_ms;
} collect_job;

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void collect_execute(napi_env env, void *data) {
  (void)env;
  collect_job *job = data;
  journal *j = job->j;
  pthread_mutex_lock(&j->lock);
  if (j->closed) {
    job->err = EBADF;
    job->err_call = "collect (journal closed)";
    pthread_mutex_unlock(&j->lock);
    return;
  }
  double t0 = now_ms();
  int r;
  while ((r = drain_batch(j)) > 0) {
  }
  if (r < 0) set_overflow(j, "reading the fanotify queue failed");
  double t1 = now_ms();
  job->drain_ms = t1 - t0;
  if (j->overflow[0]) {
    snprintf(job->overflow, sizeof job->overflow, "%s", j->overflow);
  } else {
    char path[PATH_MAX];
    for (size_t i = 0; i < j->dirs_cap; i++) {
      dir_entry *d = j->dirs[i];
      if (!d || !(d->flags & DIR_INSIDE) || (d->nnames == 0 && !(d->flags & (DIR_SELF | DIR_LISTING)))) continue;
      int root;
      int where = locate_dir(j, d, path, sizeof path, &root);
      if (where == 1 || where == -ESTALE) continue; /* moved out of the volumes, or deleted */
      if (where < 0) {
        snprintf(job->overflow, sizeof job->overflow, "a changed folder's path cannot be read: %s", strerror(-where));
        break;
      }
      const volume_root *r = &j->roots[root];
      size_t skip = r->len == 1 ? 1 : r->len + 1; /* the root and its slash */
      size_t len = strlen(path);
      size_t rel = len > skip ? len - skip : 0;
      out_u32(&job->out, (size_t)root);
      out_u32(&job->out, rel);
      out_bytes(&job->out, path + len - rel, rel);
      out_names(&job->out, d, 0);
      out_names(&job->out, d, NAME_NEW_FOLDER);
      unsigned char flags = (d->flags & DIR_SELF ? 1 : 0) | (d->flags & DIR_LISTING ? 2 : 0);
      out_bytes(&job->out, &flags, 1);
      job->folders++;
    }
    if (job->out.failed) snprintf(job->overflow, sizeof job->overflow, "out of memory");
  }
  job->resolve_ms = now_ms() - t1;
  job->events = j->events;
  job->own_events = j->own_events;
  job->outside_events = j->outside_events;
  job->resolutions = j->resolutions;
  job->entries = j->entries;
  job->bytes = j->bytes;
  pthread_mutex_unlock(&j->lock);
}

static void free_job(collect_job *job) {
  free(job->out.data);
  free(job);
}

static napi_value make_buffer(napi_env env, const char *data, size_t len) {
  napi_value buffer;
  void *out;
  if (napi_create_buffer_copy(env, len, len ? data : "", &out, &buffer) != napi_ok) return NULL;
  return buffer;
}

static void set_number(napi_env env, napi_value obj, const char *key, double value) {
  napi_value v;
  napi_create_double(env, value, &v);
  napi_set_named_property(env, obj, key, v);
}

static void collect_complete(napi_env env, napi_status status, void *data) {
  collect_job *job = data;
  napi_value result;
  if (status != napi_ok || job->err) {
    napi_value error = error_object(env, job->err ? job->err : ECANCELED, job->err_call ? job->err_call : "collect");
    napi_reject_deferred(env, job->deferred, error);
  } else {
    napi_create_object(env, &result);
    napi_value overflow;
    napi_create_string_utf8(env, job->overflow, NAPI_AUTO_LENGTH, &overflow);
    napi_set_named_property(env, result, "overflow", overflow);
    size_t n = job->overflow[0] ? 0 : job->out.len;
    napi_set_named_property(env, result, "folders", make_buffer(env, job->out.data, n));
    set_number(env, result, "folderCount", job->overflow[0] ? 0 : (double)job->folders);
    set_number(env, result, "events", (double)job->events);
    set_number(env, result, "ownEvents", (double)job->own_events);
    set_number(env, result, "outsideEvents", (double)job->outside_events);
    set_number(env, result, "resolutions", (double)job->resolutions);
    set_number(env, result, "entries", (double)job->entries);
    set_number(env, result, "bytes", (double)job->bytes);
    set_number(env, result, "drainMs", job->drain_ms);
    set_number(env, result, "resolveMs", job->resolve_ms);
    set_number(env, result, "readerTid", atomic_load(&job->j->reader_tid));
    napi_resolve_deferred(env, job->deferred, result);
  }
  napi_delete_async_work(env, job->work);
  napi_delete_reference(env, job->ref);
  free_job(job);
}

/*
 * fanotifyCollect(journal) -> Promise<{ overflow: string ('' = none), folders: Buffer (see
 * out_buffer), folderCount, counters }>.
 */
static napi_value fanotify_collect(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 1) return throw_type(env, "fanotifyCollect(journal)");
  journal *j = get_journal(env, argv[0]);
  if (!j) return NULL;
  collect_job *job = calloc(1, sizeof *job);
  if (!job) return cvat_throw_errno(env, ENOMEM, "calloc");
  job->j = j;
  napi_value promise, name;
  CHECK(napi_create_reference(env, argv[0], 1, &job->ref));
  CHECK(napi_create_promise(env, &job->deferred, &promise));
  CHECK(napi_create_string_utf8(env, "cvat-backup:fanotify-collect", NAPI_AUTO_LENGTH, &name));
  CHECK(napi_create_async_work(env, NULL, name, collect_execute, collect_complete, job, &job->work));
  CHECK(napi_queue_async_work(env, job->work));
  return promise;
}

/* fanotifyClose(journal): stops the reader, closes the group (its marks go with it). Idempotent. */
static napi_value fanotify_close(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 1) return throw_type(env, "fanotifyClose(journal)");
  journal *j = get_journal(env, argv[0]);
  if (!j) return NULL;
  if (!j->closed) napi_remove_env_cleanup_hook(env, cleanup_hook, j);
  close_journal(j);
  return NULL;
}

napi_status cvat_register_fanotify(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"fanotifyStart", NULL, fanotify_start, NULL, NULL, NULL, napi_default, NULL},
      {"fanotifyCollect", NULL, fanotify_collect, NULL, NULL, NULL, napi_default, NULL},
      {"fanotifyClose", NULL, fanotify_close, NULL, NULL, NULL, napi_default, NULL},
  };
  return napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
