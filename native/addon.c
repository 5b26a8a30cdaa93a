/* Entry point of the native helper (see binding.gyp and src/fs/native.ts). */
#include <errno.h>
#include <stdio.h>
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

static napi_value init(napi_env env, napi_value exports) {
  if (cvat_register_fanotify(env, exports) != napi_ok) return NULL;
  if (cvat_register_walk(env, exports) != napi_ok) return NULL;
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
