#!/usr/bin/env bash
# The Docker path for real: bring up a private dockerd, build the base and CPU images
# (containers/build.sh), run two demo steps (stages.synth, stages.preprocess) natively and in the
# image through stages.core.container, and require byte-identical outputs. dockerd is torn down by
# its PID and its state removed, whatever happens.
#
# Usage: tests/container_e2e.sh          (as root: starts dockerd, may apt-get docker.io/debootstrap)
# Exit codes: 0 identical, 1 failure, 77 cannot run here (not root, no packages, dockerd won't start).
# Environment: KEEP_E2E=1 keeps the temporary folder; SEGADAPT_CACHE caches the Debian rootfs.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
IMAGE=segadapt:cpu
SKIP=77
# the demo at its smallest (tests/configs/tiny.yaml), and the preprocess settings the rules pass
SYNTH_SETTINGS='{"seed":0,"shape":[32,32,24],"cases_per_task":5,"pool_cases":4}'
PREPROCESS_SETTINGS='{"labelled":true,"labels":null,"normalisation":"auto","seed":0,"split":{"test":0.2,"val":0.2},"target_spacing":null}'
# a uid:gid that exists nowhere: the outputs must still belong to it
MAPPED_USER=4321:4321

say() { printf 'container_e2e: %s\n' "$*" >&2; }
skip() { say "SKIP: $*"; exit "$SKIP"; }
fail() { say "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(id -u)" -eq 0 ] || skip "needs root (dockerd, debootstrap)"
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  command -v apt-get >/dev/null || skip "dockerd/debootstrap missing and no apt-get"
  say "installing docker.io and debootstrap"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap; } \
    >/dev/null 2>&1 || skip "apt-get install docker.io debootstrap failed (offline?)"
fi

TMP=$(mktemp -d /tmp/segadapt-e2e.XXXXXX)
DOCKER_DIR=$TMP/docker
mkdir -p "$DOCKER_DIR"
PIDFILE=$DOCKER_DIR/dockerd.pid
# The daemon's state (about 4 GB of layers) goes to memory when there is room: on a slow disk, writing
# and then deleting it costs minutes; a tmpfs is dropped at once.
avail_kb=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo)
if [ "${E2E_TMPFS:-1}" = 1 ] && [ "${avail_kb:-0}" -gt $((12 * 1024 * 1024)) ] \
  && mount -t tmpfs -o size=8g,mode=0700 segadapt-e2e "$DOCKER_DIR" 2>/dev/null; then
  say "dockerd state on a tmpfs"
fi

teardown() {
  local rc=$? t0
  t0=$(now)
  if [ -s "$PIDFILE" ]; then
    local pid
    pid=$(cat "$PIDFILE")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  if [ "${KEEP_E2E:-0}" = 1 ]; then
    say "kept $TMP"
  else
    # a hard-killed dockerd can leave its overlay mounts behind
    grep -o " $DOCKER_DIR/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    if grep -q " $DOCKER_DIR tmpfs " /proc/mounts; then umount "$DOCKER_DIR"; fi
    rm -rf "$TMP"
  fi
  say "teardown: $(since "$t0")s"
  exit "$rc"
}
trap teardown EXIT
trap 'exit 1' INT TERM

# Private daemon: own state, own socket; no bridge and no iptables rules, so the host's network
# setup is untouched (no step needs a network; the image builds offline).
say "starting dockerd"
dockerd --data-root "$DOCKER_DIR/data" --exec-root "$DOCKER_DIR/exec" --pidfile "$PIDFILE" \
  -H "unix://$DOCKER_DIR/docker.sock" --bridge=none --iptables=false >"$DOCKER_DIR/dockerd.log" 2>&1 &
export DOCKER_HOST=unix://$DOCKER_DIR/docker.sock
up=0
for _ in $(seq 1 60); do
  if docker version >/dev/null 2>&1; then up=1; break; fi
  sleep 0.5
done
[ "$up" -eq 1 ] || skip "dockerd did not start: $(tail -3 "$DOCKER_DIR/dockerd.log" | tr '\n' ' ')"

