"""A head and two worker nodes on this machine; an experiment placed by a profile.

Run by tests/test_cluster.py in a process of its own (it starts its own Ray cluster,
beside the test session's). Prints one JSON object: the node ids and, per trial, the
node it ran on and the caps it reported.

    python tests/scripts/multinode.py WORKDIR
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ray.cluster_utils import Cluster

import tune_alr


def main(workdir: Path) -> None:
    # A short folder of its own: Ray's socket paths must stay under 108 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="tar-mn-", dir="/tmp")
    # Ray writes the cluster's address into <RAY_TMPDIR or /tmp>/ray/ray_current_cluster
    # without creating that folder, which a fresh machine does not have yet.
    os.environ["RAY_TMPDIR"] = ray_tmp
    os.makedirs(os.path.join(ray_tmp, "ray"), exist_ok=True)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "temp_dir": ray_tmp},
    )
    try:
        constrained = cluster.add_node(num_cpus=1, resources={"constrained": 1})
        roomy = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        exp = tune_alr.Experiment(
            name="placement",
            tasks=["digits"],
            policies=["constant", "feedback"],
            seeds=2,
            max_steps=20,
            report_every=10,
            profile="edge",
            node_type="constrained",
            address=cluster.address,
            output=workdir / "out",
            tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
            verbose=0,
        )
        results = tune_alr.run(exp)
        trials = []
        for record in results.records:
            first = record.results[0] if record.results else {}
            trials.append(
                {
                    "status": record.status,
                    "node_id": first.get("node_id"),
                    **{k: v for k, v in first.items() if k.startswith("caps/")},
                }
            )
        print(
            json.dumps(
                {
                    "constrained": constrained.node_id,
                    "roomy": roomy.node_id,
                    "trials": trials,
                    "summary_columns": list(results.summary().columns),
                }
            )
        )
    finally:
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
