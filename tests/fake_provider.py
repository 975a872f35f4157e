"""Ray's fake multi-node node provider, each fake worker node with a temp dir of its own.

The autoscaler (the monitor process on the head) loads this class by name
(`provider: {type: external, module: fake_provider.SeparateTempDirFakeProvider}`).

Why not Ray's own `fake_multinode` provider as it is: it starts every worker node with the
head's Ray temp dir, so all nodes share one `session_*/runtime_resources/` folder. A node's
runtime-env agent that meets a job's `working_dir` for the first time unpacks it with
`overwrite=True` (Ray 2.60, `ray/_private/runtime_env/working_dir.py`): it removes the folder
the head's agent unpacked before and unpacks it again. Every process already running in that
folder (the job's driver, Train workers on other nodes) is left in a deleted working
directory, and the next `import torch` there dies with "Intel oneMKL FATAL ERROR: Cannot load
.../libtorch_cpu.so" (oneMKL's loader calls getcwd, which fails). Real nodes each have a disk
of their own; with a temp dir per node the fake ones do too.
"""

from __future__ import annotations

import copy
import json
import os

import ray
import ray._private.ray_constants as ray_constants
from ray._common.network_utils import build_address
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_WORKER,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)


class SeparateTempDirFakeProvider(FakeMultiNodeProvider):
    """`provider.nodes_dir`: the folder under which each fake worker node gets `<n>/` as its temp dir."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # Ray 2.60's FakeMultiNodeProvider._create_node_with_resources_and_labels, plus `temp_dir`.
        resources = copy.deepcopy(resources)
        with self.lock:
            node_type = tags[TAG_RAY_USER_NODE_TYPE]
            next_id = self._next_hex_node_id()
            gcs = self._gcs_address or build_address(ray._private.services.get_node_ip_address(), 6379)
            temp_dir = os.path.join(self.provider_config["nodes_dir"], str(int(next_id[-5:])))
            ray_params = ray._private.parameter.RayParams(
                min_worker_port=0,
                max_worker_port=0,
                dashboard_port=None,
                dashboard_agent_listen_port=0,
                num_cpus=resources.pop("CPU", 0),
                num_gpus=resources.pop("GPU", 0),
                object_store_memory=resources.pop("object_store_memory", None),
                resources=resources,
                labels=labels,
                redis_address=gcs,
                gcs_address=gcs,
                temp_dir=temp_dir,
                env_vars={
                    "RAY_OVERRIDE_NODE_ID_FOR_TESTING": next_id,
                    "RAY_CLOUD_INSTANCE_ID": next_id,
                    "RAY_NODE_TYPE_NAME": node_type,
                    ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                    ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels),
                },
            )
            node = ray._private.node.Node(ray_params, head=False, shutdown_at_exit=False, spawn_reaper=False)
            all_tags = {
                TAG_RAY_NODE_KIND: NODE_KIND_WORKER,
                TAG_RAY_USER_NODE_TYPE: node_type,
                TAG_RAY_NODE_NAME: next_id,
                TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE,
            }
            all_tags.update(tags)
            self._nodes[next_id] = {"tags": all_tags, "node": node}
