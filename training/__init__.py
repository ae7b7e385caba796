"""Fine-tuning with quantization-aware training and gradual magnitude pruning (the paper's Sec. 5)."""
