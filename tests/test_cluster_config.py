"""cluster.yaml is a valid Ray cluster launcher config (Ray's own schema, offline)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_validates_against_ray_schema():
    config = yaml.safe_load(CONFIG.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["head_node_type"] in config["available_node_types"]


def test_validator_rejects_unknown_keys():
    config = yaml.safe_load(CONFIG.read_text())
    config["max_wrkers"] = 3
    with pytest.raises(ValidationError, match="max_wrkers"):
        validate_config(prepare_config(config))
