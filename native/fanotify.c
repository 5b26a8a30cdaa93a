/* fanotify: the change journal of issue 10 (to be written). */
#include "addon.h"

napi_status cvat_register_fanotify(napi_env env, napi_value exports) {
  (void)env;
  (void)exports;
  return napi_ok;
}
