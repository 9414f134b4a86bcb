"""Property-based fuzzing of the service's own OpenAPI schema with Schemathesis, in process.

Schemathesis generates requests for every operation of `/openapi.json`, both ones that fit the
schema and ones that break it: random bytes as uploads, out-of-range query values, missing or
mistyped fields. Each response must be below 500, with a status code, content type and body
that the schema declares. Generation is derandomized, so every run tries the same examples,
and the number of examples per operation and mode is bounded.

NOTE: Schemathesis 4.32's pytest integration (`schemathesis.pytest.from_fixture`) reads a
private attribute that pytest 9 removed, so the cases are drawn with Hypothesis directly from
`APIOperation.as_strategy`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance
from schemathesis.specs.openapi.schemas import OpenApiSchema

from facemask.serving.app import create_app
from facemask.serving.served_model import ServedModel, load_served_model
from facemask.serving.settings import ServeSettings
from tests.conftest import TrainedModel

# Examples per operation and generation mode. The drift report runs Evidently on each call, so
# its operation gets fewer.
MAX_EXAMPLES = 100
MAX_DRIFT_EXAMPLES = 20
OPERATIONS = (
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/info"),
    ("GET", "/metrics"),
    ("POST", "/predict"),
    ("POST", "/predict/batch"),
    ("GET", "/drift"),
    ("GET", "/driftsummary"),
)

# Operations without parameters or body, for which no request breaks the schema.
NO_INPUT = {"/health", "/ready", "/info", "/metrics"}
# The schema declares any bytes as a valid upload and allows an empty file list, but only a
# decodable image is classified, so a schema-valid request may get a 4xx. Every other check of
# Schemathesis runs.
EXCLUDED_CHECKS = [positive_data_acceptance]
# A batch reports each bad file in its 200 response, and a multipart form turns any generated
# value into a file's bytes, so a schema-violating batch is rightly accepted.
EXCLUDED_BATCH_CHECKS = [positive_data_acceptance, negative_data_rejection]

# Statuses that count as rejecting a schema-violating request: Schemathesis' defaults and 413,
# which the service returns for too many files before it looks at their content.
REJECTION_STATUSES = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428"]

# Examples sent, by operation and mode; printed at the end of the module.
EXAMPLES_SENT: dict[str, int] = {}


@pytest.fixture(scope="module")
def fuzz_model(trained_model: TrainedModel) -> ServedModel:
    return load_served_model(trained_model.alias_uri, trained_model.tracking_uri, runtime="torch")


@pytest.fixture(scope="module")
def api_schema(
    fuzz_model: ServedModel, trained_model: TrainedModel, tmp_path_factory
) -> Iterator[OpenApiSchema]:
    log_path = tmp_path_factory.mktemp("fuzz") / "predictions.jsonl"
    app = create_app(
        ServeSettings(
            model_uri=trained_model.alias_uri,
            tracking_uri=trained_model.tracking_uri,
            prediction_log=log_path,
            max_batch_files=4,
        ),
        fuzz_model,
    )
    config = SchemathesisConfig.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": REJECTION_STATUSES}}}
    )
    yield schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    total = sum(EXAMPLES_SENT.values())
    print(f"\nSchemathesis requests sent: {total} {json.dumps(EXAMPLES_SENT, indent=1)}")


def test_schema_lists_every_operation(api_schema: OpenApiSchema):
    listed = {
        (method.upper(), path)
        for path, item in api_schema.raw_schema["paths"].items()
        for method in item
    }

    assert listed == set(OPERATIONS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_operation_conforms_to_schema(
    api_schema: OpenApiSchema, method: str, path: str, mode: GenerationMode
):
    if mode is GenerationMode.NEGATIVE and path in NO_INPUT:
        pytest.skip(
            f"{method} {path} takes no input, so there is no request that breaks the schema"
        )
    operation = api_schema[path][method]
    key = f"{method} {path} {mode.value}"
    examples = MAX_DRIFT_EXAMPLES if path == "/drift" else MAX_EXAMPLES
    excluded = EXCLUDED_BATCH_CHECKS if path == "/predict/batch" else EXCLUDED_CHECKS

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        EXAMPLES_SENT[key] = EXAMPLES_SENT.get(key, 0) + 1
        response = case.call()

        assert response.status_code < 500, f"{key}: {response.status_code} {response.text[:500]}"
        assert "Traceback" not in response.text
        assert str(Path.home()) not in response.text
        case.validate_response(response, excluded_checks=excluded)

    check()
