"""Minimal partitioner: mesh construction and logical -> mesh axis rules."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax.train.partitioning import (DEFAULT_RULES, MESH_AXES, logical_to_mesh_spec,
                                        make_mesh, merge_rules, mesh_axis_for, validate_rules)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_make_mesh():
  mesh = make_mesh({"data": 2, "expert": 4, "model": 1})
  assert mesh.axis_names == MESH_AXES
  assert dict(mesh.shape) == {"data": 2, "expert": 4, "model": 1}
  assert dict(make_mesh({"expert": 2}).shape) == {"data": 1, "expert": 2, "model": 1}
  assert make_mesh({"data": 2}, devices=jax.devices()[2:4]).devices.ravel().tolist() == \
      jax.devices()[2:4]
  with pytest.raises(ValueError, match="unknown mesh axes"):
    make_mesh({"pipeline": 2})
  with pytest.raises(ValueError, match="needs 16 devices"):
    make_mesh({"data": 16})


def test_default_rules_specs():
  spec = lambda *axes: logical_to_mesh_spec(axes, DEFAULT_RULES)
  assert spec("batch", "length", "embed") == P(("data", "expert"), None, None)
  assert spec("expert", "embed", "mlp") == P("expert", None, "model")
  assert spec("embed", "heads", "kv") == P(None, "model", None)
  assert spec("vocab", "embed") == P("model", None)
  assert spec("embed", "unmodeled") == P(None, None)
  # A mesh axis is used once per array: batch takes (data, expert) first.
  assert spec("batch", "expert", None) == P(("data", "expert"), None, None)
  with pytest.raises(ValueError, match="no partitioning rule for logical axes \\['bogus'\\]"):
    spec("bogus", "embed")
  with pytest.raises(ValueError, match="repeat"):
    spec("embed", "embed")


def test_merge_rules():
  merged = merge_rules(DEFAULT_RULES, [("vocab", "model"), ("cache", None)])
  assert merged[:len(DEFAULT_RULES)] == tuple(DEFAULT_RULES)
  assert merged[-1] == ("cache", None)
  with pytest.raises(ValueError, match="conflicting rules for logical axis 'mlp'"):
    merge_rules(DEFAULT_RULES, [("mlp", "data")])
  with pytest.raises(ValueError, match="malformed rule"):
    merge_rules(DEFAULT_RULES, [("mlp",)])
  # ("x", "a") and ("x", ("a",)) are the same rule.
  assert merge_rules([("x", "a")], [("x", ("a",))]) == (("x", "a"),)


def test_mesh_axis_for_and_validate():
  assert mesh_axis_for("expert", DEFAULT_RULES) == "expert"
  assert mesh_axis_for("batch", DEFAULT_RULES) == ("data", "expert")
  assert mesh_axis_for("embed", DEFAULT_RULES) is None
  with pytest.raises(ValueError, match="'nope'"):
    mesh_axis_for("nope", DEFAULT_RULES)
  mesh = make_mesh({"data": 1})
  validate_rules(DEFAULT_RULES, mesh)
  with pytest.raises(ValueError, match="\\['pod'\\]"):
    validate_rules([("batch", ("pod", "data"))], mesh)
