"""Models in and out: Hugging Face export of checkpoints, import of Mixtral / Llama directories, AoE upcycling."""
