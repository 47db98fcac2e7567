"""schemathesis against the live server: generated requests, valid and invalid, for every operation
in /openapi.json; every answer must be documented, typed and shaped as the schema says, and none
may be a server error."""

from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from serverutil import API_KEY, ServerHandle

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Per operation and mode (valid, invalid). The GET operations take no input, so one case each
# covers them; the four POST operations make up the rest.
EXAMPLES = 70
MIN_CASES = 500
MAX_NEW_TOKENS = 4


def keep_small(case) -> None:
    """Few tokens and choices per generated request, so hundreds of them fit in a test."""
    body = case.body
    if not isinstance(body, dict) or case.operation.path not in ("/v1/completions", "/v1/chat/completions"):
        return
    if not any(k in body for k in ("max_tokens", "max_completion_tokens")):
        body["max_tokens"] = MAX_NEW_TOKENS
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > MAX_NEW_TOKENS:
            body[key] = MAX_NEW_TOKENS
    if isinstance(body.get("n"), int) and not isinstance(body["n"], bool) and body["n"] > 2:
        body["n"] = 2


def test_schemathesis_finds_nothing(server: ServerHandle) -> None:
    schema = schemathesis.openapi.from_dict(httpx.get(server.base_url + "/openapi.json", timeout=30).json())
    headers = {"Authorization": f"Bearer {API_KEY}"}
    cases: dict[str, int] = {}
    answered: dict[str, set[int]] = {}
    findings: list[str] = []

    def exercise(operation, mode) -> None:
        # Generation only: a finding is recorded, not shrunk, so the run stays bounded.
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            keep_small(case)
            cases[operation.label] = cases.get(operation.label, 0) + 1
            response = case.call(base_url=server.base_url, headers=headers, timeout=120)
            answered.setdefault(operation.label, set()).add(response.status_code)
            try:
                case.validate_response(response, checks=CHECKS, headers=headers)
            except AssertionError as exc:
                findings.append(f"{operation.label} ({mode.value}): {exc}\n  {case.as_curl_command(headers)}")
            except BaseExceptionGroup as group:
                for exc in group.exceptions:
                    findings.append(f"{operation.label} ({mode.value}): {exc}\n  {case.as_curl_command(headers)}")

        try:
            run()
        except Unsatisfiable:
            assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label  # nothing to get wrong

    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            exercise(operation, mode)
    assert not findings, "\n".join(findings[:20])
    assert set(cases) == {op.label for op in operations} and len(operations) == 8, cases
    assert sum(cases.values()) >= MIN_CASES, cases
    # Valid requests reached the model and were answered, not only refused.
    assert all(200 in statuses for statuses in answered.values()), answered
