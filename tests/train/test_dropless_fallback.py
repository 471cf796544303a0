"""``TrainerConfig.dropless_fallback``: small ragged receive buffers, replayed when they overflow.

A tiny MoE decoder with ``dispatch="ragged"`` on a ``data=2, expert=4`` mesh
of 8 fake devices, exchanging with the ``"emulated"`` ragged all-to-all (its
exact semantics over a padded all_to_all: XLA:CPU has none). Whether the
fast step overflows or not, the trained state equals that of a run whose
layers all have the worst-case (truly dropless) buffer.
"""

import jax
import numpy as np
import pytest

from moe_jax.models.moe_decoder import MoeDecoderConfig
from moe_jax.moe.layer import MoeConfig
from moe_jax.train.metric_writers import MetricWriter
from moe_jax.train.optimizers import OptimizerConfig, ScheduleConfig
from moe_jax.train.partitioner import PartitionerConfig
from moe_jax.train.run import build_trainer
from moe_jax.train.trainer import FALLBACK_METRIC, LOAD_METRIC, OVERFLOW_METRIC, TrainerConfig
from moe_jax.train.wrappers import DecoderOnlyModel

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

B, L, STEPS = 16, 8, 2


def _model(buffer_factor):
  moe = MoeConfig(num_experts=8, num_selected=2, dispatch="ragged", ragged_exchange="emulated",
                  ragged_kernel="ragged_dot", ragged_buffer_factor=buffer_factor,
                  capacity_factor=None)
  return DecoderOnlyModel(MoeDecoderConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=2,
                                           d_ff=32, moe=moe))


def _batches():
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    t = rng.integers(1, 64, (B, L)).astype(np.int32)
    out.append({"decoder_input_tokens": t, "decoder_target_tokens": np.roll(t, -1, 1),
                "decoder_loss_weights": np.ones((B, L), np.int32)})
  return out


def _trainer(buffer_factor, numpy_params, place, writer=None, **config):
  model = _model(buffer_factor)
  tr = build_trainer(model, trainer=TrainerConfig(num_train_steps=STEPS, progress_bar=False,
                                                  **config),
                     optimizer=OptimizerConfig(name="adamw", schedule=ScheduleConfig(lr=1e-2)),
                     partitioner=PartitionerConfig(data=2, expert=4), metrics_writer=writer)
  return tr, place(tr, numpy_params(model))


def _run(buffer_factor, numpy_params, place, **config):
  tr, state = _trainer(buffer_factor, numpy_params, place, **config)
  metrics = []
  for batch in _batches():
    state, m = tr.train_step(state, batch)
    metrics.append(jax.device_get(m))
  return tr, jax.device_get(state), metrics


def _assert_same_state(got, want):
  assert int(got.step) == int(want.step) == STEPS
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               (got.params, got.opt_state), (want.params, want.opt_state))


@pytest.mark.parametrize("microbatches", [None, 2])
def test_overflowing_steps_are_replayed_with_worst_case_buffers(microbatches, numpy_params,
                                                               place, caplog):
  # A buffer of a quarter of the balanced load overflows on every step.
  with caplog.at_level("WARNING", logger="moe_jax.train.trainer"):
    tr, got, metrics = _run(0.25, numpy_params, place, dropless_fallback=True,
                            fallback_microbatches=microbatches)
  said = [r for r in caplog.records if "re-running the step with worst-case" in r.getMessage()]
  assert len(said) == 1  # said once, then counted
  assert "x its balanced load" in said[0].getMessage()  # and what factor would have fit
  assert all(float(m[LOAD_METRIC]) > 0.25 for m in metrics)
  _, want, want_metrics = _run(None, numpy_params, place, num_microbatches=microbatches or 1)
  assert tr.fallback_steps == STEPS
  assert [m[FALLBACK_METRIC] for m in metrics] == [1.0] * STEPS
  assert all(m[OVERFLOW_METRIC] == 0 for m in metrics)  # the logged step is the replay
  _assert_same_state(got, want)
  for m, w in zip(metrics, want_metrics):
    np.testing.assert_allclose(m["loss"], w["loss"], rtol=1e-5)


def test_steps_that_fit_are_not_replayed(numpy_params, place):
  # 3x the balanced load (the worst case is 4x here): near-uniform routing fits.
  tr, got, metrics = _run(3.0, numpy_params, place, dropless_fallback=True)
  _, want, _ = _run(None, numpy_params, place)
  assert tr.fallback_steps == 0 and not tr._fallbacks  # never even compiled
  assert [float(m[FALLBACK_METRIC]) for m in metrics] == [0.0] * STEPS
  assert all(1.0 <= float(m[LOAD_METRIC]) <= 3.0 for m in metrics)  # the busiest layer
  _assert_same_state(got, want)


def test_evaluation_uses_worst_case_buffers(numpy_params, place):
  batch = _batches()[0]
  tr, state = _trainer(0.25, numpy_params, place, dropless_fallback=True)
  small, _ = _trainer(0.25, numpy_params, place)
  full, _ = _trainer(None, numpy_params, place)
  got, dropped, want = (jax.device_get(t.eval_step(state.params, batch)) for t in (tr, small, full))
  assert got[OVERFLOW_METRIC] == 0 and dropped[OVERFLOW_METRIC] > 0
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)


class _Rows(MetricWriter):
  def __init__(self):
    self.rows = []

  def write(self, step, split, metrics):
    self.rows.append((step, split, dict(metrics)))


def test_the_loop_logs_how_many_steps_fell_back(numpy_params, place):
  writer = _Rows()
  tr, state = _trainer(0.25, numpy_params, place, writer=writer, dropless_fallback=True,
                       log_every=STEPS)
  state = tr.train(state, iter(_batches()))
  assert int(jax.device_get(state.step)) == STEPS
  (step, split, row), = writer.rows
  assert (step, split, row[FALLBACK_METRIC]) == (STEPS, "train", float(STEPS))
  _, _, metrics = _run(0.25, numpy_params, place, dropless_fallback=True)
  loads = [float(m[LOAD_METRIC]) for m in metrics]
  assert row[LOAD_METRIC] == pytest.approx(max(loads))  # the interval's busiest step


def test_fallback_microbatches_must_be_positive():
  with pytest.raises(ValueError, match="fallback_microbatches"):
    TrainerConfig(num_train_steps=1, fallback_microbatches=0)
