#!/usr/bin/env bash
# make test-compose: docker-compose.yml started for real, as docs/deployment.md tells a new user.
#
# In a fresh temporary project directory (its own keys, data and volumes; nothing reused from an
# earlier run): build the image, start the SuperLink and three nodes, submit a run as the
# researcher `runner` through the operators' port, audit the run inside the SuperLink's container
# and on this host with the pinned ledger key and every node's own ledger, print the audited
# epsilon, and tear everything down (docker compose down -v), also on failure or timeout.
#
# Needs Docker Engine with the Compose v2 plugin (../shared/tools/container-engine.sh prepares one
# where Docker Hub cannot be reached; then FEDPRIV_PYTHON_IMAGE=local/python:3.11-bookworm).
# Settings (environment):
#   FEDPRIV_PYTHON_IMAGE   base image of the build (default python:3.11-slim)
#   FEDPRIV_COMPOSE_ROUNDS rounds of the run (default 2)
#   FEDPRIV_COMPOSE_TIMEOUT seconds for the whole test, the build included (default 1800)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FEDPRIV=${FEDPRIV:-$ROOT/.venv/bin/fedpriv}
ROUNDS=${FEDPRIV_COMPOSE_ROUNDS:-2}
LIMIT=${FEDPRIV_COMPOSE_TIMEOUT:-1800}
export FEDPRIV_PYTHON_IMAGE=${FEDPRIV_PYTHON_IMAGE:-python:3.11-slim}
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}  # the legacy builder: no Docker Hub for BuildKit's frontend

# The image runs as a non-root user that must own the mounted keys and data: yours, or uid 1000
# when you are root (then the deployment's files are handed to it below).
if [ "$(id -u)" = 0 ]; then
    export FEDPRIV_UID=1000 FEDPRIV_GID=1000
else
    export FEDPRIV_UID=$(id -u) FEDPRIV_GID=$(id -g)
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fedpriv-compose.XXXXXX")
PROJECT="fedpriv-test-$(basename "$WORK" | tr 'A-Z.' 'a-z-')"
COMPOSE=(docker compose --project-directory "$WORK" -f "$WORK/docker-compose.yml" -p "$PROJECT")
compose() { "${COMPOSE[@]}" "$@"; }
cleanup() {
    status=$?
    if [ $status -ne 0 ]; then
        echo "--- logs (the run failed with status $status) ---"
        compose logs --no-color --tail 60 2>/dev/null || true
    fi
    compose --profile run down -v --remove-orphans >/dev/null 2>&1 || true
    rm -rf "$WORK"
    exit $status
}
trap cleanup EXIT
DEADLINE=$(( $(date +%s) + LIMIT ))
limited() {  # a step, given what is left of the time limit
    local left=$(( DEADLINE - $(date +%s) ))
    [ "$left" -gt 0 ] || { echo "error: make test-compose ran past its ${LIMIT} s"; return 124; }
    timeout "$left" "$@" || { status=$?; [ $status -ne 124 ] || echo "error: make test-compose ran past its ${LIMIT} s"; return $status; }
}

echo "== image (base $FEDPRIV_PYTHON_IMAGE, uid $FEDPRIV_UID)"
start=$(date +%s)
limited docker build -q --build-arg PYTHON_IMAGE="$FEDPRIV_PYTHON_IMAGE" --build-arg FEDPRIV_UID="$FEDPRIV_UID" \
    --build-arg FEDPRIV_GID="$FEDPRIV_GID" -t fedpriv:latest . >/dev/null
echo "built fedpriv:latest in $(( $(date +%s) - start )) s"

echo "== a fresh deployment in $WORK (docs/deployment.md, steps 1 and 2)"
cp docker-compose.yml "$WORK/"
(
    cd "$WORK"
    "$FEDPRIV" keys --out deploy/keys --host superlink --host superlink-admin --nodes 3 >/dev/null
    "$FEDPRIV" keys --out deploy/keys --operator runner --role researcher >/dev/null
    "$FEDPRIV" split-data --out deploy/data --nodes 3 --preset federation >/dev/null
    if [ "$(id -u)" = 0 ]; then chown -R "$FEDPRIV_UID:$FEDPRIV_GID" deploy; fi
)

echo "== up: the SuperLink and three nodes"
start=$(date +%s)
limited "${COMPOSE[@]}" up -d --no-build --wait superlink
echo "== the run ($ROUNDS rounds), submitted as runner (researcher)"
compose up -d --no-build node-1 node-2 node-3
limited "${COMPOSE[@]}" run --rm run server run --superlink superlink-admin:9093 --root-cert /run/secrets/ca.crt \
    --operator-cert /run/secrets/operator.crt --operator-key /run/secrets/operator.key --preset federation \
    --set "run.rounds=$ROUNDS" | tee "$WORK/run.log"
RUN=$(sed -n 's|.*fedpriv: run written to \(/state/runs/[^ ]*\).*|\1|p' "$WORK/run.log" | tail -n 1)
[ -n "$RUN" ] || { echo "error: the run printed no run directory"; exit 1; }
echo "run $RUN finished $(( $(date +%s) - start )) s after the services started"

echo "== audit inside the SuperLink's container"
limited "${COMPOSE[@]}" exec -T superlink fedpriv audit "$RUN"

echo "== audit on this host, with the pinned key and every node's own ledger"
mkdir -p "$WORK/copy/nodes"
compose cp "superlink:$RUN" "$WORK/copy/run" >/dev/null 2>&1
compose cp "superlink:/state/ledger-witness" "$WORK/copy/ledger-witness" >/dev/null 2>&1
for n in 1 2 3; do
    compose cp "node-$n:/state/node-$n" "$WORK/copy/nodes/node-$n" >/dev/null 2>&1
done
FEDPRIV_LEDGER_WITNESS="$WORK/copy/ledger-witness" "$FEDPRIV" audit "$WORK/copy/run" \
    --public-key "$WORK/deploy/keys/ledger-signing.pub" \
    --node-ledger "$WORK/copy/nodes/node-1" "$WORK/copy/nodes/node-2" "$WORK/copy/nodes/node-3" --json \
    > "$WORK/audit.json"
python3 - "$WORK/audit.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
assert report["ok"], report["failures"]
assert report["key"]["pinned"], report["key"]
nodes = report["node_ledgers"]
assert len(nodes) == 3 and all(n["spends"] > 0 for n in nodes), nodes
eps = {cid: f["rdp"] for cid, f in report["epsilon"]["record_level"].items()}
print(f"audit on the host: PASS; {len(nodes)} node ledgers match the run's; record-level epsilon per client "
      + ", ".join(f"{cid}: {e:.4f}" for cid, e in eps.items()) + f" at delta {report['delta']}")
EOF
echo "make test-compose: PASS"
