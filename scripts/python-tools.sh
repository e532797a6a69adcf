#!/usr/bin/env bash
# The Python tools the checks of the API use, in one virtualenv (.venv-ci, or $SHOPKEEP_CONFORMANCE_VENV):
# openapi-spec-validator (run by the test suite on the served document, tests/it/http_contract.rs, and by
# scripts/api-conformance.sh) and Schemathesis (scripts/api-conformance.sh). Installs them from PyPI the
# first time; afterwards it does nothing. Needs python3 (>= 3.9). .ci/run runs it before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SHOPKEEP_CONFORMANCE_VENV:-.venv-ci}
if [ ! -x "$VENV/bin/st" ] || [ ! -x "$VENV/bin/openapi-spec-validator" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'schemathesis>=4.1,<5' 'openapi-spec-validator>=0.7'
fi
