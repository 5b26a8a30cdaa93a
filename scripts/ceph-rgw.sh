#!/usr/bin/env bash
# A real S3 server for the tests: Ceph's RADOS Gateway from Debian's packages on one host
# (1 monitor, 1 memstore OSD, no mgr), listening on 127.0.0.1 only, with throwaway users.
#
#   scripts/ceph-rgw.sh [start]   install if missing, start if not already answering (idempotent)
#   scripts/ceph-rgw.sh stop      stop the daemons (by their pid files) and delete the state
#
# Writes the endpoint and credentials to $RGW_ENV_FILE (default /tmp/cvat-backup-rgw/s3.env, mode
# 0600, root only) as shell assignments; the S3 tests read that file (CVAT_BACKUP_S3_TEST_ENV names
# it). Two users: `owner` (creates buckets; the "bucket owner" of the README's recovery) and
# `host` (what a CVAT host would hold). Secrets are random per start and never printed.
#
# Pitfalls handled (see docs in the README's S3 section): the OSD's own crush update at boot can die
# with "wrong fsid" on Ceph 16.2 with a brand-new monitor, so we place it in the crush map ourselves;
# radosgw ignores SIGTERM, so stop kills it after a few seconds.
set -euo pipefail

D=${CEPH_DIR:-/tmp/cvat-backup-rgw/cluster}
ENV_FILE=${RGW_ENV_FILE:-/tmp/cvat-backup-rgw/s3.env}
RGW_PORT=${RGW_PORT:-7480}
MON_PORT=${MON_PORT:-6789}
STORE_BYTES=${STORE_BYTES:-4294967296}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

stop() {
  [ -d "$D/run" ] || return 0
  local pids=() f p
  for f in "$D"/run/client.rgw.a.pid "$D"/run/osd.*.pid "$D"/run/mon.a.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f")
    # only signal it if it really is one of our ceph daemons
    if [ -n "$p" ] && grep -qE '^(ceph-|radosgw)' "/proc/$p/comm" 2>/dev/null; then
      kill "$p" 2>/dev/null && pids+=("$p")
    fi
  done
  for p in "${pids[@]}"; do
    for _ in $(seq 1 12); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
  done
  rm -rf "$D"
  rm -f "$ENV_FILE"
}

if [ "${1:-start}" = stop ]; then stop; echo "rgw stopped"; exit 0; fi

# Already running and answering with our users: nothing to do.
if [ -s "$ENV_FILE" ] && [ -f "$D/run/client.rgw.a.pid" ] && kill -0 "$(cat "$D/run/client.rgw.a.pid")" 2>/dev/null \
   && curl -sf "http://127.0.0.1:$RGW_PORT/" >/dev/null 2>&1; then
  echo "rgw already running on http://127.0.0.1:$RGW_PORT (credentials in $ENV_FILE)"
  exit 0
fi

need=()
for b in ceph-mon ceph-osd radosgw radosgw-admin ceph monmaptool ceph-authtool curl; do
  command -v "$b" >/dev/null || need+=("$b")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing Ceph (mon, osd, radosgw) from Debian's packages"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends ceph-mon ceph-osd radosgw ceph-common curl >/dev/null
fi

stop
mkdir -p "$D"/{run,log,mon/ceph-a,osd/ceph-0,rgw} "$(dirname "$ENV_FILE")"
chmod 700 "$(dirname "$ENV_FILE")" "$D"
FSID=$(cat /proc/sys/kernel/random/uuid)
export CEPH_CONF="$D/ceph.conf"

cat > "$CEPH_CONF" <<CONF
[global]
fsid = $FSID
mon host = v1:127.0.0.1:$MON_PORT
mon initial members = a
public addr = 127.0.0.1
ms bind ipv6 = false
ms bind msgr2 = false
auth cluster required = none
auth service required = none
auth client required = none
keyring = $D/keyring
run dir = $D/run
admin socket = $D/run/\$name.asok
pid file = $D/run/\$name.pid
log file = $D/log/\$name.log
log to stderr = false
err to stderr = false
mon data = $D/mon/\$cluster-\$id
osd data = $D/osd/\$cluster-\$id
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon data avail warn = 1
auth allow insecure global id reclaim = false
[osd]
osd objectstore = memstore
memstore device bytes = $STORE_BYTES
osd memory target = 939524096
osd op num shards = 2
osd op num threads per shard = 1
osd crush update on start = false
osd class update on start = false
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw data = $D/rgw
rgw thread pool size = 64
rgw enable apis = s3, admin
CONF

ceph-authtool --create-keyring "$D/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$D/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
monmaptool --create --add a "127.0.0.1:$MON_PORT" --fsid "$FSID" "$D/monmap" >/dev/null
ceph-mon --mkfs -i a --monmap "$D/monmap" --keyring "$D/keyring"
ceph-mon -i a

wait_for() { # wait_for SECONDS DESCRIPTION CMD...
  local t=$1 what=$2; shift 2
  for _ in $(seq 1 $((t * 2))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "timed out waiting for $what (logs in $D/log)" >&2; exit 1
}
wait_for 30 mon ceph --connect-timeout 5 mon stat

OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
OSD_ID=$(ceph osd new "$OSD_UUID")
ceph osd crush add "osd.$OSD_ID" 1.0 root=default >/dev/null 2>&1
ceph-osd -i "$OSD_ID" --mkfs --osd-uuid "$OSD_UUID" >"$D/log/osd-mkfs.out" 2>&1
for try in 1 2 3; do
  ceph-osd -i "$OSD_ID" && break
  echo "ceph-osd start failed (try $try), retrying" >&2; sleep 1
done
wait_for 60 "osd up" bash -c "ceph osd dump -f json | grep -q '\"up\":1'"

radosgw -n client.rgw.a
wait_for 60 "rgw on 127.0.0.1:$RGW_PORT" curl -sf "http://127.0.0.1:$RGW_PORT/"

secret() { head -c 30 /dev/urandom | base64 | tr -d '/+=' | head -c 32; }
OWNER_KEY="OWNER$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F)"
OWNER_SECRET=$(secret)
HOST_KEY="HOST$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F)"
HOST_SECRET=$(secret)
radosgw-admin user create --uid=owner --display-name=owner --access-key="$OWNER_KEY" --secret="$OWNER_SECRET" >/dev/null
radosgw-admin user create --uid=host --display-name=host --access-key="$HOST_KEY" --secret="$HOST_SECRET" >/dev/null

umask 077
cat > "$ENV_FILE.tmp" <<ENV
S3_ENDPOINT=http://127.0.0.1:$RGW_PORT
S3_REGION=us-east-1
S3_OWNER_USER=owner
S3_OWNER_ACCESS_KEY=$OWNER_KEY
S3_OWNER_SECRET_KEY=$OWNER_SECRET
S3_HOST_USER=host
S3_HOST_ACCESS_KEY=$HOST_KEY
S3_HOST_SECRET_KEY=$HOST_SECRET
CEPH_CONF=$CEPH_CONF
ENV
mv "$ENV_FILE.tmp" "$ENV_FILE"
echo "rgw running on http://127.0.0.1:$RGW_PORT (users owner and host; credentials in $ENV_FILE)"