# Byte identity needs the image's packages to be the host's: report any drift from the lock first.
drift=$("$PYTHON" - "$REPO/containers/requirements.lock" <<'EOF'
import importlib.metadata as md
import sys

for line in open(sys.argv[1]):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    name, version = line.split("==")
    try:
        have = md.version(name).split("+")[0]
    except md.PackageNotFoundError:
        have = "absent"
    if have != version:
        print(f"{name} {have} (lock {version})")
EOF
)
[ -z "$drift" ] || say "WARNING: host packages differ from containers/requirements.lock: $(echo "$drift" | tr '\n' ';')"

cached=no
[ -f "${SEGADAPT_CACHE:-$HOME/.cache/segadapt}/debian-bookworm-python3.11-rootfs.tar" ] && cached=yes
t0=$(now)
"$REPO/containers/build.sh" 2>&1 | grep -v -e "WARNING: Location" -e "^ ---> " -e "^Removing intermediate" >&2
BUILD_S=$(since "$t0")
say "build: ${BUILD_S}s (rootfs cached before: $cached)"
docker image inspect "$IMAGE" --format 'image {{.Id}} {{.Size}} bytes' >&2

WORK=$TMP/work
mkdir -p "$WORK"
cd "$WORK"
# the host side runs this checkout's code, the code build.sh put in the image (whatever else is installed)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
launch() { "$PYTHON" -m stages.core.container --image "$IMAGE" "$@"; }

compare() {  # compare TREE_A TREE_B: every file byte for byte, and the same file list
  local a=$1 b=$2
  diff -r "$a" "$b" >&2 || fail "$a and $b differ"
  (cd "$a" && find . -type f | sort | xargs sha256sum) > "$TMP/a.sha256"
  (cd "$b" && find . -type f | sort | xargs sha256sum) > "$TMP/b.sha256"
  cmp -s "$TMP/a.sha256" "$TMP/b.sha256" || fail "$a and $b: different file lists or hashes"
  wc -l < "$TMP/a.sha256"
}

# 1. stages.synth: native, then in the image (as the caller), into the same relative folder
t0=$(now); "$PYTHON" -m stages.synth --out demo --settings "$SYNTH_SETTINGS" 2>"$TMP/synth.native.log"
SYNTH_NATIVE_S=$(since "$t0")
mv demo native_demo
t0=$(now); launch -- python -m stages.synth --out demo --settings "$SYNTH_SETTINGS" 2>"$TMP/synth.docker.log" \
  || fail "synth in the image: $(tail -5 "$TMP/synth.docker.log")"
SYNTH_DOCKER_S=$(since "$t0")
SYNTH_FILES=$(compare native_demo demo)
say "synth: native ${SYNTH_NATIVE_S}s, image ${SYNTH_DOCKER_S}s, $SYNTH_FILES files byte-identical"
# run by root, the step ran as nobody and the launcher gave its outputs back to root
owners=$(find demo -printf '%U:%G\n' | sort -u | tr '\n' ' ')
[ "$owners" = "0:0 " ] || fail "synth outputs owned by $owners, not 0:0 (the root caller)"
[ ! -e .segadapt-container ] || [ -z "$(find .segadapt-container -name 'parents-*')" ] \
  || fail "parent folders not given back: $(ls .segadapt-container)"

# 1b. what the step sees: not root, no capabilities, the job's thread count, a private TMPDIR
seen=$(OMP_NUM_THREADS=3 launch -- sh -c 'echo "$(id -u) $OMP_NUM_THREADS $TMPDIR"; grep CapEff /proc/self/status' \
  2>"$TMP/env.log") || fail "env probe: $(tail -5 "$TMP/env.log")"
read -r uid threads scratch <<<"$(head -1 <<<"$seen")"
[ "$uid" = 65534 ] && [ "$threads" = 3 ] || fail "step ran as uid $uid with OMP_NUM_THREADS=$threads"
case $scratch in "${TMPDIR:-/tmp}"/segadapt-container-*) ;; *) fail "TMPDIR in the container: $scratch" ;; esac
[ ! -e "$scratch" ] || fail "scratch folder $scratch left behind"
grep -q "CapEff:[[:space:]]*0000000000000000" <<<"$seen" || fail "capabilities left: $seen"
say "step environment: uid $uid, OMP_NUM_THREADS $threads, private TMPDIR, no capabilities"

