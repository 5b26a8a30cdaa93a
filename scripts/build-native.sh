#!/bin/sh
# Builds the optional native helper (binding.gyp) with the node-gyp that npm carries. Run by
# `npm ci` / `npm install` (the "install" script) and by hand (`sh scripts/build-native.sh`). A
# failed build is not an error: the tool then runs on its pure-JavaScript fallbacks.
cd "$(dirname "$0")/.." || exit 0
if command -v node-gyp >/dev/null 2>&1; then
  set -- node-gyp
else
  # Outside npm's scripts: npm's own copy (lib/node_modules/npm/node_modules/node-gyp).
  npm_cli=$(readlink -f "$(command -v npm)")
  set -- node "$(dirname "$npm_cli")/../node_modules/node-gyp/bin/node-gyp.js"
fi
# Node's headers where npm is set to find them (this machine: /usr/include/node), not a download.
if [ -z "${npm_config_nodedir:-}" ]; then
  nodedir=$(npm config get nodedir 2>/dev/null)
  case "$nodedir" in ''|undefined|null) ;; *) export npm_config_nodedir="$nodedir" ;; esac
fi
if "$@" rebuild >/tmp/cvat-backup-native-build.log 2>&1; then
  echo "cvat-backup: native helper built (build/Release/cvat_native.node)"
else
  echo "cvat-backup: native helper NOT built (see /tmp/cvat-backup-native-build.log); using the pure-JavaScript fallbacks" >&2
fi
exit 0
