"""The PEFT sweep (arXiv 2309.05444 in miniature): MoV / MoLoRA vs (IA)^3 / LoRA / full
fine-tuning on a tiny T5 and a tiny decoder; see README.md."""