# 2. stages.preprocess on the organ/lesion task (CT, non-RAS, anisotropic): native, then in the image
# as an unknown uid (the working folder handed over to it), same relative paths, same settings
preprocess=(python -m stages.preprocess --dataset demo/organ_lesion --out results/data/organ_lesion
  --settings "$PREPROCESS_SETTINGS")
t0=$(now); "$PYTHON" "${preprocess[@]:1}" 2>"$TMP/preprocess.native.log" \
  || fail "native preprocess: $(tail -5 "$TMP/preprocess.native.log")"
PRE_NATIVE_S=$(since "$t0")
mv results native_results
chown -R "$MAPPED_USER" "$WORK"
t0=$(now); launch --user "$MAPPED_USER" -- "${preprocess[@]}" 2>"$TMP/preprocess.docker.log" \
  || fail "preprocess in the image: $(tail -5 "$TMP/preprocess.docker.log")"
PRE_DOCKER_S=$(since "$t0")
PRE_FILES=$(compare native_results results)
owners=$(find results -printf '%U:%G\n' | sort -u | tr '\n' ' ')
[ "$owners" = "$MAPPED_USER " ] || fail "outputs owned by $owners, not $MAPPED_USER"
say "preprocess: native ${PRE_NATIVE_S}s, image ${PRE_DOCKER_S}s, $PRE_FILES files byte-identical, owner $MAPPED_USER"

# 3. a refusal inside the image keeps the stage's exit code 2 and its message
set +e
launch -- python -m stages.preprocess --dataset demo/missing --out x 2>"$TMP/refusal.log"
rc=$?
set -e
[ "$rc" -eq 2 ] && grep -q "demo/missing" "$TMP/refusal.log" || fail "refusal: exit $rc, $(cat "$TMP/refusal.log")"

# 4. the rules themselves: Snakemake with `container.engine: docker` (tiny.yaml otherwise) runs synth
# and preprocess_task through the launcher; outputs byte-identical to the native steps above
mkdir -p "$TMP/wf"
cd "$TMP/wf"
"$PYTHON" - "$REPO/tests/configs/tiny.yaml" >config.yaml <<'EOF'
import sys

import yaml

config = yaml.safe_load(open(sys.argv[1]))
config["container"] = {"engine": "docker", "image": "segadapt:cpu"}
print(yaml.safe_dump(config))
EOF
since_epoch=$(date +%s)
t0=$(now)
"$PYTHON" -m snakemake -s "$REPO/workflow/Snakefile" --cores 2 results/data/organ_lesion/manifest.parquet \
  >"$TMP/snakemake.log" 2>&1 || fail "snakemake with engine docker: $(tail -20 "$TMP/snakemake.log")"
WF_S=$(since "$t0")
started=$(docker events --since "$since_epoch" --until "$(date +%s)" --filter event=start --format '{{.ID}}' | wc -l)
[ "$started" -ge 2 ] || fail "snakemake with engine docker started $started containers (expected synth + preprocess)"
# Snakemake's own marker in a directory() output is not a stage's output
rm -f results/data/organ_lesion/cases/.snakemake_timestamp
wf_demo=$(compare "$WORK/native_demo" demo)
wf_data=$(compare "$WORK/native_results/data/organ_lesion" results/data/organ_lesion)
WF_FILES=$((wf_demo + wf_data))
say "snakemake (engine docker): ${WF_S}s, $started containers, $WF_FILES files byte-identical to the native steps"

say "PASS build=${BUILD_S}s synth(native/image)=${SYNTH_NATIVE_S}/${SYNTH_DOCKER_S}s" \
  "preprocess(native/image)=${PRE_NATIVE_S}/${PRE_DOCKER_S}s snakemake(engine docker)=${WF_S}s" \
  "identical_files=$((SYNTH_FILES + PRE_FILES + WF_FILES))"
