"""Schemathesis hooks for scripts/api-conformance.sh.

Idempotency: Hypothesis draws small values, so two different requests often carry the same
Idempotency-Key ("0"), and the server rightly answers the second 422 `idempotency_key_reused`
(documented, but positive_data_acceptance expects a schema-valid request to get 2xx/401/403/404/409).
In a positive case the key is replaced by a fresh one before each call, so that schema-valid requests
reach the state machine.
"""

import re
import uuid

import schemathesis

# The document's pattern for the header.
WELL_FORMED_KEY = re.compile(r"^[!-~]([ -~]{0,253}[!-~])?$")


def _is_negative(case):
    meta = getattr(case, "meta", None)
    mode = getattr(getattr(meta, "generation", None), "mode", None)
    return bool(getattr(mode, "is_negative", False))


@schemathesis.hook
def before_call(context, case, kwargs):
    # Negative cases are left as drawn: a changed header makes Schemathesis revalidate the case, and a
    # case meant to lack a header (Authorization) would then be sent with it. A negative case may get
    # 422 for a reused key, which negative_data_rejection accepts.
    if _is_negative(case):
        return
    headers = case.headers or {}
    for name, value in list(headers.items()):
        if name.lower() == "idempotency-key" and isinstance(value, str) and WELL_FORMED_KEY.match(value):
            headers[name] = f"st-{uuid.uuid4()}"
            return
