/* Entry point of the native helper (see binding.gyp and src/fs/native.ts). */
#include <errno.h>
#include <malloc.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "addon.h"

napi_value cvat_throw_errno(napi_env env, int err, const char *syscall) {
  char message[256];
  snprintf(message, sizeof message, "%s: %s", syscall, strerror(err));
  napi_value msg, error, code, errno_value;
  const char *name = strerrorname_np(err);
  napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &msg);
  napi_create_error(env, NULL, msg, &error);
  napi_create_string_utf8(env, name ? name : "EUNKNOWN", NAPI_AUTO_LENGTH, &code);
  napi_set_named_property(env, error, "code", code);
  napi_create_int32(env, -err, &errno_value);
  napi_set_named_property(env, error, "errno", errno_value);
  napi_throw(env, error);
  return NULL;
}

/*
 * limitMallocArenas(n): glibc gives each thread that allocates its own malloc arena (up to 8 per
 * core), and an arena keeps what its thread once used; a backup's threads (workers, libuv's pool,
 * the journal's reader) left tens of MiB resident that way. At most n arenas for the threads that
 * allocate from now on. Returns whether the limit was set: not on other C libraries, and not when
 * MALLOC_ARENA_MAX is in the environment (the user's setting wins; glibc read it at start).
 */
static napi_value limit_malloc_arenas(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t n = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 || napi_get_value_int32(env, argv[0], &n) != napi_ok || n < 1) {
    napi_throw_type_error(env, NULL, "limitMallocArenas(n): n must be a positive integer");
    return NULL;
  }
  bool set = false;
#ifdef __GLIBC__
  if (getenv("MALLOC_ARENA_MAX") == NULL) set = mallopt(M_ARENA_MAX, n) == 1;
#endif
  napi_value result;
  napi_get_boolean(env, set, &result);
  return result;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  if (napi_create_function(env, "limitMallocArenas", NAPI_AUTO_LENGTH, limit_malloc_arenas, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "limitMallocArenas", fn) != napi_ok) return NULL;
  if (cvat_register_fanotify(env, exports) != napi_ok) return NULL;
  if (cvat_register_walk(env, exports) != napi_ok) return NULL;
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
