# The optional native helper (Node-API, so one build serves Node 20, 22 and 24). `npm ci` builds
# it with node-gyp (see scripts/build-native.sh); without it the tool falls back to pure
# JavaScript (src/fs/native.ts says what each part does then).
{
  "targets": [
    {
      "target_name": "cvat_native",
      "sources": ["native/addon.c", "native/fanotify.c", "native/walk.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-std=gnu11"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE"]
    }
  ]
}
