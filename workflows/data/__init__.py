"""Prompt datasets: loading, prompt formatting, held-out selection, and the packaged GSM8K (gsm8k/)."""
