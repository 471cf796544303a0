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
  assert len(out.stdout.rstrip("\n").split("\n")) == 2
