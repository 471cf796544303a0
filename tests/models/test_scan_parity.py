"""The Hugging Face parity checks on scanned models (``load_hf(..., scan_layers=True)``).

Tiny random transformers checkpoints (helpers of test_decoder_parity.py and
test_t5.py) load straight into scanned stacks: logits and greedy generation
match transformers, and ``export_hf`` of the scanned parameters gives back
the original tensors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_jax import decoding  # noqa: E402
from moe_jax.checkpoints.hf import export_hf, load_hf  # noqa: E402

from hf_util import hf_logits  # noqa: E402
from test_decoder_parity import _batch, make_hf  # noqa: E402
from test_t5 import _hf_logits, _inputs, _make_hf  # noqa: E402

# one plain, one with q/k norms, one with alternating local / global layers (a period)
DECODERS = ("llama_gqa_untied", "qwen3_qknorm", "gemma3_local_global")


@pytest.mark.parametrize("variant", DECODERS)
def test_scanned_decoder_matches_transformers(variant, tmp_path):
  model = make_hf(tmp_path / "hf", variant)
  loaded = load_hf(tmp_path / "hf", scan_layers=True, remat_policy="dots_no_batch")
  assert loaded.config.scan_layers and "layers" in loaded.params
  ids, mask = _batch(np.random.default_rng(0))
  ours, _ = loaded.module.apply({"params": loaded.params}, jnp.asarray(ids),
                                valid_BL=jnp.asarray(mask, bool))
  valid = mask.astype(bool)
  assert np.abs(np.asarray(ours)[valid] - hf_logits(model, ids, mask)[valid]).max() <= 1e-4
  ids, mask = _batch(np.random.default_rng(1), length=8)
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0,
                         min_new_tokens=0)[:, ids.shape[1]:].numpy()
  out = decoding.generate(loaded.module, loaded.params, ids, prompt_valid_BP=mask,
                          max_new_tokens=8, eos_id=2, pad_id=0)
  np.testing.assert_array_equal(out.tokens_BN, np.pad(ref, ((0, 0), (0, 8 - ref.shape[1]))))
  export_hf(tmp_path / "out", loaded.config, loaded.params)
  again = load_hf(tmp_path / "out")
  jax.tree.map(np.testing.assert_array_equal, again.params,
               load_hf(tmp_path / "hf").params)


def test_scanned_t5_matches_transformers(tmp_path):
  hf = _make_hf("v1_1", seed=0)
  hf.save_pretrained(str(tmp_path / "hf"))
  loaded = load_hf(tmp_path / "hf", scan_layers=True, remat_policy="full")
  assert "layers" in loaded.params["encoder"] and "layers" in loaded.params["decoder"]
  enc, dec, enc_valid, dec_valid = _inputs()
  ours, _ = loaded.module.apply({"params": loaded.params}, enc, dec, enc_valid_BL=enc_valid,
                                dec_valid_BL=dec_valid)
  np.testing.assert_allclose(ours, _hf_logits(hf, enc, dec, enc_valid, dec_valid), atol=1e-4,
                             rtol=0)
  export_hf(tmp_path / "out", loaded.config, loaded.params)
  back = transformers.T5ForConditionalGeneration.from_pretrained(
      str(tmp_path / "out"), attn_implementation="eager").eval()
  np.testing.assert_allclose(_hf_logits(back, enc, dec, enc_valid, dec_valid),
                             _hf_logits(hf, enc, dec, enc_valid, dec_valid), atol=1e-6, rtol=0)
