"""The Avalanche side: backbone with a continual head, the PEFT plugin, strategies, scenarios, evaluation."""
