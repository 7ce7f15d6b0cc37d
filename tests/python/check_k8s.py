"""Validates Kubernetes manifests against the API's own models, offline, and describes the pods.

    check_k8s.py FILE.yaml...

Every document must be a batch/v1 Job. Each is checked field by field against the `kubernetes`
package's generated models of the API (the OpenAPI schema of Kubernetes 1.36): no unknown field
at any depth, every value of its declared type, and every required field present (the models'
client-side validation). Prints one JSON object: per file, the Job's completion mode,
completions, parallelism and its first container's args and literal environment, so a test can
start the pods' commands as Kubernetes would.
"""

import json
import re
import sys

import yaml
from kubernetes import client
from kubernetes.client import models

PRIMITIVES = {
    "str": str,
    "int": int,
    "bool": bool,
    "float": (int, float),
    "object": object,
    "datetime": str,
    "date": str,
}


def check(value, kind, path, errors):
    """Appends to `errors` every way `value` departs from the model type `kind`."""
    if value is None:
        return
    if kind in PRIMITIVES:
        expected = PRIMITIVES[kind]
        if kind == "int" and isinstance(value, bool) or not isinstance(value, expected):
            errors.append(f"{path}: {value!r} is not {kind}")
        return
    m = re.fullmatch(r"list\[(.+)\]", kind)
    if m:
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list")
            return
        for i, item in enumerate(value):
            check(item, m.group(1), f"{path}[{i}]", errors)
        return
    m = re.fullmatch(r"dict[(\[]str, (.+)[)\]]", kind)
    if m:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a map")
            return
        for k, v in value.items():
            check(v, m.group(1), f"{path}.{k}", errors)
        return
    model = getattr(models, kind, None)
    if model is None:
        errors.append(f"{path}: unknown model type {kind}")
        return
    if not isinstance(value, dict):
        errors.append(f"{path}: expected an object ({kind})")
        return
    fields = {json_key: attr for attr, json_key in model.attribute_map.items()}
    for key, item in value.items():
        if key not in fields:
            errors.append(f"{path}.{key}: not a field of {kind}")
            continue
        check(item, model.openapi_types[fields[key]], f"{path}.{key}", errors)


def main():
    api = client.ApiClient()
    report = {}
    for name in sys.argv[1:]:
        with open(name) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        for doc in docs:
            errors = []
            if (doc.get("apiVersion"), doc.get("kind")) != ("batch/v1", "Job"):
                errors.append(f"{name}: {doc.get('apiVersion')}/{doc.get('kind')} is not a batch/v1 Job")
            check(doc, "V1Job", doc.get("metadata", {}).get("name", name), errors)
            try:
                # The models' constructors enforce required fields (containers, names, ...).
                job = api._ApiClient__deserialize(doc, "V1Job")
            except ValueError as e:
                errors.append(f"{name}: {e}")
                job = None
            if errors:
                print("\n".join(errors), file=sys.stderr)
                sys.exit(1)
            container = job.spec.template.spec.containers[0]
            report[name] = {
                "name": job.metadata.name,
                "completion_mode": job.spec.completion_mode or "NonIndexed",
                "completions": job.spec.completions,
                "parallelism": job.spec.parallelism,
                "restart_policy": job.spec.template.spec.restart_policy,
                "args": container.args or [],
                "env": {e.name: e.value for e in (container.env or []) if e.value is not None},
                "config_mount": next(
                    (v.mount_path for v in container.volume_mounts or [] if v.name == "config"), None
                ),
            }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
