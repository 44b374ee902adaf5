"""Turn the default Kubernetes base job template into a GPU one (for a ``kubernetes`` work pool).

    prefect work-pool get-default-base-job-template --type kubernetes > k8s-default.json   # needs prefect-kubernetes
    python deployments/k8s_gpu_template.py k8s-default.json > k8s-gpu.json
    prefect work-pool create dlp-k8s-gpu --type kubernetes --base-job-template k8s-gpu.json

Adds three job variables a deployment can set in ``work_pool.job_variables``:

- ``gpu_count`` (default 1): ``resources.limits["nvidia.com/gpu"]`` of the flow-run container;
- ``node_selector`` (default ``{}``): the pod's ``nodeSelector`` (e.g. ``{"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}``);
- ``tolerations`` (default: tolerate the ``nvidia.com/gpu`` taint).
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

GPU_VARIABLES: dict[str, Any] = {
    "gpu_count": {"type": "integer", "default": 1, "minimum": 0, "title": "GPUs",
                  "description": "nvidia.com/gpu limit of the flow-run container"},
    "node_selector": {"type": "object", "default": {}, "additionalProperties": {"type": "string"},
                      "title": "Node selector", "description": "nodeSelector of the flow-run pod"},
    "tolerations": {"type": "array", "items": {"type": "object"}, "title": "Tolerations",
                    "default": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "description": "tolerations of the flow-run pod"},
}


def gpu_template(default: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``default`` (the kubernetes worker's base job template) with the GPU variables wired in."""
    tpl = copy.deepcopy(default)
    try:
        props = tpl["variables"]["properties"]
        pod = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not a kubernetes base job template (missing {e})") from None
    props.update(copy.deepcopy(GPU_VARIABLES))
    container.setdefault("resources", {}).setdefault("limits", {})["nvidia.com/gpu"] = "{{ gpu_count }}"
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    return tpl


if __name__ == "__main__":  # pragma: no cover
    src = open(sys.argv[1]) if len(sys.argv) > 1 else sys.stdin
    json.dump(gpu_template(json.load(src)), sys.stdout, indent=2)
    sys.stdout.write("\n")
