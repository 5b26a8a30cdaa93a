/* The native helper's parts; each registers its functions on the module's exports. */
#ifndef CVAT_NATIVE_ADDON_H
#define CVAT_NATIVE_ADDON_H
#include <node_api.h>

napi_status cvat_register_fanotify(napi_env env, napi_value exports);
napi_status cvat_register_walk(napi_env env, napi_value exports);

/* Throws a JavaScript Error with `code` set to the errno name (ENOENT, EPERM, ...) and returns NULL. */
napi_value cvat_throw_errno(napi_env env, int err, const char *syscall);

#endif
