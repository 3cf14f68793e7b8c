"""Check a ``ray up`` cluster file against Ray's own schema, before ``ray up`` runs.

    tune-alr check-cluster cluster/aws.yaml

``check`` raises ``ValueError`` with one line naming the file, the bad key or value, and
where it is; Ray's own message is several paragraphs of JSON schema.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any


def check(path: str | Path) -> dict[str, Any]:
    """The cluster config in ``path`` as Ray prepares it; ``ValueError`` if invalid."""
    import jsonschema
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"cluster file {str(file)!r} does not exist.")
    try:
        config = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        message = f"cluster file {str(file)!r} is not YAML: {err}".replace("\n", " ")
        raise ValueError(message) from None
    if not isinstance(config, dict):
        raise ValueError(f"cluster file {str(file)!r} is not a mapping of settings.")
    # Ray logs its defaults at INFO ("setting max workers ..."): not this command's output.
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "the top level"
        raise ValueError(f"cluster file {str(file)!r}: {err.message} (at {where}).") from None
    except (Exception, SystemExit) as err:  # Ray's own checks (its logger aborts by exit)
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cluster file {str(file)!r}: {message}") from None
    result: dict[str, Any] = prepared
    return result
