"""The demo job runs end to end, and the CLI decodes text with its tokenizer."""

import subprocess
import sys


def test_demo_and_text_generation(tmp_path, capsys):
  from moe_jax import demo

  demo.main(["--out", str(tmp_path), "--max_new_tokens", "4"])
  printed = capsys.readouterr().out
  assert "tok/s" in printed and "greedy" in printed
  ckpt = tmp_path / "tiny-llama"
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in ckpt.iterdir()}
  out = subprocess.run([sys.executable, "-m", "moe_jax.generate", "--checkpoint", str(ckpt),
                        "--prompt", "hello", "--prompt", "a longer prompt",
                        "--max_new_tokens", "3", "--temperature", "0.7", "--top_k", "5",
                        "--seed", "1"], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  # Same result through the Python API (text may contain newlines: compare whole output).
  from tokenizers import Tokenizer

  from moe_jax import decoding
  from moe_jax.checkpoints import load_checkpoint
  tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
  loaded = load_checkpoint(ckpt)
  ids = [tok.encode(t).ids for t in ("hello", "a longer prompt")]
  assert ids[0][0] == 1  # the post-processor adds <s>
  ref = decoding.generate(loaded.module, loaded.params, ids, max_new_tokens=3, temperature=0.7,
                          top_k=5, seed=1, eos_id=2, pad_id=0)
  expected = "".join(tok.decode(row, skip_special_tokens=True) + "\n" for row in ref.to_lists())
  assert out.stdout == expected
