#!/usr/bin/env bash
# API conformance: starts a real `shopkeep serve` (the debug binary, a temporary data directory, a free
# loopback port), checks that the OpenAPI document it serves validates (openapi-spec-validator) and that
# the server does what the document says (Schemathesis, every check, a bounded number of examples).
# Exits non-zero on any failure. Needs python3 (>= 3.9) and, the first time, PyPI: it keeps its tools in
# a virtualenv (.venv-ci, or $SHOPKEEP_CONFORMANCE_VENV; see scripts/python-tools.sh).
#
#   scripts/api-conformance.sh               # builds target/debug/shopkeep if it is missing
#   SHOPKEEP_BIN=path/to/shopkeep MAX_EXAMPLES=50 scripts/api-conformance.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SHOPKEEP_CONFORMANCE_VENV:-.venv-ci}
BIN=${SHOPKEEP_BIN:-target/debug/shopkeep}
MAX_EXAMPLES=${MAX_EXAMPLES:-50}
SEED=${SEED:-20261201}

scripts/python-tools.sh
if [ ! -x "$BIN" ]; then
  cargo build --locked --bin shopkeep
fi

work=$(mktemp -d)
server=""
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# Secrets: 48 random alphanumerics each (the server refuses short ones).
secret() { python3 -c 'import secrets, string; print("".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(48)))'; }
admin_token=$(secret)
mkdir -m 700 "$work/data"
: >"$work/server.out"
# Nothing from the caller's environment changes the server under test.
while IFS='=' read -r name _; do
  case "$name" in SHOPKEEP_*) unset "$name" ;; esac
done < <(env)
SHOPKEEP_ADMIN_TOKEN=$admin_token SHOPKEEP_SERVICE_TOKEN=$(secret) SHOPKEEP_PSP_SECRET=$(secret) RUST_LOG=warn \
  "$BIN" serve --data-dir "$work/data" --listen 127.0.0.1:0 >"$work/server.out" 2>"$work/server.err" &
server=$!

url=""
for _ in $(seq 1 300); do
  url=$(sed -n 's/.*shopkeep listening on \(http:[^ ]*\).*/\1/p' "$work/server.out" | head -n 1)
  [ -n "$url" ] && break
  kill -0 "$server" 2>/dev/null || { echo "shopkeep exited:"; cat "$work/server.err"; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { echo "shopkeep did not start within 30 s"; cat "$work/server.err"; exit 1; }
for _ in $(seq 1 100); do
  curl -fsS "$url/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
echo "shopkeep under test: $url"

curl -fsS "$url/v1/openapi.json" -o "$work/openapi.json"
status=0
echo "== openapi-spec-validator"
"$VENV/bin/openapi-spec-validator" --validation-errors all "$work/openapi.json" || status=1

# One worker: with several, Hypothesis under CPython 3.11 now and then fails in ast.parse ("AST
# constructor recursion depth mismatch"), an error of the tool, not of the API.
# Membership changes are left out: adding a node that does not exist waits for it to catch up, and
# promoting one would cost the single-node cluster its quorum. tests/it covers those routes.
echo "== schemathesis (seed $SEED, at most $MAX_EXAMPLES examples per operation)"
# Run from the temporary directory, where Schemathesis leaves its cache; hooks and settings are in scripts/.
root=$PWD
venv=$(cd "$VENV" && pwd)
(cd "$work" && PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$root/scripts${PYTHONPATH:+:$PYTHONPATH}" \
  SCHEMATHESIS_HOOKS=api_conformance_hooks \
  "$venv/bin/st" --config-file "$root/scripts/schemathesis.toml" run "$url/v1/openapi.json" \
  --checks all \
  -H "Authorization: Bearer $admin_token" \
  --exclude-path-regex '^/v1/admin/cluster/nodes' \
  --max-examples "$MAX_EXAMPLES" \
  --seed "$SEED" \
  --workers 1 \
  --request-timeout 10 \
  --report-dir "$work/report" \
  --output-truncate true) || status=$?
if ! kill -0 "$server" 2>/dev/null; then
  echo "shopkeep died during the run:"; tail -n 50 "$work/server.err"; exit 1
fi
exit "$status"
